//! The `mosaic.revocations` stream, read by every replica from its first entry on
//! every new broker link (see `crate::revocations` for what is kept).
//!
//! On a new link the replica appends a marker of its own to the stream; once it reads
//! that marker back it holds every revocation made before, and only then is it
//! ready. A revocation that arrives closes the device's live session here (4403
//! "revoked") when its token is older.

use std::sync::Arc;

use lapin::BasicProperties;
use mosaic_amqp::Incoming;
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::registry as wire;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::gateway::Gateway;
use crate::message::Outgoing;

fn header<'a>(h: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    h.get(name)
}

/// The marker this replica writes on link `generation`.
fn marker(gw: &Gateway, generation: u64) -> String {
    format!("{}-{generation}", gw.id)
}

/// Appends this replica's marker for link `generation` to the stream.
fn marker_message(gw: &Gateway, generation: u64) -> Outgoing {
    let mut h = Map::new();
    h.insert("kind".into(), wire::KIND_MARKER.into());
    h.insert(wire::MARKER.into(), marker(gw, generation).into());
    Outgoing {
        device: Uuid::nil(),
        exchange: "",
        routing_key: wire::REVOCATIONS_STREAM.to_owned(),
        mandatory: true,
        properties: BasicProperties::default()
            .with_headers(amqp_value_json::to_field_table(&h).expect("marker headers fit")),
        body: b"null".to_vec(),
    }
}

/// Reads the stream's deliveries until their channel ends; on every new link,
/// appends this replica's marker (again after a second until the broker confirms it).
pub(crate) async fn run(gw: Arc<Gateway>, mut deliveries: mpsc::Receiver<Incoming>) {
    let Some(mut links) = gw.broker.links() else {
        return;
    };
    let mut marked = 0u64;
    loop {
        let generation = links
            .borrow_and_update()
            .as_ref()
            .map_or(0, |l| l.generation());
        if generation != 0 && generation != marked {
            match gw.broker.publish(marker_message(&gw, generation)).await {
                Ok(()) => marked = generation,
                Err(e) => {
                    tracing::debug!(error = %e, "revocations marker not confirmed; again soon")
                }
            }
        }
        let retry = generation != marked;
        tokio::select! {
            d = deliveries.recv() => {
                let Some(incoming) = d else { return };
                handle(&gw, &incoming, incoming.link.generation());
                incoming.ack().await;
            }
            r = links.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)), if retry => {}
        }
    }
}

fn handle(gw: &Gateway, incoming: &Incoming, generation: u64) {
    let Some(h) = incoming
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|t| amqp_value_json::from_field_table(t).ok())
    else {
        return;
    };
    match header(&h, "kind").and_then(Value::as_str) {
        Some(wire::KIND_REVOCATION) => {
            let device = header(&h, wire::DEVICE)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok());
            let at = header(&h, wire::REVOKED_AT).and_then(Value::as_u64);
            let (Some(device), Some(at)) = (device, at) else {
                tracing::debug!("malformed revocation ignored");
                return;
            };
            let at = gw.revocations.revoke(device, at);
            if let Some(session) = gw.registry.get(device)
                && session.control.issued_at().is_none_or(|iat| iat <= at)
            {
                tracing::info!(%device, "closing a session whose token was revoked");
                session.control.close(DisconnectReason::Revoked);
            }
        }
        Some(wire::KIND_MARKER)
            if header(&h, wire::MARKER).and_then(Value::as_str)
                == Some(&marker(gw, generation)) =>
        {
            tracing::info!(generation, "revocations caught up");
            gw.revocations.caught_up_on(generation);
            gw.update_readiness();
        }
        _ => {}
    }
}
