//! Commands: what Hive sends towards devices, as messages on `mosaic.commands`.
//!
//! An event is published `mandatory` with its device's routing key (or `broadcast`)
//! and confirmed; a message no gateway queue takes comes back, which means no
//! gateway holds the device. A request also names this replica's reply queue and
//! waits for the gateway's answer (the device's, or "undeliverable" with a reason).
//! Plain Rust in and out: the HTTP layer (`api`) maps [`CommandError`] to answers.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use mosaic_amqp::{Link, Publish, PublishError, Routed};
use mosaic_protocol::command::{Kind, RESERVED_FIELDS, undeliverable};
use mosaic_protocol::frame::MAX_NAME_CHARS;
use mosaic_protocol::{exchange, header};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::broker::long;
use crate::pending::{Full, Pending, Reply};

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One device.
    Device(Uuid),
    /// Every connected device.
    Broadcast,
}

/// Why a command was not sent, or got no answer. Sorted by who is at fault: the
/// caller's input, the device, or the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// `name` is empty or too long.
    #[error("field `name` must have 1 to {MAX_NAME_CHARS} characters")]
    BadName,
    /// An extra field uses a name the gateway builds the device frame from.
    #[error("field `{0}` is reserved")]
    Reserved(String),
    /// An extra field is named for RabbitMQ, or the extra fields are too large.
    #[error(transparent)]
    Extra(#[from] header::ExtraError),
    /// An extra field cannot be carried in AMQP headers.
    #[error("extra fields: {0}")]
    Unmappable(#[from] amqp_value_json::Error),
    /// The headers table would not fit in one AMQP content-header frame.
    #[error(
        "the extra fields take {len} bytes as AMQP headers; at most {max} fit in one message header"
    )]
    TableTooLarge {
        /// The table's encoded size.
        len: usize,
        /// The largest that fits.
        max: usize,
    },
    /// No gateway holds the device.
    #[error("no gateway holds this device")]
    NotConnected,
    /// The gateway could not deliver the request (the device left, or moved).
    #[error("the request could not be delivered: {0}")]
    Undeliverable(String),
    /// The device declared its services, and the request's name is not one of them.
    #[error("the device does not offer the service `{0}`")]
    ServiceNotSupported(String),
    /// The device is connected but cannot take more now.
    #[error("the device is connected but cannot take more requests now; try again shortly")]
    DeviceBusy,
    /// The device did not answer in time.
    #[error("the device did not answer within {0} ms")]
    Timeout(u64),
    /// The device answered something that is not JSON.
    #[error("the device's answer is not JSON")]
    BadReply,
    /// Too many requests wait in this replica.
    #[error(transparent)]
    Overloaded(#[from] Full),
    /// RabbitMQ is unreachable, blocks publishers, or did not confirm in time.
    #[error("the message broker is unavailable; try again later")]
    BrokerUnavailable,
}

impl From<PublishError> for CommandError {
    fn from(e: PublishError) -> Self {
        warn!(error = %e, "publishing a command failed");
        match e {
            PublishError::HeadersTooLarge { bytes, max } => {
                CommandError::TableTooLarge { len: bytes, max }
            }
            _ => CommandError::BrokerUnavailable,
        }
    }
}

/// A device's answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The device's status (`ok`, `error` or its own).
    pub status: String,
    /// The device's data.
    pub data: Value,
}

/// Checks the name and extra fields of an event or request and builds its headers
/// table (with `deadline` for a request). The table must fit in one AMQP
/// content-header frame of the default size ([`mosaic_amqp::max_headers_bytes`]);
/// the link checks the negotiated size again when publishing.
pub fn headers(
    kind: Kind,
    id: Uuid,
    name: &str,
    extra: &Map<String, Value>,
    deadline: Option<&str>,
) -> Result<FieldTable, CommandError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(CommandError::BadName);
    }
    if let Some(k) = extra.keys().find(|k| RESERVED_FIELDS.contains(&k.as_str())) {
        return Err(CommandError::Reserved(k.clone()));
    }
    header::check_extra(extra)?;
    let mut table = amqp_value_json::to_field_table(extra)?;
    table.insert(header::KIND.into(), long(kind.as_str()));
    table.insert(header::ID.into(), long(&id.to_string()));
    table.insert(header::NAME.into(), long(name));
    if let Some(deadline) = deadline {
        table.insert(header::DEADLINE.into(), long(deadline));
    }
    let len = amqp_value_json::encoded_len(&table);
    let max = mosaic_amqp::max_headers_bytes(0);
    if len > max {
        return Err(CommandError::TableTooLarge { len, max });
    }
    Ok(table)
}

fn properties(id: Uuid, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_headers(headers)
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type("application/json".into())
        .with_delivery_mode(1)
}

/// Sends commands on the broker link and waits for answers.
#[derive(Debug, Clone)]
pub struct Commands {
    /// The broker link, `None` while disconnected.
    pub link: watch::Receiver<Option<Arc<Link>>>,
    /// Requests waiting for answers.
    pub pending: Arc<Pending>,
    /// Bound on each publish and its confirm.
    pub publish_timeout: Duration,
    /// This replica's reply queue (the `reply_to` of its requests).
    pub reply_queue: ShortString,
}

impl Commands {
    /// The link, when it can publish now.
    pub fn link(&self) -> Result<Arc<Link>, CommandError> {
        match &*self.link.borrow() {
            Some(l) if l.can_publish() => Ok(l.clone()),
            _ => Err(CommandError::BrokerUnavailable),
        }
    }

    /// Sends an event (fire and forget); returns its id once a gateway queue took it
    /// (a broadcast is accepted even when no device is connected).
    pub async fn event(
        &self,
        target: Target,
        name: &str,
        data: &Value,
        extra: &Map<String, Value>,
    ) -> Result<Uuid, CommandError> {
        let id = Uuid::now_v7();
        let table = headers(Kind::Event, id, name, extra, None)?;
        let link = self.link()?;
        let (key, mandatory) = match target {
            Target::Device(d) => (exchange::device_key(d), true),
            Target::Broadcast => (exchange::BROADCAST_KEY.to_owned(), false),
        };
        let m = Publish {
            exchange: exchange::COMMANDS,
            routing_key: key,
            mandatory,
            properties: properties(id, table),
            body: serde_json::to_vec(data).expect("JSON values serialize"),
        };
        match link.publish(0, m, self.publish_timeout).await? {
            Routed::Returned if mandatory => Err(CommandError::NotConnected),
            _ => Ok(id),
        }
    }

    /// Sends a request to one device and waits for its answer; `timeout` bounds the
    /// whole call, the publish's confirm included. Returns the request's id too.
    pub async fn request(
        &self,
        device: Uuid,
        name: &str,
        data: &Value,
        extra: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<(Uuid, Answer), CommandError> {
        let id = Uuid::now_v7();
        let deadline = time::OffsetDateTime::now_utc() + timeout;
        let deadline = deadline
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a current time formats as RFC 3339");
        let table = headers(Kind::Request, id, name, extra, Some(&deadline))?;
        let link = self.link()?;
        let mut ticket = self.pending.register(id)?;
        let timeout_ms = timeout.as_millis() as u64;
        let props = properties(id, table)
            .with_reply_to(self.reply_queue.clone())
            .with_correlation_id(ShortString::from(id.to_string()))
            .with_expiration(ShortString::from(timeout_ms.to_string()));
        let m = Publish {
            exchange: exchange::COMMANDS,
            routing_key: exchange::device_key(device),
            mandatory: true,
            properties: props,
            body: serde_json::to_vec(data).expect("JSON values serialize"),
        };
        let publish_and_wait = async {
            if link.publish(0, m, self.publish_timeout).await? == Routed::Returned {
                return Err(CommandError::NotConnected);
            }
            // The answer comes to this link's reply queue: if the link goes, so does
            // the queue, and no answer will come.
            Ok(tokio::select! {
                r = &mut ticket.rx => r.unwrap_or(Reply::BrokerLost),
                _ = link.lost().cancelled() => Reply::BrokerLost,
            })
        };
        let reply = match tokio::time::timeout(timeout, publish_and_wait).await {
            Ok(r) => r?,
            Err(_) => return Err(CommandError::Timeout(timeout_ms)),
        };
        match reply {
            Reply::Response { status, data } => {
                let data = if data.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(&data).map_err(|e| {
                        debug!(error = %e, "device answer is not JSON");
                        CommandError::BadReply
                    })?
                };
                Ok((id, Answer { status, data }))
            }
            Reply::Undeliverable { reason } if reason == undeliverable::DEVICE_BUSY => {
                Err(CommandError::DeviceBusy)
            }
            Reply::Undeliverable { reason } if reason == undeliverable::SERVICE_NOT_SUPPORTED => {
                Err(CommandError::ServiceNotSupported(name.to_owned()))
            }
            Reply::Undeliverable { reason } => Err(CommandError::Undeliverable(reason)),
            Reply::BrokerLost | Reply::Fleet(_) => Err(CommandError::BrokerUnavailable),
        }
    }
}
