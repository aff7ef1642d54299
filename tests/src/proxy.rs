//! A TCP proxy that plays network faults: stall every connection (bytes stop moving,
//! as when a network drops packets), cut every connection, refuse new ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections from [`FaultProxy::addr`] to an upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    refuse: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let refuse = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let (stalled, _) = watch::channel(false);
        let task = tokio::spawn({
            let refuse = refuse.clone();
            let cut = cut.clone();
            let stalled = stalled.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if refuse.load(Ordering::Acquire) {
                        drop(inbound);
                        continue;
                    }
                    let mut cut_rx = cut.subscribe();
                    let stalled = stalled.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        let both = async {
                            tokio::join!(
                                pump(in_read, out_write, stalled.clone()),
                                pump(out_read, in_write, stalled),
                            )
                        };
                        tokio::select! {
                            _ = both => {}
                            _ = cut_rx.changed() => {}
                        }
                    });
                }
            }
        });
        Ok(FaultProxy {
            addr,
            refuse,
            cut,
            stalled,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open through the proxy now; whatever a stall held
    /// back is lost with them.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// While `true`, new connections are accepted and closed at once; set to `false`
    /// to let them through again.
    pub fn set_refusing(&self, refusing: bool) {
        self.refuse.store(refusing, Ordering::Release);
    }

    /// Stops moving bytes on every connection, open or new, in both directions, until
    /// [`FaultProxy::restore`]: a network that drops every packet. Neither peer sees
    /// an error; what they send waits in the sockets' buffers, and is lost if the
    /// connection is [cut](FaultProxy::cut) meanwhile.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// An outage: refuse new connections and cut the open ones.
    pub fn outage(&self) {
        self.set_refusing(true);
        self.cut();
    }

    /// The end of an outage or a stall: new connections are let through and bytes
    /// move again.
    pub fn restore(&self) {
        self.set_refusing(false);
        self.stalled.send_replace(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Copies `from` to `to` until either ends, pausing while `stalled` holds. A read
/// that loses the race with a stall is dropped unfinished (reading a socket is
/// cancel-safe: no byte is lost).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let flowing = stalled.wait_for(|s| !*s).await.is_ok();
        if !flowing {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    // Pass the end on: the other side may still be sending.
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            open = async { stalled.wait_for(|s| *s).await.is_ok() } => {
                if !open {
                    return;
                }
                continue;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
