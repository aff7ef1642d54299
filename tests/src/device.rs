//! A test device: a real WebSocket client (tokio-tungstenite) with bounded receives.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a receive waits by default.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// One device connection to a gateway's `/v1/connect`.
#[derive(Debug)]
pub struct Device {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code and reason.
    Close(u16, String),
    /// The connection ended without a close frame.
    Dropped,
}

impl Device {
    /// Opens `/v1/connect` on `addr`, with `Authorization: Bearer <token>` when given.
    /// An HTTP answer other than 101 comes back as `Err(status)`.
    pub async fn try_connect(addr: SocketAddr, token: Option<&str>) -> Result<Device, u16> {
        Device::try_connect_with(addr, token, None).await
    }

    /// As [`Device::try_connect`], with the socket's receive buffer set to `recv_buffer`
    /// bytes: a device that reads slowly over a small window, so that what the
    /// gateway sends waits in the gateway's own send buffer.
    pub async fn try_connect_with(
        addr: SocketAddr,
        token: Option<&str>,
        recv_buffer: Option<u32>,
    ) -> Result<Device, u16> {
        let mut req = format!("ws://{addr}/v1/connect")
            .into_client_request()
            .expect("a valid URL");
        if let Some(t) = token {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).expect("token fits a header"),
            );
        }
        let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
        let connecting = async {
            let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
            if let Some(size) = recv_buffer {
                socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
            }
            let stream = socket.connect(addr).await.map_err(WsError::Io)?;
            tokio_tungstenite::client_async_with_config(
                req,
                MaybeTlsStream::Plain(stream),
                Some(config),
            )
            .await
        };
        match tokio::time::timeout(RECV_TIMEOUT, connecting).await {
            Ok(Ok((ws, _))) => Ok(Device { ws }),
            Ok(Err(WsError::Http(res))) => Err(res.status().as_u16()),
            Ok(Err(e)) => panic!("WebSocket connect to {addr} failed: {e}"),
            Err(_) => panic!("WebSocket connect to {addr} timed out"),
        }
    }

    /// Connects with header auth and returns the device with its `welcome` frame.
    pub async fn connect(addr: SocketAddr, token: &str) -> (Device, Value) {
        let mut d = Device::try_connect(addr, Some(token))
            .await
            .unwrap_or_else(|s| panic!("upgrade refused with HTTP {s}"));
        let welcome = d.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (d, welcome)
    }

    /// Connects as a device that follows the protocol does: a close with 1013 (the
    /// broker did not confirm the connect; retry later) is retried after a short
    /// pause, at most `attempts` times in all. Returns the device, its `welcome` and
    /// how many 1013s it saw.
    pub async fn connect_retrying(
        addr: SocketAddr,
        token: &str,
        attempts: u32,
    ) -> (Device, Value, u32) {
        let mut again = 0;
        loop {
            let mut d = Device::try_connect(addr, Some(token))
                .await
                .unwrap_or_else(|s| panic!("upgrade refused with HTTP {s}"));
            match d.frame_or_end(RECV_TIMEOUT).await {
                Ok(welcome) => {
                    assert_eq!(welcome["type"], "welcome", "{welcome}");
                    return (d, welcome, again);
                }
                Err(Ended::Close(1013, _)) if again + 1 < attempts => {
                    again += 1;
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(again))).await;
                }
                Err(ended) => panic!("connect ended with {ended:?} after {again} retries"),
            }
        }
    }

    /// Connects without a header and authenticates in band; returns the `welcome`.
    pub async fn connect_in_band(addr: SocketAddr, token: &str) -> (Device, Value) {
        let mut d = Device::try_connect(addr, None).await.expect("upgrade");
        let hello = d.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        d.send(&serde_json::json!({"type": "auth", "token": token}))
            .await;
        let welcome = d.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (d, welcome)
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(Message::text(text)))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// Sends a text frame, saying whether it could be written (a device that goes on
    /// sending while the gateway closes it sees its sends fail).
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        matches!(
            tokio::time::timeout(RECV_TIMEOUT, self.ws.send(Message::text(text))).await,
            Ok(Ok(()))
        )
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(Message::binary(bytes)))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next text frame as JSON, within [`RECV_TIMEOUT`]; panics on a close.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(RECV_TIMEOUT).await
    }

    /// The next text frame as JSON, within `timeout`; panics on a close.
    pub async fn recv_within(&mut self, timeout: Duration) -> Value {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str(t.as_str()).expect("gateway sent JSON");
                    }
                    Some(Ok(Message::Close(c))) => panic!("connection closed: {c:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("socket error: {e}"),
                    None => panic!("connection ended"),
                }
            }
        };
        tokio::time::timeout(timeout, next)
            .await
            .expect("no frame from the gateway in time")
    }

    /// Reads until the connection ends, within `timeout`; returns the frames read
    /// before the end and how it ended.
    pub async fn ended_within(&mut self, timeout: Duration) -> (Vec<Value>, Ended) {
        let mut frames = Vec::new();
        let end = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        frames.push(serde_json::from_str(t.as_str()).expect("gateway sent JSON"))
                    }
                    Some(Ok(Message::Close(Some(c)))) => {
                        return Ended::Close(c.code.into(), c.reason.to_string());
                    }
                    Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Ended::Dropped,
                    Some(Ok(_)) => continue,
                }
            }
        };
        let ended = tokio::time::timeout(timeout, end)
            .await
            .expect("the gateway did not end the connection in time");
        (frames, ended)
    }

    /// The next text frame, or how the connection ended instead, within `timeout`.
    pub async fn frame_or_end(&mut self, timeout: Duration) -> Result<Value, Ended> {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return Ok(serde_json::from_str(t.as_str()).expect("gateway sent JSON"));
                    }
                    Some(Ok(Message::Close(Some(c)))) => {
                        return Err(Ended::Close(c.code.into(), c.reason.to_string()));
                    }
                    Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                        return Err(Ended::Dropped);
                    }
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(timeout, next)
            .await
            .expect("neither a frame nor the end in time")
    }

    /// Reads (answering pings) for `duration`; says whether the connection was still
    /// open at the end.
    pub async fn open_after(&mut self, duration: Duration) -> bool {
        let end = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(duration, end).await.is_err()
    }

    /// Reads until the connection ends (within [`RECV_TIMEOUT`]) and returns the
    /// close code; panics when it ended without a close frame.
    pub async fn close_code(&mut self) -> u16 {
        match self.ended_within(RECV_TIMEOUT).await.1 {
            Ended::Close(code, _) => code,
            Ended::Dropped => panic!("connection ended without a close frame"),
        }
    }

    /// Closes the connection from the device side (code 1000).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(RECV_TIMEOUT, self.ws.close(None)).await;
        let _ = tokio::time::timeout(RECV_TIMEOUT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
