//! Requests from the gateways (enrol, renew) on the shared queue
//! `mosaic.device-service.rpc`, answered to the asking gateway's own queue.
//!
//! Each request is handled in a task of its own, at most [`RPC_PREFETCH`](crate::broker::RPC_PREFETCH) at once (the
//! consumer's prefetch: a delivery is acked once its answer is published). The
//! answer goes through the default exchange to `reply_to`, which must name a
//! gateway queue (`mosaic.gateway.`...): nothing in a request can send the answer
//! anywhere else. A request that is not one is acked and dropped (the gateway's own
//! wait ends it).

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicAckOptions;
use lapin::types::{FieldTable, ShortString};
use mosaic_amqp::{Incoming, Publish};
use mosaic_protocol::registry::{KIND_RPC_REPLY, RpcReply, RpcRequest};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::broker::long;
use crate::metrics;
use crate::registry::Registry;

/// Largest request body read.
const MAX_REQUEST_BYTES: usize = 4096;
/// Where answers may go.
const GATEWAY_QUEUE_PREFIX: &str = "mosaic.gateway.";

/// Serves requests until their channel ends.
pub async fn serve(
    registry: Registry,
    mut requests: mpsc::Receiver<Incoming>,
    tasks: TaskTracker,
    publish_timeout: Duration,
) {
    while let Some(incoming) = requests.recv().await {
        if incoming.is_stale() {
            continue;
        }
        let registry = registry.clone();
        tasks.spawn(async move {
            handle(&registry, &incoming, publish_timeout).await;
            let _ = incoming
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await;
        });
    }
}

async fn handle(registry: &Registry, incoming: &Incoming, publish_timeout: Duration) {
    let d = &incoming.delivery;
    let reply_to = d
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.to_string())
        .filter(|r| r.starts_with(GATEWAY_QUEUE_PREFIX));
    let (Some(reply_to), Some(correlation)) = (reply_to, d.properties.correlation_id().clone())
    else {
        debug!("gateway request without a gateway reply_to or correlation_id dropped");
        metrics::rpc("unknown", "dropped");
        return;
    };
    let request = (d.data.len() <= MAX_REQUEST_BYTES)
        .then(|| serde_json::from_slice::<RpcRequest>(&d.data).ok())
        .flatten();
    let Some(request) = request else {
        debug!("unreadable gateway request dropped");
        metrics::rpc("unknown", "dropped");
        return;
    };
    let (op, reply) = match request {
        RpcRequest::Enrol { code } => ("enrol", registry.enrol(&code).await),
        RpcRequest::Renew { device } => ("renew", registry.renew(device).await),
    };
    metrics::rpc(
        op,
        match reply {
            RpcReply::Token { .. } => "token",
            RpcReply::Refused { .. } => "refused",
        },
    );
    let mut headers = FieldTable::default();
    headers.insert("kind".into(), long(KIND_RPC_REPLY));
    let m = Publish {
        exchange: "",
        routing_key: reply_to,
        mandatory: false,
        properties: BasicProperties::default()
            .with_headers(headers)
            .with_correlation_id(correlation)
            .with_content_type(ShortString::from("application/json")),
        body: serde_json::to_vec(&reply).expect("replies serialize"),
    };
    if incoming.is_stale() {
        return;
    }
    if let Err(e) = incoming.link.publish(0, m, publish_timeout).await {
        warn!(error = %e, op, "answer to a gateway not confirmed");
    }
}
