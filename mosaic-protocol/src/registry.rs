//! The device registry on the bus: its change messages, the revocations stream, and
//! the requests a gateway makes to device-service for enrolment and renewal.
//!
//! ## Registry messages on `mosaic.events`
//!
//! device-service publishes `registry.<device>.<change>` ([`key`]) for every committed
//! change of a device record ([`Change`]), through its outbox, persistent and
//! confirmed. Headers: `kind` = [`KIND`], `message_id`, `device`, `name` (the change),
//! `at` and `received_at` (when the change was committed, RFC 3339); the body is the
//! device record as JSON (for `deleted`, the record as it was). The relay queue binds
//! [`ALL_REGISTRY`], so Hive gets them with `kind` `registry`.
//!
//! ## Revocations: the stream [`REVOCATIONS_STREAM`]
//!
//! A RabbitMQ stream (`x-queue-type: stream`, retention [`REVOCATIONS_MAX_AGE`]) that
//! device-service appends to (default exchange, routing key = the stream's name)
//! whenever a device is disabled or deleted: headers `kind` = [`KIND_REVOCATION`],
//! `device`, and `revoked_at` (integer, Unix seconds). Every token of that device
//! whose `iat` is at or before `revoked_at`, or that has no `iat`, is refused from then
//! on. A gateway reads the stream from its first entry when it starts and keeps the
//! latest `revoked_at` per device in memory; to know when it has caught up, it appends
//! a marker of its own ([`KIND_MARKER`], header [`MARKER`]) and is ready once it reads
//! it back.
//!
//! ## Gateway -> device-service requests
//!
//! A gateway publishes a [`RpcRequest`] (JSON body) to the queue [`RPC_QUEUE`] through
//! the default exchange, `mandatory`, with `reply_to` = its own queue
//! (`mosaic.gateway.<id>`), `correlation_id` = a fresh UUID and `expiration` = how long
//! it waits. The queue is auto-delete and declared by the device-service replicas
//! that consume it, so when none runs a request comes back unroutable at once.
//! device-service answers through the default exchange to `reply_to`, with the same
//! `correlation_id`, header `kind` = [`KIND_RPC_REPLY`] and a [`RpcReply`] body.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `kind` header of registry messages on `mosaic.events`.
pub const KIND: &str = "registry";
/// Binding pattern on `mosaic.events` for every registry message.
pub const ALL_REGISTRY: &str = "registry.#";

/// The stream of revocations.
pub const REVOCATIONS_STREAM: &str = "mosaic.revocations";
/// How long the stream keeps an entry (`x-max-age`): longer than the longest token
/// lifetime device-service mints (`TOKEN_TTL` is at most 365 days), so a gateway
/// that boots still learns of every revocation that matters to a token in use.
pub const REVOCATIONS_MAX_AGE: &str = "400D";
/// `kind` header of a revocation entry.
pub const KIND_REVOCATION: &str = "revocation";
/// `kind` header of a gateway's catch-up marker in the stream.
pub const KIND_MARKER: &str = "marker";
/// Header of a revocation: the revoked device.
pub const DEVICE: &str = "device";
/// Header of a revocation: Unix seconds; tokens with `iat` at or before it are refused.
pub const REVOKED_AT: &str = "revoked_at";
/// Header of a marker: a value only the gateway that wrote it knows.
pub const MARKER: &str = "marker";

/// The queue device-service replicas consume gateway requests from.
pub const RPC_QUEUE: &str = "mosaic.device-service.rpc";
/// `kind` header of an answer to a gateway request.
pub const KIND_RPC_REPLY: &str = "rpc_reply";
/// Longest enrolment code a gateway forwards, in bytes; longer ones are refused unread.
pub const MAX_CODE_BYTES: usize = 128;

/// A change of a device record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The device was added to the registry.
    Created,
    /// Its name, groups, attributes or `enabled` changed.
    Updated,
    /// It was removed.
    Deleted,
    /// It connected for the first time.
    Activated,
}

impl Change {
    /// The name in routing keys and in the `name` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Deleted => "deleted",
            Change::Activated => "activated",
        }
    }
}

/// `registry.<device>.<change>`.
pub fn key(device: Uuid, change: Change) -> String {
    format!("registry.{device}.{}", change.as_str())
}

/// What a gateway asks device-service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RpcRequest {
    /// Trade a one-time enrolment code for the device's first token.
    Enrol {
        /// The code as the device sent it. Never log it.
        code: String,
    },
    /// A fresh token for an authenticated device.
    Renew {
        /// The device (the `sub` of its current token).
        device: Uuid,
    },
}

/// device-service's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RpcReply {
    /// A token was minted.
    Token {
        /// The device it names.
        device: Uuid,
        /// The JWT.
        token: String,
        /// Its `exp`, RFC 3339.
        expires_at: String,
    },
    /// Refused, with one of [`refusal`].
    Refused {
        /// Why.
        code: String,
    },
}

/// `code` values of [`RpcReply::Refused`].
pub mod refusal {
    /// The enrolment code is unknown, used or expired, or its device is disabled.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The device is not in the registry, or is disabled.
    pub const FORBIDDEN: &str = "forbidden";
    /// device-service cannot answer now (no database, no signing key).
    pub const UNAVAILABLE: &str = "unavailable";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes() {
        let d = Uuid::nil();
        assert_eq!(
            key(d, Change::Activated),
            "registry.00000000-0000-0000-0000-000000000000.activated"
        );
        assert_eq!(
            serde_json::to_value(RpcRequest::Enrol { code: "c".into() }).unwrap(),
            json!({"op":"enrol","code":"c"})
        );
        let r: RpcReply =
            serde_json::from_value(json!({"result":"refused","code":"forbidden"})).unwrap();
        assert_eq!(
            r,
            RpcReply::Refused {
                code: refusal::FORBIDDEN.into()
            }
        );
    }
}
