//! Requests waiting for a device's answer, and the consumer of this replica's reply
//! queue that answers them.
//!
//! Each replica has its own exclusive, auto-delete queue
//! `mosaic.device-service.replies.<replica id>`, named in the `reply_to` of its
//! requests; a gateway (any replica) publishes the answer there through the default
//! exchange, so the answer reaches the replica that is waiting, whichever gateway
//! held the device. A named queue rather than direct reply-to: it can be consumed on
//! its own channel while any channel publishes, it shows up in the management UI with
//! its replica's name, and a reply that arrives after a reconnect is simply dropped
//! with the old queue.
//!
//! The map is bounded (`MAX_PENDING_REQUESTS`): a request beyond it gets 503 at once.
//!
//! A call that expects many replies to one id (a listing, a scatter-gather request)
//! registers a [`Collector`] instead: every reply with that id goes to it, as a
//! [`ReplyMessage`]. The fleet bounds those calls itself (`MAX_FANOUTS`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mosaic_amqp::Incoming;
use mosaic_protocol::command::ReplyKind;
use mosaic_protocol::header;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;
use uuid::Uuid;

use mosaic_amqp::header_str;

/// How a pending request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The device answered.
    Response {
        /// The device's status.
        status: String,
        /// The device's data, JSON bytes as the gateway sent them.
        data: Vec<u8>,
    },
    /// The gateway could not deliver the request or the device left.
    Undeliverable {
        /// One of `mosaic_protocol::command::undeliverable`.
        reason: String,
    },
    /// A gateway's own answer to a fleet command (`presence`, `kicked`).
    Fleet(ReplyMessage),
    /// The connection to the broker was lost while waiting.
    BrokerLost,
}

/// One message from the reply queue, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMessage {
    /// The request's id (`correlation_id`).
    pub id: Uuid,
    /// What it is.
    pub kind: ReplyKind,
    /// The `device` header.
    pub device: Option<Uuid>,
    /// The `gateway` header.
    pub gateway: Option<Uuid>,
    /// The `status` header (a response).
    pub status: Option<String>,
    /// The `reason` header (an undeliverable request).
    pub reason: Option<String>,
    /// The body.
    pub data: Vec<u8>,
}

/// Takes every reply to one id (see the module docs).
pub trait Collector: Send + Sync + std::fmt::Debug {
    /// One reply; must not block.
    fn offer(&self, m: ReplyMessage);
}

/// The map is full.
#[derive(Debug, thiserror::Error)]
#[error("too many requests are waiting for devices")]
pub struct Full;

/// Requests waiting for answers, bounded.
#[derive(Debug)]
pub struct Pending {
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<Reply>>>,
    collectors: Mutex<HashMap<Uuid, Arc<dyn Collector>>>,
    cap: usize,
}

/// A registered collector; dropping it forgets the id.
#[derive(Debug)]
pub struct Collecting {
    pending: Arc<Pending>,
    id: Uuid,
}

impl Drop for Collecting {
    fn drop(&mut self) {
        self.pending.collectors().remove(&self.id);
    }
}

/// A registered request; dropping it forgets the request.
#[derive(Debug)]
pub struct Ticket {
    pending: Arc<Pending>,
    id: Uuid,
    /// Resolves with the answer.
    pub rx: oneshot::Receiver<Reply>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

impl Pending {
    /// An empty map holding at most `cap` requests.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Pending {
            waiting: Mutex::new(HashMap::new()),
            collectors: Mutex::new(HashMap::new()),
            cap,
        })
    }

    fn collectors(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<dyn Collector>>> {
        self.collectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends every reply to `id` to `collector` until the returned guard drops.
    pub fn collect(self: &Arc<Self>, id: Uuid, collector: Arc<dyn Collector>) -> Collecting {
        self.collectors().insert(id, collector);
        Collecting {
            pending: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, oneshot::Sender<Reply>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers request `id`.
    pub fn register(self: &Arc<Self>, id: Uuid) -> Result<Ticket, Full> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.lock();
        if map.len() >= self.cap {
            return Err(Full);
        }
        map.insert(id, tx);
        Ok(Ticket {
            pending: self.clone(),
            id,
            rx,
        })
    }

    /// Answers request `id`; false when nobody waits for it (any more).
    pub fn answer(&self, id: Uuid, reply: Reply) -> bool {
        match self.lock().remove(&id) {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Answers every waiting request with [`Reply::BrokerLost`].
    pub fn fail_all(&self) {
        for (_, tx) in self.lock().drain() {
            let _ = tx.send(Reply::BrokerLost);
        }
    }

    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the reply queue's deliveries (no-ack) until their channel ends.
    pub async fn consume(self: Arc<Self>, mut replies: mpsc::Receiver<Incoming>) {
        while let Some(Incoming { delivery: d, .. }) = replies.recv().await {
            let headers = d.properties.headers().as_ref();
            let Some(id) = d
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|c| Uuid::parse_str(c.as_str()).ok())
            else {
                debug!("reply without a usable correlation_id dropped");
                continue;
            };
            let Some(kind) = header_str(headers, header::KIND).and_then(ReplyKind::parse) else {
                debug!(request = %id, "reply of unknown kind dropped");
                continue;
            };
            let uuid = |name| header_str(headers, name).and_then(|s| Uuid::parse_str(s).ok());
            let m = ReplyMessage {
                id,
                kind,
                device: uuid(header::DEVICE),
                gateway: uuid(header::GATEWAY),
                status: header_str(headers, header::STATUS).map(str::to_owned),
                reason: header_str(headers, header::REASON).map(str::to_owned),
                data: d.data,
            };
            let collector = self.collectors().get(&id).cloned();
            if let Some(c) = collector {
                c.offer(m);
                continue;
            }
            let reply = match kind {
                ReplyKind::Response => Reply::Response {
                    status: m.status.unwrap_or_else(|| "ok".to_owned()),
                    data: m.data,
                },
                ReplyKind::Undeliverable => Reply::Undeliverable {
                    reason: m.reason.unwrap_or_else(|| "undeliverable".to_owned()),
                },
                _ => Reply::Fleet(m),
            };
            if !self.answer(id, reply) {
                debug!(request = %id, "late reply dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_answered_and_forgotten() {
        let p = Pending::new(2);
        let a = Uuid::now_v7();
        let mut t1 = p.register(a).unwrap();
        let t2 = p.register(Uuid::now_v7()).unwrap();
        assert!(p.register(Uuid::now_v7()).is_err());
        assert!(p.answer(a, Reply::Undeliverable { reason: "x".into() }));
        assert_eq!(
            (&mut t1.rx).await.unwrap(),
            Reply::Undeliverable { reason: "x".into() }
        );
        assert_eq!(p.len(), 1);
        drop(t2);
        assert!(p.is_empty());
        let mut t3 = p.register(Uuid::now_v7()).unwrap();
        p.fail_all();
        assert_eq!((&mut t3.rx).await.unwrap(), Reply::BrokerLost);
    }
}
