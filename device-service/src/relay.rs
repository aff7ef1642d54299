//! The relay: every message on the relay queue becomes a POST to Hive, acked only
//! after Hive's 2xx or after it was safely dead-lettered.
//!
//! Each delivery runs in a task of its own, at most `HIVE_CONCURRENCY` at once (a
//! semaphore, and the same number as the channel's prefetch). A message that fails
//! with a retryable outcome waits inside its own task (exponential backoff with
//! jitter, at least Hive's `Retry-After`) while the other tasks keep delivering, so a
//! failing message never blocks the ones behind it; it only holds one of the slots.
//! When Hive is down, every slot is waiting, the broker keeps the rest of the queue,
//! and nothing spins: the delays are capped at `RETRY_MAX_MS`, not removed. Delivery
//! resumes by itself at the next attempt after Hive is back.
//!
//! A delivery is never held past `HIVE_HOLD_MAX_MS` (RabbitMQ closes a channel that
//! keeps a delivery unacked longer than its `consumer_timeout`): when the next wait
//! would pass that bound, a copy is parked in the retry queue with its attempt
//! count, the original is acked, and RabbitMQ puts the copy back on the relay queue
//! once it expires (after `RETRY_MAX_MS`).
//!
//! Copies (parked or dead-lettered) are built from the original's headers without
//! any name RabbitMQ interprets (`CC`, `BCC`, `x-...`), so nothing in the original
//! can route a copy anywhere else; the service then adds its own `x-mosaic-*` names.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use mosaic_amqp::{Incoming, Link, Publish, Routed, header_str};
use mosaic_protocol::header;
use rand::Rng;
use reqwest::header::HeaderValue;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::broker::{DEAD_LETTER_QUEUE, RETRY_QUEUE, long};
use crate::hive::{self, Hive, Outcome};
use crate::metrics;

/// Dead-letter header: why the message was dead-lettered ([`reason`]).
pub const REASON_HEADER: &str = "x-mosaic-reason";
/// Dead-letter header: Hive's last HTTP status (0 when Hive never answered).
pub const STATUS_HEADER: &str = "x-mosaic-status";
/// Dead-letter header: how many POSTs were made.
pub const ATTEMPTS_HEADER: &str = "x-mosaic-attempts";
/// Dead-letter header: the last error, truncated.
pub const LAST_ERROR_HEADER: &str = "x-mosaic-last-error";
/// Dead-letter header: the original exchange.
pub const EXCHANGE_HEADER: &str = "x-mosaic-exchange";
/// Dead-letter header: the original routing key.
pub const ROUTING_KEY_HEADER: &str = "x-mosaic-routing-key";
/// Parked copies: the POSTs made before the copy was parked (the count goes on).
pub const PARKED_ATTEMPTS_HEADER: &str = "x-mosaic-parked-attempts";

/// Values of [`REASON_HEADER`].
pub mod reason {
    /// Hive answered a status that is not retried (4xx other than 408 and 429, 3xx).
    pub const REJECTED: &str = "rejected";
    /// Retryable failures went on past `HIVE_MAX_ATTEMPTS` or `HIVE_MAX_AGE_MS`.
    pub const EXHAUSTED: &str = "exhausted";
    /// The message cannot be turned into a POST (no message id, headers or body not JSON).
    pub const MALFORMED: &str = "malformed";
}

/// When to try again and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// Age (since the gateway received the message) after which a failing message is given up.
    pub max_age: Duration,
}

impl RetryPolicy {
    /// The delay after attempt `attempt` (1-based): `base * 2^(attempt-1)`, capped at
    /// `max`, then a random point in its upper half (jitter), then at least
    /// `retry_after` (itself capped at `max_age`).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let half = exp / 2;
        let jittered = half + rand::rng().random_range(Duration::ZERO..=exp - half);
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.max_age)),
            None => jittered,
        }
    }

    /// Whether to stop retrying after `attempts` POSTs, for a message this old.
    pub fn exhausted(&self, attempts: u32, age: Duration) -> bool {
        attempts >= self.max_attempts || age >= self.max_age
    }
}

/// What every delivery task needs.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The HTTP client towards Hive.
    pub hive: Hive,
    /// Retry policy.
    pub policy: RetryPolicy,
    /// Longest one replica holds a failing delivery before parking it.
    pub hold_max: Duration,
    /// Slots for deliveries in flight.
    pub slots: Arc<Semaphore>,
    /// Tracks every delivery task, for the shutdown drain.
    pub tasks: TaskTracker,
    /// Cancelled at shutdown: waiting tasks hand their message back at once.
    pub shutdown: CancellationToken,
    /// Bound on broker round trips (dead-letter publish).
    pub publish_timeout: Duration,
    /// Where lifecycle messages note sightings (`last_seen`, activation) for the
    /// registry, when one is configured; never waited for.
    pub seen: Option<Arc<crate::seen::Seen>>,
}

impl Relay {
    /// Takes deliveries until their channel ends or shutdown, each in its own task.
    pub async fn consume(self: Arc<Self>, mut deliveries: mpsc::Receiver<Incoming>) {
        loop {
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = self.shutdown.cancelled() => return,
            };
            let incoming = tokio::select! {
                d = deliveries.recv() => d,
                _ = self.shutdown.cancelled() => return,
            };
            let Some(incoming) = incoming else {
                info!("relay deliveries ended");
                return;
            };
            if incoming.is_stale() {
                // Its connection is gone: the broker redelivers it.
                continue;
            }
            if let Some(seen) = &self.seen {
                seen.observe(&incoming.delivery);
            }
            let this = Arc::clone(&self);
            let span = tracing::info_span!(
                "delivery",
                routing_key = %incoming.delivery.routing_key,
                redelivered = incoming.delivery.redelivered,
            );
            self.tasks.spawn(
                async move {
                    this.deliver(&incoming.delivery, &incoming.link).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    /// Delivers one message: POST until 2xx, park, dead-letter, or shutdown. When
    /// `link` is lost the broker has requeued the message already, so the task lets
    /// it go.
    async fn deliver(&self, delivery: &Delivery, link: &Arc<Link>) {
        let link_lost = link.lost();
        let held_since = Instant::now();
        let headers = delivery.properties.headers().as_ref();
        let message_id = header_str(headers, header::MESSAGE_ID).or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str())
        });
        // Checked once here: a message id that cannot be an HTTP header value would
        // fail every POST, so it is malformed rather than worth retrying.
        let Some((message_id, idempotency_key)) =
            message_id.and_then(|m| Some((m, HeaderValue::from_str(m).ok()?)))
        else {
            let error = "the message has no usable message_id";
            return self
                .dead_letter(delivery, link, Failure::malformed(error), link_lost)
                .await;
        };
        let body = match hive::body(headers, &delivery.data) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                return self
                    .dead_letter(delivery, link, Failure::malformed(e.to_string()), link_lost)
                    .await;
            }
        };
        let first_seen = SystemTime::now();
        let received_at = header_str(headers, header::RECEIVED_AT).and_then(parse_rfc3339);
        let mut attempts = parked_attempts(headers);
        loop {
            attempts += 1;
            let started = std::time::Instant::now();
            let outcome = self.hive.post(&idempotency_key, body.clone()).await;
            metrics::hive_attempt(outcome.label(), started.elapsed());
            match outcome {
                Outcome::Delivered => {
                    if !link.ack(delivery).await {
                        // The broker will deliver it again: at least once.
                        warn!(message_id, "ack after delivery failed");
                    }
                    debug!(message_id, attempts, "delivered");
                    metrics::delivery_finished("delivered");
                    return;
                }
                Outcome::Rejected { status, error } => {
                    info!(
                        message_id,
                        status, attempts, "Hive refused the message; dead-lettering"
                    );
                    return self
                        .dead_letter(
                            delivery,
                            link,
                            Failure {
                                why: reason::REJECTED,
                                status,
                                attempts,
                                error,
                            },
                            link_lost,
                        )
                        .await;
                }
                Outcome::Retry {
                    status,
                    retry_after,
                    error,
                } => {
                    let now = SystemTime::now();
                    let age = now
                        .duration_since(received_at.unwrap_or(first_seen))
                        .unwrap_or_default();
                    if self.policy.exhausted(attempts, age) {
                        warn!(
                            message_id,
                            attempts,
                            ?age,
                            error,
                            "giving up; dead-lettering"
                        );
                        return self
                            .dead_letter(
                                delivery,
                                link,
                                Failure {
                                    why: reason::EXHAUSTED,
                                    status: status.unwrap_or(0),
                                    attempts,
                                    error,
                                },
                                link_lost,
                            )
                            .await;
                    }
                    let delay = self.policy.delay(attempts, retry_after);
                    if held_since.elapsed() + delay > self.hold_max {
                        debug!(message_id, attempts, "held long enough; parking");
                        return self.park(delivery, link, attempts).await;
                    }
                    info!(
                        message_id,
                        attempts,
                        status,
                        ?delay,
                        error,
                        "Hive failed; retrying"
                    );
                    // Shutdown first: at shutdown `link_lost` fires too, and the
                    // message must go back now, not when the connection closes.
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => {
                            debug!(message_id, "shutting down; handing the message back");
                            return requeue(delivery).await;
                        }
                        _ = link_lost.cancelled() => {
                            debug!(message_id, "connection lost; the broker redelivers the message");
                            metrics::delivery_finished("requeued");
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Publishes a copy to the retry queue (confirmed), then acks the original; the
    /// copy comes back to the relay queue when it expires. When that publish fails,
    /// the original goes back to the queue at once.
    async fn park(&self, delivery: &Delivery, link: &Arc<Link>, attempts: u32) {
        let mut headers = copy_headers(delivery.properties.headers().as_ref());
        headers.insert(
            PARKED_ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        let expiration = self.policy.max.as_millis().to_string();
        let props =
            copy_properties(delivery, headers).with_expiration(ShortString::from(expiration));
        let copy = Publish {
            exchange: "",
            routing_key: RETRY_QUEUE.to_owned(),
            mandatory: true,
            properties: props,
            body: delivery.data.clone(),
        };
        match link.publish(0, copy, self.publish_timeout).await {
            Ok(Routed::Yes) => {
                if !link.ack(delivery).await {
                    // The original comes back too: delivered at least once.
                    warn!("ack after parking failed");
                }
                metrics::delivery_finished("parked");
            }
            other => {
                warn!(result = ?other, "cannot park the message; handing it back");
                requeue(delivery).await;
            }
        }
    }

    /// Publishes a copy to the dead-letter queue (confirmed), then acks the original.
    /// When that publish fails, the original goes back to the queue after a pause.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        link: &Arc<Link>,
        failure: Failure,
        link_lost: &CancellationToken,
    ) {
        let Failure {
            why,
            status,
            attempts,
            error,
        } = failure;
        let mut headers = copy_headers(delivery.properties.headers().as_ref());
        headers.insert(REASON_HEADER.into(), long(why));
        headers.insert(
            STATUS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(status)),
        );
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        headers.insert(LAST_ERROR_HEADER.into(), long(truncate(&error, 1024)));
        headers.insert(EXCHANGE_HEADER.into(), long(delivery.exchange.as_str()));
        headers.insert(
            ROUTING_KEY_HEADER.into(),
            long(delivery.routing_key.as_str()),
        );
        let copy = Publish {
            exchange: "",
            routing_key: DEAD_LETTER_QUEUE.to_owned(),
            mandatory: true,
            properties: copy_properties(delivery, headers),
            body: delivery.data.clone(),
        };
        let error = match link.publish(0, copy, self.publish_timeout).await {
            Ok(Routed::Yes) => {
                if !link.ack(delivery).await {
                    warn!("ack after dead-lettering failed");
                }
                metrics::dead_lettered(why);
                metrics::delivery_finished("dead_lettered");
                return;
            }
            Ok(Routed::Returned) => "the dead-letter queue is missing".to_owned(),
            Err(e) => e.to_string(),
        };
        warn!(error, "cannot dead-letter; handing the message back later");
        tokio::select! {
            _ = tokio::time::sleep(self.policy.max) => {}
            _ = self.shutdown.cancelled() => {}
            _ = link_lost.cancelled() => {}
        }
        requeue(delivery).await;
    }
}

/// The original's headers for a copy: without any name RabbitMQ interprets
/// (`CC`, `BCC`, `x-...` in any letter case), so nothing from the original can route
/// the copy elsewhere or drive a broker feature. This service's own `x-mosaic-*`
/// names go too; each kind of copy adds the ones it needs.
pub fn copy_headers(original: Option<&FieldTable>) -> FieldTable {
    let mut t = FieldTable::default();
    if let Some(original) = original {
        for (k, v) in original.inner() {
            if !mosaic_protocol::header::is_broker_reserved(k.as_str()) {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    t
}

fn copy_properties(delivery: &Delivery, headers: FieldTable) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(id) = delivery.properties.message_id() {
        props = props.with_message_id(id.clone());
    }
    if let Some(t) = delivery.properties.timestamp() {
        props = props.with_timestamp(*t);
    }
    props
}

/// The attempts a parked copy had made before it was parked.
fn parked_attempts(headers: Option<&FieldTable>) -> u32 {
    let value = headers.and_then(|h| h.inner().get(PARKED_ATTEMPTS_HEADER));
    match value {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// Why a message goes to the dead-letter queue.
#[derive(Debug)]
struct Failure {
    why: &'static str,
    status: u16,
    attempts: u32,
    error: String,
}

impl Failure {
    fn malformed(error: impl Into<String>) -> Self {
        Failure {
            why: reason::MALFORMED,
            status: 0,
            attempts: 0,
            error: error.into(),
        }
    }
}

/// Hands the message back to the queue (if the connection is gone, the broker has
/// requeued it already).
async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
    metrics::delivery_finished("requeued");
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            max_attempts: 5,
            max_age: Duration::from_secs(60),
        }
    }

    #[test]
    fn delays_grow_jittered_and_capped() {
        let p = policy();
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d40 = p.delay(40, None);
            assert!(d40 >= Duration::from_millis(2500) && d40 <= Duration::from_secs(5));
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_max_age() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(600))),
            Duration::from_secs(60)
        );
        assert!(p.delay(1, Some(Duration::ZERO)) >= Duration::from_millis(50));
    }

    #[test]
    fn gives_up_on_attempts_or_age() {
        let p = policy();
        assert!(!p.exhausted(4, Duration::from_secs(59)));
        assert!(p.exhausted(5, Duration::ZERO));
        assert!(p.exhausted(1, Duration::from_secs(60)));
    }

    #[test]
    fn headers_read_as_strings() {
        let mut t = FieldTable::default();
        t.insert("a".into(), long("x"));
        t.insert("n".into(), AMQPValue::LongLongInt(1));
        assert_eq!(header_str(Some(&t), "a"), Some("x"));
        assert_eq!(header_str(Some(&t), "n"), None);
        assert_eq!(header_str(None, "a"), None);
        assert!(parse_rfc3339("2026-01-02T03:04:05.123456Z").is_some());
    }
}
