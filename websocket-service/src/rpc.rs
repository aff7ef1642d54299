//! Requests to device-service (enrol, renew) over RabbitMQ, and their answers.
//!
//! A request goes to the shared queue `mosaic.device-service.rpc` through the
//! default exchange, `mandatory` (the queue exists only while a device-service
//! consumes it, so "nobody to ask" is known at once), with this replica's queue as
//! `reply_to` and a fresh `correlation_id`. The answer comes back on the replica's
//! queue ([`Rpc::answer`], from the command consumer). Every wait is bounded by
//! `RPC_TIMEOUT_MS`, and at most [`MAX_PENDING`] requests wait at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::ShortString;
use mosaic_protocol::registry::{RPC_QUEUE, RpcReply, RpcRequest};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::broker::{Broker, PublishError};
use crate::message::Outgoing;
use crate::metrics;

/// Requests waiting for device-service at once, per replica.
pub const MAX_PENDING: usize = 4096;

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RpcError {
    /// No device-service consumes requests now.
    #[error("no device-service takes requests now")]
    NoService,
    /// The broker is unreachable, the request was not confirmed, no answer came in
    /// time, or too many requests wait.
    #[error("device-service did not answer in time")]
    Unavailable,
}

/// The requests waiting for answers.
#[derive(Debug)]
pub(crate) struct Rpc {
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<RpcReply>>>,
    reply_to: String,
    timeout: Duration,
}

/// Forgets a request when its wait ends, however it ends.
struct Ticket<'a>(&'a Rpc, Uuid);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

impl Rpc {
    /// Requests answered on `reply_to` (this replica's queue), each waiting at most
    /// `timeout`.
    pub fn new(reply_to: String, timeout: Duration) -> Self {
        Rpc {
            waiting: Mutex::default(),
            reply_to,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, oneshot::Sender<RpcReply>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` and waits for the answer (at most the timeout).
    pub async fn call(
        &self,
        broker: &Broker,
        request: &RpcRequest,
        device: Uuid,
    ) -> Result<RpcReply, RpcError> {
        let op = match request {
            RpcRequest::Enrol { .. } => "enrol",
            RpcRequest::Renew { .. } => "renew",
        };
        let result = self.ask(broker, request, device).await;
        metrics::rpc(
            op,
            match &result {
                Ok(RpcReply::Token { .. }) => "token",
                Ok(RpcReply::Refused { .. }) => "refused",
                Err(RpcError::NoService) => "no_service",
                Err(RpcError::Unavailable) => "unavailable",
            },
        );
        result
    }

    async fn ask(
        &self,
        broker: &Broker,
        request: &RpcRequest,
        device: Uuid,
    ) -> Result<RpcReply, RpcError> {
        let id = Uuid::now_v7();
        let (tx, rx) = oneshot::channel();
        {
            let mut map = self.lock();
            if map.len() >= MAX_PENDING {
                return Err(RpcError::Unavailable);
            }
            map.insert(id, tx);
        }
        let _ticket = Ticket(self, id);
        let m = Outgoing {
            device,
            exchange: "",
            routing_key: RPC_QUEUE.to_owned(),
            mandatory: true,
            properties: BasicProperties::default()
                .with_reply_to(ShortString::from(self.reply_to.clone()))
                .with_correlation_id(ShortString::from(id.to_string()))
                .with_expiration(ShortString::from(self.timeout.as_millis().to_string()))
                .with_content_type(ShortString::from("application/json")),
            body: serde_json::to_vec(request).expect("requests serialize"),
        };
        let answer = tokio::time::timeout(self.timeout, async {
            match broker.publish(m).await {
                Ok(()) => rx.await.map_err(|_| RpcError::Unavailable),
                Err(PublishError::Unroutable) => Err(RpcError::NoService),
                Err(_) => Err(RpcError::Unavailable),
            }
        })
        .await;
        answer.unwrap_or(Err(RpcError::Unavailable))
    }

    /// An answer from device-service (a delivery on this replica's queue).
    pub fn answer(&self, d: &Delivery) {
        let Some(id) = d
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|c| Uuid::parse_str(c.as_str()).ok())
        else {
            return;
        };
        let Ok(reply) = serde_json::from_slice::<RpcReply>(&d.data) else {
            tracing::debug!("unreadable answer from device-service dropped");
            return;
        };
        if let Some(tx) = self.lock().remove(&id) {
            let _ = tx.send(reply);
        }
    }
}
