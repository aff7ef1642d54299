//! A TCP proxy that plays network faults: cut every connection, refuse new ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections from [`FaultProxy::addr`] to an upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    refuse: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let refuse = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let refuse = refuse.clone();
            let cut = cut.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refuse.load(Ordering::Acquire) {
                        drop(inbound);
                        continue;
                    }
                    let mut cut_rx = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
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
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// While `true`, new connections are accepted and closed at once; set to `false`
    /// to let them through again.
    pub fn set_refusing(&self, refusing: bool) {
        self.refuse.store(refusing, Ordering::Release);
    }

    /// An outage: refuse new connections and cut the open ones.
    pub fn outage(&self) {
        self.set_refusing(true);
        self.cut();
    }

    /// The end of an outage.
    pub fn restore(&self) {
        self.set_refusing(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
