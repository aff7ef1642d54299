//! A whole connection: its channels, its alarm state, and confirmed publishing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Room kept in a content-header frame for everything but the headers table: the
/// frame envelope (7 bytes of header and 1 end octet), class, weight, body size and
/// property flags (14 bytes), and every other property at its largest (ten short
/// strings of up to 256 bytes, delivery mode, priority and timestamp: 2,570 bytes):
/// 2,592 bytes in all, rounded up.
pub const CONTENT_HEADER_RESERVE: usize = 4096;

/// The longest [`Link::ack`] waits for an ack to go out.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a publish channel may get nothing but negative confirms (and at least
/// [`REFUSED_AT_LEAST`] of them) before its link counts as failed and is replaced.
///
/// RabbitMQ nacks a publish it could not store. Some such states belong to the
/// channel, not the message, and last as long as the channel: a quorum-queue
/// publisher whose channel first published while the queue's leader was on a node
/// that had just died keeps asking that node, and every later publish on the channel
/// is nacked, even once the queue has a new leader (RabbitMQ 3.10; seen in the
/// cluster drill). A new connection gets new channels, which find the new leader. A
/// queue that is full with `x-overflow: reject-publish` nacks every publish too;
/// then a new link changes nothing, and the link is replaced once per this period
/// while it lasts.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);

/// The fewest negative confirms in a row, on one channel, that can fail a link.
pub const REFUSED_AT_LEAST: u32 = 5;

/// The negative confirms a publish channel got since its last positive one.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    first: Option<Instant>,
    count: u32,
}

impl Refusals {
    /// Records one confirm at `now`; true when the channel has refused every publish
    /// for [`REFUSED_FOR`] and at least [`REFUSED_AT_LEAST`] times.
    fn record(&mut self, acked: bool, now: Instant) -> bool {
        if acked {
            *self = Refusals::default();
            return false;
        }
        let first = *self.first.get_or_insert(now);
        self.count = self.count.saturating_add(1);
        self.count >= REFUSED_AT_LEAST && now.duration_since(first) >= REFUSED_FOR
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The exchange (`""` is the default exchange).
    pub exchange: &'static str,
    /// The routing key.
    pub routing_key: String,
    /// Return the message when no queue takes it ([`Routed::Returned`]).
    pub mandatory: bool,
    /// Properties and headers.
    pub properties: BasicProperties,
    /// The body.
    pub body: Vec<u8>,
}

/// What became of a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The broker stored it in at least one queue (or, when not `mandatory`, took it).
    Yes,
    /// A `mandatory` message that no queue took came back.
    Returned,
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// There is no connection to the broker right now.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker blocks publishers (a memory or disk alarm).
    #[error("the broker blocks publishers")]
    Blocked,
    /// No confirm came within the timeout.
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    /// The broker refused the message (negative confirm).
    #[error("the broker refused the message")]
    Nacked,
    /// An exchange or routing key longer than AMQP's 255 bytes.
    #[error("exchange or routing key longer than 255 bytes")]
    NameTooLong,
    /// The headers table would not fit in one content-header frame: sent anyway, it
    /// would close the whole connection.
    #[error("headers take {bytes} bytes; at most {max} fit in a header frame")]
    HeadersTooLarge {
        /// The table's encoded size.
        bytes: usize,
        /// The largest table this connection carries.
        max: usize,
    },
    /// The channel failed.
    #[error("channel error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// One live connection with every channel the service asked for. Either the whole
/// link works, or the supervisor drops it and builds a new one: a holder of an
/// `Arc<Link>` never sees half a link repaired under it.
#[derive(Debug)]
pub struct Link {
    pub(crate) conn: Connection,
    pub(crate) publishers: Vec<Channel>,
    pub(crate) consumers: Vec<Channel>,
    pub(crate) consumer_tags: Vec<ShortString>,
    pub(crate) blocked: AtomicBool,
    pub(crate) lost: CancellationToken,
    /// One per publish channel.
    pub(crate) refusals: Vec<Mutex<Refusals>>,
    /// Cancelled when a publish channel has refused every publish for
    /// [`REFUSED_FOR`]: the supervisor replaces the link.
    pub(crate) refused: CancellationToken,
    pub(crate) generation: u64,
}

impl Link {
    /// Counts links since start: a new link has a higher generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the connection and every channel are still open.
    pub fn is_open(&self) -> bool {
        self.conn.status().connected()
            && self.publishers.iter().all(|c| c.status().connected())
            && self.consumers.iter().all(|c| c.status().connected())
    }

    /// Whether the broker blocks publishers now (a memory or disk alarm).
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// Whether a publish can be confirmed now: open, not blocked, and no channel
    /// refusing every publish ([`REFUSED_FOR`]).
    pub fn can_publish(&self) -> bool {
        !self.is_blocked()
            && self.is_open()
            && !self.lost.is_cancelled()
            && !self.refused.is_cancelled()
    }

    /// Whether a publish channel of this link has refused every publish for
    /// [`REFUSED_FOR`] (the supervisor then replaces the link).
    pub fn refused_all(&self) -> bool {
        self.refused.is_cancelled()
    }

    /// Counts a confirm of publish channel `channel`; past [`REFUSED_FOR`] of
    /// nothing but negative ones, marks the link for replacement.
    fn record_confirm(&self, channel: usize, acked: bool) {
        let i = channel % self.refusals.len();
        let refused = self.refusals[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(acked, Instant::now());
        if refused && !self.refused.is_cancelled() {
            warn!(
                channel = i,
                refused_for_ms = REFUSED_FOR.as_millis() as u64,
                "RabbitMQ refuses every publish on a channel; replacing the link"
            );
            self.refused.cancel();
        }
    }

    /// Cancelled when this link is gone: deliveries that came on it can no longer be
    /// acked (the broker requeues them).
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Acks `delivery`, which came on this link; false when it could not be. Never
    /// waits past [`ACK_TIMEOUT`], nor once the link is lost: an ack handed to a
    /// connection whose socket just died can stay unanswered forever, and whoever
    /// awaits it (a loop that acks one delivery before taking the next) would stop
    /// with it. An ack that did not go out is no loss: the broker requeues what a
    /// closed connection had not acked (or drops it with an exclusive queue).
    pub async fn ack(&self, delivery: &lapin::message::Delivery) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        let ack = delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default());
        tokio::select! {
            r = tokio::time::timeout(ACK_TIMEOUT, ack) => matches!(r, Ok(Ok(_))),
            _ = self.lost.cancelled() => false,
        }
    }

    /// Publish channel `i` (modulo their number): every message and binding about one
    /// thing that must stay in order goes through the same channel.
    pub fn channel(&self, i: usize) -> &Channel {
        &self.publishers[i % self.publishers.len()]
    }

    /// Opens a channel outside the link's monitored set: when the broker closes it (a
    /// refused exclusive declare, say: 405 `RESOURCE_LOCKED`), only that channel
    /// ends, and the link stays whole. The caller owns it, and it goes with the
    /// connection.
    pub async fn open_channel(&self) -> Result<Channel, lapin::Error> {
        self.conn.create_channel().await
    }

    /// How many publish channels the link has.
    pub fn channels(&self) -> usize {
        self.publishers.len()
    }

    /// The largest headers table a publish on this connection may carry: the
    /// negotiated `frame_max` less the rest of a content-header frame.
    pub fn max_headers_bytes(&self) -> usize {
        max_headers_bytes(self.conn.configuration().frame_max())
    }

    /// Publishes `m` on channel `channel` and waits for the broker's confirm, all within
    /// `timeout`. The future owns what it needs.
    pub fn publish(
        self: &Arc<Self>,
        channel: usize,
        m: Publish,
        timeout: Duration,
    ) -> impl Future<Output = Result<Routed, PublishError>> + Send + 'static {
        let link = Arc::clone(self);
        async move {
            if link.is_blocked() {
                return Err(PublishError::Blocked);
            }
            if let Some(h) = m.properties.headers() {
                let bytes = amqp_value_json::encoded_len(h);
                let max = link.max_headers_bytes();
                if bytes > max {
                    return Err(PublishError::HeadersTooLarge { bytes, max });
                }
            }
            let exchange =
                ShortString::try_new(m.exchange).map_err(|_| PublishError::NameTooLong)?;
            let key = ShortString::try_new(m.routing_key).map_err(|_| PublishError::NameTooLong)?;
            let ch = link.channel(channel).clone();
            let confirmed = async move {
                let confirm = ch
                    .basic_publish(
                        exchange,
                        key,
                        BasicPublishOptions {
                            mandatory: m.mandatory,
                            ..Default::default()
                        },
                        &m.body,
                        m.properties,
                    )
                    .await?;
                Ok::<_, PublishError>(confirm.await?)
            };
            let c = match tokio::time::timeout(timeout, confirmed).await {
                Ok(c) => c?,
                Err(_) => return Err(PublishError::Timeout(timeout)),
            };
            link.record_confirm(channel, !c.is_nack());
            if c.is_nack() {
                return Err(PublishError::Nacked);
            }
            Ok(match c.take_message() {
                Some(_) => Routed::Returned,
                None => Routed::Yes,
            })
        }
    }
}

/// A string header's value (a long string that is UTF-8, or a short string).
pub fn header_str<'a>(headers: Option<&'a lapin::types::FieldTable>, key: &str) -> Option<&'a str> {
    use lapin::types::AMQPValue;
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The largest headers table (as encoded on the wire) that fits in a content-header
/// frame of `frame_max` bytes; 0 means RabbitMQ's default of 131,072 (so 126,976).
/// A content header past `frame_max` makes the broker close the whole connection
/// (501 `FRAME_ERROR`).
pub fn max_headers_bytes(frame_max: u32) -> usize {
    let frame_max = if frame_max == 0 {
        131_072
    } else {
        frame_max as usize
    };
    frame_max.saturating_sub(CONTENT_HEADER_RESERVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_fails_after_refusing_everything_for_long_enough() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let window = REFUSED_FOR.as_millis() as u64;
        let mut r = Refusals::default();
        // Many refusals, but not for long enough.
        for i in 0..20 {
            assert!(!r.record(false, at(i)));
        }
        assert!(r.record(false, at(window)));
        // Long enough, but too few.
        let mut r = Refusals::default();
        assert!(!r.record(false, at(0)));
        assert!(!r.record(false, at(window * 3)));
        // One positive confirm starts the count again.
        let mut r = Refusals::default();
        for i in 0..u64::from(REFUSED_AT_LEAST) {
            assert!(!r.record(false, at(i)));
        }
        assert!(!r.record(true, at(window - 1)));
        assert!(!r.record(false, at(window)));
        for i in 0..u64::from(REFUSED_AT_LEAST) {
            assert!(!r.record(false, at(window + 1 + i)));
        }
        assert!(r.record(false, at(window * 2 + 10)));
    }

    #[test]
    fn the_header_budget_leaves_room_for_the_rest_of_the_frame() {
        assert_eq!(max_headers_bytes(0), max_headers_bytes(131_072));
        assert_eq!(max_headers_bytes(131_072), 126_976);
        assert_eq!(max_headers_bytes(1024), 0);
    }
}
