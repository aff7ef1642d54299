//! One simulated device: connect, authenticate, send events, answer requests,
//! reconnect.
//!
//! A device keeps the events it sent with an `id` until the gateway acks them; after a
//! reconnect (or a `nack`) it sends them again with the same ids, so the gateway gives
//! them the same `message_id` and Hive can deduplicate. At most `max_in_flight`
//! events wait for an ack: beyond that the device stops sending new ones (it never
//! drops one).
//!
//! [`Stats`] counts what every device of a process did, for the progress line.

use std::fmt;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mosaic_protocol::frame::ServerFrame;
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
pub use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod outbox;
mod stats;

pub use stats::Stats;

use outbox::Outbox;

use crate::answer::Answer;
use crate::backoff::{AfterClose, Backoff, PROMPT_SPREAD, after_close};
use crate::token::{self, Signer, TokenSpec};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the upgrade and the `welcome` may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a device's token comes from.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A token given on the command line; it cannot be renewed.
    Token(String),
    /// Minted by the device itself, renewed before it expires.
    Mint {
        /// The key.
        signer: Arc<Signer>,
        /// Claims (the `sub` is the device).
        spec: TokenSpec,
    },
    /// A one-time enrolment code: the first connection sends `enrol` instead of
    /// `auth` and keeps the token the gateway answers with for the next ones.
    Enrol(Arc<Enrolment>),
}

/// An enrolment code, and the token it was traded for once it was.
#[derive(Debug)]
pub struct Enrolment {
    code: String,
    token: std::sync::Mutex<Option<String>>,
}

impl Enrolment {
    /// Credentials that enrol with `code`.
    pub fn credentials(code: impl Into<String>) -> Credentials {
        Credentials::Enrol(Arc::new(Enrolment {
            code: code.into(),
            token: std::sync::Mutex::new(None),
        }))
    }

    /// The token received, once enrolled.
    pub fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn store(&self, token: String) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
    }
}

impl Credentials {
    fn token(&self) -> Result<String, DeviceError> {
        match self {
            Credentials::Token(t) => Ok(t.clone()),
            Credentials::Mint { signer, spec } => Ok(token::mint(signer, spec)?),
            Credentials::Enrol(e) => Ok(e.token().unwrap_or_default()),
        }
    }

    /// The code to send instead of a token, while not enrolled yet.
    fn enrol_code(&self) -> Option<&str> {
        match self {
            Credentials::Enrol(e) if e.token().is_none() => Some(&e.code),
            _ => None,
        }
    }

    /// When to send a refreshed token: at 80 % of a minted token's lifetime.
    fn refresh_after(&self) -> Option<Duration> {
        match self {
            Credentials::Token(_) | Credentials::Enrol(_) => None,
            Credentials::Mint { spec, .. } => {
                Some(spec.ttl.mul_f64(0.8).max(Duration::from_secs(1)))
            }
        }
    }
}

/// What events a device sends.
#[derive(Debug, Clone)]
pub struct EventPlan {
    /// The event name.
    pub name: String,
    /// Fixed data; `None` sends `{"seq":n,"value":<random>}`.
    pub data: Option<Value>,
    /// Time between two events; `None` sends none.
    pub interval: Option<Duration>,
    /// How many events in all; `None` keeps sending.
    pub count: Option<u64>,
    /// Give each event an `id` and wait for its `ack`.
    pub with_ids: bool,
}

/// How a device reports what happens.
#[derive(Debug, Clone)]
pub enum Output {
    /// Print every frame, prefixed with `[label]`.
    Print {
        /// The prefix.
        label: String,
    },
    /// Print nothing but the reason the device stopped; counters only.
    Quiet,
}

/// Everything one device needs.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// `ws://host:port/v1/connect`.
    pub url: String,
    /// The device (the token's `sub`).
    pub device: Uuid,
    /// Its token.
    pub credentials: Credentials,
    /// Authenticate with an `auth` frame after `hello` instead of the upgrade header.
    pub in_band: bool,
    /// The events to send.
    pub events: EventPlan,
    /// How to answer requests.
    pub answer: Answer,
    /// The services and attributes it declares: in its `auth` frame when it
    /// authenticates in band, else in a `register` frame after `welcome`.
    pub capabilities: mosaic_protocol::fleet::Capabilities,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Most events waiting for an ack at once.
    pub max_in_flight: usize,
    /// What to print.
    pub output: Output,
    /// The local address to connect from (`None`: the system's choice). A load
    /// generator holding many connections to one gateway spreads them over several
    /// loopback addresses (`127.0.0.2`, `127.0.0.3`...): past about 14,000
    /// connections from one address to one port, Linux scans its whole ephemeral
    /// port range on each `connect()`.
    pub source: Option<std::net::IpAddr>,
}

/// Why a device could not go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The gateway refused the token at the upgrade (HTTP 401).
    #[error("the gateway refused the token (HTTP 401)")]
    Unauthorized,
    /// The gateway closed with a code after which reconnecting does not help.
    #[error("the gateway closed the connection with {code} {reason:?}: not reconnecting")]
    Closed {
        /// The close code.
        code: u16,
        /// Its reason.
        reason: String,
    },
    /// The token was refused or expired (4401) and the device cannot mint a new one.
    #[error(
        "the gateway closed the connection with 4401 {reason:?}: give a fresh --token, or --secret/--key to mint and refresh tokens"
    )]
    TokenRefused {
        /// The close reason.
        reason: String,
    },
    /// A token could not be minted.
    #[error(transparent)]
    Token(#[from] token::TokenError),
    /// The URL is not a WebSocket URL.
    #[error("invalid URL: {0}")]
    Url(String),
}

/// How a device run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every planned event was sent and settled.
    Done,
    /// The run was cancelled (Ctrl-C or `--duration`).
    Cancelled,
}

/// Why one connection failed or ended.
#[derive(Debug)]
enum SessionEnd {
    Done,
    Cancelled,
    Closed { code: Option<u16>, reason: String },
    Unauthorized,
    Io(String),
}

/// Runs one device until its plan is done, `cancel` fires, or an error makes going on
/// pointless.
pub async fn run(
    cfg: DeviceConfig,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) -> Result<Outcome, DeviceError> {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
    let mut outbox = Outbox::new();
    let mut had_session = false;
    loop {
        if cancel.is_cancelled() {
            return Ok(Outcome::Cancelled);
        }
        let token = cfg.credentials.token()?;
        let end = match connect(&cfg, &token, &cancel).await {
            Ok((ws, welcome)) => {
                if had_session {
                    Stats::add(&stats.reconnects, 1);
                }
                had_session = true;
                backoff.reset();
                Stats::add(&stats.sessions, 1);
                stats.connected.fetch_add(1, Ordering::Relaxed);
                say(&cfg, format_args!("connected: {welcome}"));
                let end = session(&cfg, ws, &stats, &mut outbox, &cancel).await;
                stats.connected.fetch_sub(1, Ordering::Relaxed);
                outbox.requeue_in_flight();
                end
            }
            Err(end) => end,
        };
        let delay = match end {
            SessionEnd::Done => return Ok(Outcome::Done),
            SessionEnd::Cancelled => return Ok(Outcome::Cancelled),
            SessionEnd::Unauthorized => return Err(DeviceError::Unauthorized),
            SessionEnd::Io(e) => {
                let d = backoff.next_delay(&mut rand::rng());
                say(
                    &cfg,
                    format_args!("connection failed: {e}; retrying in {d:?}"),
                );
                d
            }
            SessionEnd::Closed { code, reason } => {
                let shown = code.map_or("no close frame".to_owned(), |c| c.to_string());
                match after_close(code) {
                    AfterClose::Stop => {
                        return Err(DeviceError::Closed {
                            code: code.unwrap_or_default(),
                            reason,
                        });
                    }
                    AfterClose::Reauthenticate
                        if matches!(cfg.credentials, Credentials::Token(_)) =>
                    {
                        return Err(DeviceError::TokenRefused { reason });
                    }
                    AfterClose::Promptly => {
                        backoff.reset();
                        let d = Duration::from_millis(
                            rand::rng().random_range(0..=PROMPT_SPREAD.as_millis() as u64),
                        );
                        say(
                            &cfg,
                            format_args!("closed ({shown} {reason:?}): reconnecting in {d:?}"),
                        );
                        d
                    }
                    AfterClose::Reauthenticate | AfterClose::Backoff => {
                        let d = backoff.next_delay(&mut rand::rng());
                        say(
                            &cfg,
                            format_args!("closed ({shown} {reason:?}): reconnecting in {d:?}"),
                        );
                        d
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Ok(Outcome::Cancelled),
        }
    }
}

/// Adds the declared `services` and `attributes` to a frame.
fn declare(c: &mosaic_protocol::fleet::Capabilities, frame: &mut Value) {
    if let Some(s) = &c.services {
        frame["services"] = json!(s);
    }
    if let Some(a) = &c.attributes {
        frame["attributes"] = Value::Object(a.clone());
    }
}

/// Upgrades, authenticates and waits for `welcome`.
async fn connect(
    cfg: &DeviceConfig,
    token: &str,
    cancel: &CancellationToken,
) -> Result<(Ws, String), SessionEnd> {
    let attempt = async {
        let mut request = cfg
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| SessionEnd::Io(format!("invalid URL: {e}")))?;
        let enrol = cfg.credentials.enrol_code();
        if !cfg.in_band && enrol.is_none() {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| SessionEnd::Io("the token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let upgrade = match cfg.source {
            None => tokio_tungstenite::connect_async(request).await,
            Some(source) => upgrade_from(source, request).await,
        };
        let (mut ws, _) = match upgrade {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(resp)) if resp.status() == StatusCode::UNAUTHORIZED => {
                return Err(SessionEnd::Unauthorized);
            }
            Err(e) => return Err(SessionEnd::Io(e.to_string())),
        };
        loop {
            let frame = match next_frame(&mut ws).await {
                Ok(f) => f,
                Err(end) => return Err(end),
            };
            match frame {
                ServerFrame::Hello { auth_timeout_ms } => {
                    say(
                        cfg,
                        format_args!(
                            "hello (auth within {auth_timeout_ms} ms): sending auth frame"
                        ),
                    );
                    let auth = match enrol {
                        Some(code) => json!({"type": "enrol", "code": code}).to_string(),
                        None => {
                            let mut auth = json!({"type": "auth", "token": token});
                            declare(&cfg.capabilities, &mut auth);
                            auth.to_string()
                        }
                    };
                    ws.send(Message::text(auth))
                        .await
                        .map_err(|e| SessionEnd::Io(e.to_string()))?;
                }
                ServerFrame::Welcome {
                    device,
                    session,
                    expires_at,
                } => {
                    let text = format!("device={device} session={session} expires_at={expires_at}");
                    // Capabilities not declared in an `auth` frame go in a `register`.
                    let declared = cfg.in_band && enrol.is_none();
                    if !declared && !cfg.capabilities.is_empty() {
                        let mut register = json!({"type": "register"});
                        declare(&cfg.capabilities, &mut register);
                        let register = register.to_string();
                        say(cfg, format_args!("-> {register}"));
                        ws.send(Message::text(register))
                            .await
                            .map_err(|e| SessionEnd::Io(e.to_string()))?;
                    }
                    return Ok((ws, text));
                }
                ServerFrame::Error { code, message } => {
                    say(cfg, format_args!("<- error {code}: {message}"));
                }
                ServerFrame::Enrolled {
                    device,
                    expires_at,
                    token,
                    ..
                } => {
                    say(
                        cfg,
                        format_args!("<- enrolled device={device} expires_at={expires_at}"),
                    );
                    if let Credentials::Enrol(e) = &cfg.credentials {
                        e.store(token);
                    }
                }
                other => say(cfg, format_args!("<- unexpected before welcome: {other:?}")),
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt) => match r {
            Ok(r) => r,
            Err(_) => Err(SessionEnd::Io(format!("no welcome within {HANDSHAKE_TIMEOUT:?}"))),
        },
        _ = cancel.cancelled() => Err(SessionEnd::Cancelled),
    }
}

/// The upgrade over a TCP connection made from `source`, with read and write buffers
/// sized for many idle connections rather than for throughput.
async fn upgrade_from(
    source: std::net::IpAddr,
    request: tungstenite::handshake::client::Request,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let uri = request.uri();
    let host = uri.host().unwrap_or("127.0.0.1").to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let peer = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .ok_or_else(|| {
            tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("{host} has no address of the family of {source}"),
            ))
        })?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    let stream = socket.connect(peer).await?;
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024);
    tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(stream),
        Some(config),
    )
    .await
}

/// The next gateway frame; pings are answered by the library as it reads.
async fn next_frame(ws: &mut Ws) -> Result<ServerFrame, SessionEnd> {
    loop {
        match ws.next().await {
            None => {
                return Err(SessionEnd::Closed {
                    code: None,
                    reason: "connection ended".into(),
                });
            }
            Some(Err(e)) => return Err(SessionEnd::Io(e.to_string())),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((None, String::new()), |f| {
                    (Some(u16::from(f.code)), f.reason.as_str().to_owned())
                });
                return Err(SessionEnd::Closed { code, reason });
            }
            Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                Ok(frame) => return Ok(frame),
                Err(e) => {
                    return Err(SessionEnd::Io(format!(
                        "the gateway sent a frame this tool does not know ({e}): {}",
                        text.as_str()
                    )));
                }
            },
            Some(Ok(_)) => continue, // ping, pong, binary
        }
    }
}

/// One connected session: until it closes, the plan is done, or cancel.
async fn session(
    cfg: &DeviceConfig,
    mut ws: Ws,
    stats: &Stats,
    outbox: &mut Outbox,
    cancel: &CancellationToken,
) -> SessionEnd {
    let plan = &cfg.events;
    let mut ticker = plan.interval.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    let refresh_every = cfg.credentials.refresh_after();
    let mut refresh_at = refresh_every.map(|d| Instant::now() + d);
    loop {
        let all_new_sent = plan.count.is_some_and(|c| outbox.next_seq >= c);
        if all_new_sent && outbox.pending() == 0 {
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "done".into(),
                })))
                .await;
            say(cfg, format_args!("done: every event sent and settled"));
            return SessionEnd::Done;
        }
        let can_send = (!all_new_sent || !outbox.resend.is_empty())
            && outbox.in_flight.len() < cfg.max_in_flight;
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await;
                return SessionEnd::Cancelled;
            }
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() && can_send => {
                if let Err(e) = send_event(cfg, &mut ws, stats, outbox).await {
                    return e;
                }
            }
            _ = async { tokio::time::sleep_until(refresh_at.expect("guarded")).await }, if refresh_at.is_some() => {
                match cfg.credentials.token() {
                    Ok(token) => {
                        let frame = json!({"type": "auth", "token": token}).to_string();
                        if let Err(e) = ws.send(Message::text(frame)).await {
                            return SessionEnd::Io(e.to_string());
                        }
                        say(cfg, format_args!("-> auth (token refresh)"));
                    }
                    Err(e) => say(cfg, format_args!("token refresh failed: {e}")),
                }
                refresh_at = refresh_every.map(|d| Instant::now() + d);
            }
            frame = next_frame(&mut ws) => {
                let frame = match frame {
                    Ok(f) => f,
                    Err(end) => return end,
                };
                if let Err(e) = on_frame(cfg, &mut ws, stats, outbox, frame).await {
                    return e;
                }
            }
        }
    }
}

async fn send_event(
    cfg: &DeviceConfig,
    ws: &mut Ws,
    stats: &Stats,
    outbox: &mut Outbox,
) -> Result<(), SessionEnd> {
    let (id, text) = match outbox.resend.pop_front() {
        Some(e) => e,
        None => {
            outbox.next_seq += 1;
            let seq = outbox.next_seq;
            let data = cfg.events.data.clone().unwrap_or_else(|| {
                let value = (rand::rng().random_range(180..260) as f64) / 10.0;
                json!({"seq": seq, "value": value})
            });
            let mut frame = json!({"type": "event", "name": cfg.events.name, "data": data});
            let id = format!("{}-{seq}", outbox.run);
            if cfg.events.with_ids {
                frame["id"] = json!(id);
            }
            (id, frame.to_string())
        }
    };
    ws.send(Message::text(text.clone()))
        .await
        .map_err(|e| SessionEnd::Io(e.to_string()))?;
    Stats::add(&stats.sent, 1);
    say(cfg, format_args!("-> {text}"));
    if cfg.events.with_ids {
        outbox.in_flight.push_back((id, text));
    }
    Ok(())
}

async fn on_frame(
    cfg: &DeviceConfig,
    ws: &mut Ws,
    stats: &Stats,
    outbox: &mut Outbox,
    frame: ServerFrame,
) -> Result<(), SessionEnd> {
    match frame {
        ServerFrame::Ack { id } => {
            if outbox.settle(&id).is_some() {
                Stats::add(&stats.acked, 1);
            }
            say(cfg, format_args!("<- ack {id}"));
        }
        ServerFrame::Nack { id, code } => {
            Stats::add(&stats.nacked, 1);
            if let Some(text) = outbox.settle(&id) {
                outbox.resend.push_back((id.clone(), text));
            }
            say(
                cfg,
                format_args!("<- nack {id} ({code}): will send it again"),
            );
        }
        ServerFrame::Error { code, message } => {
            Stats::add(&stats.errors, 1);
            say(cfg, format_args!("<- error {code}: {message}"));
        }
        ServerFrame::Enrolled { .. } => say(cfg, format_args!("<- enrolled")),
        ServerFrame::Renewed { expires_at, .. } => {
            say(cfg, format_args!("<- renewed, expires_at={expires_at}"))
        }
        ServerFrame::Event {
            id,
            name,
            data,
            extra,
        } => {
            Stats::add(&stats.events_in, 1);
            let extra = if extra.is_empty() {
                String::new()
            } else {
                format!(" extra={}", Value::Object(extra))
            };
            say(
                cfg,
                format_args!("<- event {name} id={id} data={data}{extra}"),
            );
        }
        ServerFrame::Request {
            id,
            name,
            data,
            deadline,
            ..
        } => {
            Stats::add(&stats.requests, 1);
            say(
                cfg,
                format_args!("<- request {name} id={id} data={data} deadline={deadline}"),
            );
            match cfg.answer.respond(&id, &name, &data) {
                Some(response) => {
                    let text = response.to_string();
                    ws.send(Message::text(text.clone()))
                        .await
                        .map_err(|e| SessionEnd::Io(e.to_string()))?;
                    Stats::add(&stats.answered, 1);
                    say(cfg, format_args!("-> {text}"));
                }
                None => say(cfg, format_args!("   (silent: not answering {id})")),
            }
        }
        ServerFrame::Welcome { expires_at, .. } => {
            say(
                cfg,
                format_args!("<- welcome (token refreshed, expires_at={expires_at})"),
            );
        }
        ServerFrame::Hello { .. } => say(cfg, format_args!("<- hello (unexpected)")),
        ServerFrame::Registered { services } => match services {
            Some(s) => say(cfg, format_args!("<- registered: services {s:?}")),
            None => say(cfg, format_args!("<- registered (no services declared)")),
        },
    }
    Ok(())
}

fn say(cfg: &DeviceConfig, what: fmt::Arguments<'_>) {
    if let Output::Print { label } = &cfg.output {
        // Not println!: a closed pipe must not panic the simulator.
        let _ = writeln!(std::io::stdout().lock(), "[{label}] {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_credentials_refresh_before_expiry() {
        let signer = Signer::hmac(&[7u8; 32], None).unwrap();
        let c = Credentials::Mint {
            signer: Arc::new(signer),
            spec: TokenSpec::new(Uuid::new_v4(), Duration::from_secs(100)),
        };
        assert_eq!(c.refresh_after(), Some(Duration::from_secs(80)));
        assert!(c.token().unwrap().split('.').count() == 3);
        assert_eq!(Credentials::Token("t".into()).refresh_after(), None);
    }
}
