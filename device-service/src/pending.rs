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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mosaic_amqp::Incoming;
use mosaic_protocol::command::ReplyKind;
use mosaic_protocol::header;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;
use uuid::Uuid;

use crate::relay::header_str;

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
    /// The connection to the broker was lost while waiting.
    BrokerLost,
}

/// The map is full.
#[derive(Debug, thiserror::Error)]
#[error("too many requests are waiting for devices")]
pub struct Full;

/// Requests waiting for answers, bounded.
#[derive(Debug)]
pub struct Pending {
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<Reply>>>,
    cap: usize,
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
            cap,
        })
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
            let reply = match header_str(headers, header::KIND).and_then(ReplyKind::parse) {
                Some(ReplyKind::Response) => Reply::Response {
                    status: header_str(headers, header::STATUS)
                        .unwrap_or("ok")
                        .to_owned(),
                    data: d.data,
                },
                Some(ReplyKind::Undeliverable) => Reply::Undeliverable {
                    reason: header_str(headers, header::REASON)
                        .unwrap_or("undeliverable")
                        .to_owned(),
                },
                None => {
                    debug!(request = %id, "reply of unknown kind dropped");
                    continue;
                }
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
