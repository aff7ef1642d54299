//! The outbox drainer: publishes what the store's outbox holds, oldest first, and
//! removes each message only once the broker confirmed it.
//!
//! It runs right after a commit of this replica (a wake-up) and every
//! [`POLL_INTERVAL`] otherwise, so messages committed by a replica that died before
//! publishing them are published by whichever replica drains next. One replica
//! drains at a time (the store's lock), so the messages of one device keep their
//! order. Delivery is at least once: a message confirmed but not yet removed when a
//! process dies is published again, with the same `message_id`.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::ShortString;
use mosaic_amqp::{Link, Publish};
use mosaic_protocol::exchange;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics;
use crate::store::{OutboxMessage, Store};

/// How often the outbox is checked without a wake-up.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Messages per drain transaction.
const BATCH: i64 = 100;

/// The exchanges an outbox message may name (the publish API takes static names).
fn exchange_name(name: &str) -> Option<&'static str> {
    [exchange::EVENTS, exchange::COMMANDS, ""]
        .into_iter()
        .find(|e| *e == name)
}

/// Publishes `messages` in order on `link`; returns how many of the first ones the
/// broker confirmed (it stops at the first failure).
async fn publish_all(link: &Arc<Link>, messages: Vec<OutboxMessage>, timeout: Duration) -> usize {
    let mut done = 0;
    for m in messages {
        let Some(exchange) = exchange_name(&m.exchange) else {
            warn!(exchange = %m.exchange, "outbox message for an unknown exchange dropped");
            done += 1;
            continue;
        };
        let headers = match amqp_value_json::to_field_table(&m.headers) {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "outbox message with unmappable headers dropped");
                done += 1;
                continue;
            }
        };
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id(ShortString::from(m.message_id.to_string()))
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(if m.persistent { 2 } else { 1 });
        let publish = Publish {
            exchange,
            routing_key: m.routing_key,
            mandatory: false,
            properties,
            body: m.body,
        };
        match link.publish(0, publish, timeout).await {
            Ok(_) => done += 1,
            Err(e) => {
                debug!(error = %e, "outbox publish not confirmed; retrying later");
                break;
            }
        }
    }
    done
}

/// Drains the outbox until `cancel`.
pub async fn drain(
    store: Store,
    mut links: watch::Receiver<Option<Arc<Link>>>,
    wake: Arc<Notify>,
    publish_timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = links.changed() => {}
            _ = cancel.cancelled() => return,
        }
        loop {
            let link = match &*links.borrow() {
                Some(l) if l.can_publish() => l.clone(),
                _ => break,
            };
            let drained = store
                .drain_outbox(BATCH, |messages| async move {
                    publish_all(&link, messages, publish_timeout).await
                })
                .await;
            match drained {
                Ok(Some(n)) => {
                    if n > 0 {
                        metrics::outbox_published(n);
                    }
                    if n < BATCH as usize {
                        if let Ok(pending) = store.outbox_len().await {
                            metrics::outbox_pending(pending);
                        }
                        break;
                    }
                }
                // Another replica drains now.
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "outbox drain failed; retrying later");
                    break;
                }
            }
            if cancel.is_cancelled() {
                return;
            }
        }
    }
}
