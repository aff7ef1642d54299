//! The fleet: group names, what a device declares it offers, and the bodies of the
//! messages the replicas exchange about the devices they hold.
//!
//! - Groups come from a token's `groups` claim ([`parse_groups`]); a group name is 1
//!   to [`MAX_GROUP_CHARS`] characters of `[A-Za-z0-9_-]` ([`valid_group`]).
//! - Capabilities: a device may declare `services` (the request names it answers)
//!   and `attributes` (any JSON object of at most [`MAX_ATTRIBUTES_JSON_BYTES`]) in
//!   its `auth` frame or a `register` frame ([`Capabilities::take`]).
//! - [`Announcement`]: what each gateway replica publishes on `mosaic.fleet` every
//!   interval, so that device-service knows which replicas exist and which groups
//!   each one serves.
//! - [`Connected`], [`Presence`], [`Page`], [`FanoutReport`]: the bodies of the
//!   gateways' answers to the fleet commands of [`crate::command::Kind`].
//!
//! All bodies are JSON; unknown fields are ignored, so a newer replica may add some.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest group name, in characters.
pub const MAX_GROUP_CHARS: usize = 64;
/// Most groups one token may carry.
pub const MAX_GROUPS: usize = 64;
/// Longest service name, in characters (a service is a request `name`).
pub const MAX_SERVICE_CHARS: usize = 128;
/// Most services one device may declare.
pub const MAX_SERVICES: usize = 256;
/// Largest `attributes` object, as compact JSON text.
pub const MAX_ATTRIBUTES_JSON_BYTES: usize = 8 * 1024;
/// Longest attribute name (at any depth), in bytes: what an AMQP table key holds.
pub const MAX_ATTRIBUTE_NAME_BYTES: usize = 255;

/// Whether `name` is a valid group name: 1 to 64 of `A-Z`, `a-z`, `0-9`, `_`, `-`.
///
/// ```
/// use mosaic_protocol::fleet::valid_group;
/// assert!(valid_group("site-7_north"));
/// assert!(!valid_group("") && !valid_group("a.b") && !valid_group("#") && !valid_group("é"));
/// ```
pub fn valid_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_GROUP_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a `groups` claim was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupsError {
    /// Not an array of strings (nor absent, nor `null`).
    #[error("the `groups` claim must be an array of strings")]
    NotAnArray,
    /// A name outside the pattern.
    #[error("a group name must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`")]
    BadName,
    /// More than [`MAX_GROUPS`] names.
    #[error("a token carries at most 64 groups")]
    TooMany,
}

/// Reads a token's `groups` claim: absent or `null` is no group; an array of valid
/// names is those groups (sorted, each once); anything else is refused.
pub fn parse_groups(claim: Option<&Value>) -> Result<Vec<String>, GroupsError> {
    let items = match claim {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(GroupsError::NotAnArray),
    };
    if items.len() > MAX_GROUPS {
        return Err(GroupsError::TooMany);
    }
    let mut groups = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(s) if valid_group(s) => groups.push(s.clone()),
            Value::String(_) => return Err(GroupsError::BadName),
            _ => return Err(GroupsError::NotAnArray),
        }
    }
    groups.sort();
    groups.dedup();
    Ok(groups)
}

/// What a device declares it offers. A field left out of a frame keeps its
/// previous value; `services: None` after every frame means the device never
/// declared any, and every request reaches it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The request names the device answers (sorted, each once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    /// Anything JSON about the device (firmware version, model...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Map<String, Value>>,
}

impl Capabilities {
    /// Takes `services` and `attributes` out of a frame's fields, checking them:
    /// `services` an array of at most [`MAX_SERVICES`] strings of 1 to
    /// [`MAX_SERVICE_CHARS`] characters, `attributes` an object of at most
    /// [`MAX_ATTRIBUTES_JSON_BYTES`] as JSON text whose names (at any depth) have at
    /// most [`MAX_ATTRIBUTE_NAME_BYTES`] bytes. `null` counts as absent.
    pub fn take(obj: &mut Map<String, Value>) -> Result<Self, String> {
        let services = match obj.remove("services") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                if items.len() > MAX_SERVICES {
                    return Err(format!(
                        "field `services` holds at most {MAX_SERVICES} names"
                    ));
                }
                let mut names = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s)
                            if !s.is_empty() && s.chars().count() <= MAX_SERVICE_CHARS =>
                        {
                            names.push(s)
                        }
                        _ => {
                            return Err(format!(
                                "field `services` must be an array of strings of 1 to {MAX_SERVICE_CHARS} characters"
                            ));
                        }
                    }
                }
                names.sort();
                names.dedup();
                Some(names)
            }
            Some(_) => return Err("field `services` must be an array of strings".into()),
        };
        let attributes = match obj.remove("attributes") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let len = crate::json::text_len(&m);
                if len > MAX_ATTRIBUTES_JSON_BYTES {
                    return Err(format!(
                        "field `attributes` takes {len} bytes as JSON text; at most {MAX_ATTRIBUTES_JSON_BYTES} are allowed"
                    ));
                }
                if !names_fit(&m) {
                    return Err(format!(
                        "attribute names must have at most {MAX_ATTRIBUTE_NAME_BYTES} bytes"
                    ));
                }
                Some(m)
            }
            Some(_) => return Err("field `attributes` must be a JSON object".into()),
        };
        Ok(Capabilities {
            services,
            attributes,
        })
    }

    /// Whether the frame declared nothing.
    pub fn is_empty(&self) -> bool {
        self.services.is_none() && self.attributes.is_none()
    }

    /// Applies a later declaration: each field it carries replaces this one's.
    pub fn update(&mut self, later: Capabilities) {
        if later.services.is_some() {
            self.services = later.services;
        }
        if later.attributes.is_some() {
            self.attributes = later.attributes;
        }
    }

    /// Whether a request named `name` may reach the device: it declared no services,
    /// or `name` is one of them.
    pub fn offers(&self, name: &str) -> bool {
        self.services
            .as_ref()
            .is_none_or(|s| s.binary_search_by(|x| x.as_str().cmp(name)).is_ok())
    }
}

fn names_fit(m: &Map<String, Value>) -> bool {
    fn value_fits(v: &Value) -> bool {
        match v {
            Value::Object(m) => names_fit(m),
            Value::Array(a) => a.iter().all(value_fits),
            _ => true,
        }
    }
    m.iter()
        .all(|(k, v)| k.len() <= MAX_ATTRIBUTE_NAME_BYTES && value_fits(v))
}

/// A gateway replica's announcement on `mosaic.fleet` (`gateway.<id>.up`): sent every
/// interval, at once when a group gains its first member or loses its last, and when
/// device-service asks ([`crate::command::Kind::Announce`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The replica's id (the `gateway` of its lifecycle messages).
    pub gateway: Uuid,
    /// Its command queue.
    pub queue: String,
    /// Sessions it holds now.
    pub sessions: u64,
    /// Each group it has bound, with the number of its sessions in the group.
    pub groups: BTreeMap<String, u64>,
    /// The interval of its periodic announcements, in milliseconds.
    pub interval_ms: u64,
    /// Counts this replica's announcements; a later one has a higher number.
    pub seq: u64,
    /// When the replica started, RFC 3339.
    pub started_at: String,
}

/// One connected device, as the gateway holding it describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connected {
    /// The device.
    pub device: Uuid,
    /// The gateway replica holding its session.
    pub gateway: Uuid,
    /// The session.
    pub session: Uuid,
    /// When the session began, RFC 3339.
    pub connected_at: String,
    /// The services it declared; `null` when it declared none (every request
    /// reaches it).
    pub services: Option<Vec<String>>,
    /// The attributes it declared; `null` when none.
    pub attributes: Option<Map<String, Value>>,
    /// The groups of its session (from its token).
    pub groups: Vec<String>,
}

/// Answer to a presence question ([`crate::command::ReplyKind::Presence`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// Whether the answering gateway holds the device.
    pub connected: bool,
    /// The session, when connected.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Connected>,
}

/// One gateway's page of a device listing ([`crate::command::ReplyKind::Listing`]):
/// the devices it holds with ids greater than the cursor, in id order, filtered, at
/// most the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The answering gateway.
    pub gateway: Uuid,
    /// The devices.
    pub devices: Vec<Connected>,
    /// Whether more devices past the last one match.
    pub more: bool,
}

/// A gateway's report on a scatter-gather request, published (and confirmed) before
/// any of its devices gets the request, so it reaches the requester before any
/// answer ([`crate::command::ReplyKind::Fanout`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutReport {
    /// The reporting gateway.
    pub gateway: Uuid,
    /// Every device this gateway is about to ask.
    pub asked: Vec<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn groups_claims() {
        assert_eq!(parse_groups(None), Ok(vec![]));
        assert_eq!(parse_groups(Some(&Value::Null)), Ok(vec![]));
        assert_eq!(
            parse_groups(Some(&json!(["b", "a", "b", "A-_9"]))),
            Ok(vec!["A-_9".into(), "a".into(), "b".into()])
        );
        assert_eq!(parse_groups(Some(&json!([]))), Ok(vec![]));
        for bad in [
            json!("a"),
            json!({"a":1}),
            json!(1),
            json!([1]),
            json!([null]),
        ] {
            assert_eq!(
                parse_groups(Some(&bad)),
                Err(GroupsError::NotAnArray),
                "{bad}"
            );
        }
        for bad in ["", "a.b", "a b", "#", "*", "é", &"x".repeat(65)] {
            assert_eq!(
                parse_groups(Some(&json!([bad]))),
                Err(GroupsError::BadName),
                "{bad}"
            );
        }
        assert!(parse_groups(Some(&json!(["x".repeat(64)]))).is_ok());
        let many: Vec<String> = (0..65).map(|i| format!("g{i}")).collect();
        assert_eq!(parse_groups(Some(&json!(many))), Err(GroupsError::TooMany));
    }

    #[test]
    fn capabilities_are_checked_and_updated() {
        let mut obj = json!({"services":["b","a","a"],"attributes":{"fw":"1.2"},"x":1});
        let caps = Capabilities::take(obj.as_object_mut().unwrap()).unwrap();
        assert_eq!(caps.services, Some(vec!["a".into(), "b".into()]));
        assert_eq!(obj, json!({"x":1}));
        assert!(caps.offers("a") && !caps.offers("c"));
        assert!(Capabilities::default().offers("anything"));

        let later = Capabilities {
            attributes: Some(Map::new()),
            ..Default::default()
        };
        let mut now = caps.clone();
        now.update(later);
        assert_eq!(now.services, caps.services);
        assert_eq!(now.attributes, Some(Map::new()));

        for bad in [
            json!({"services":"a"}),
            json!({"services":[1]}),
            json!({"services":[""]}),
            json!({"services":["x".repeat(129)]}),
            json!({"attributes":[1]}),
            json!({"attributes":{"a":"x".repeat(MAX_ATTRIBUTES_JSON_BYTES)}}),
            json!({"attributes":{"n":{("k".repeat(256)):1}}}),
        ] {
            let mut obj = bad.clone();
            assert!(
                Capabilities::take(obj.as_object_mut().unwrap()).is_err(),
                "{bad}"
            );
        }
        let many: Vec<String> = (0..=MAX_SERVICES).map(|i| format!("s{i}")).collect();
        let mut obj = json!({ "services": many });
        assert!(Capabilities::take(obj.as_object_mut().unwrap()).is_err());
    }

    #[test]
    fn presence_has_the_contract_shape() {
        let p = Presence {
            connected: false,
            session: None,
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"connected":false})
        );
        let c = Connected {
            device: Uuid::nil(),
            gateway: Uuid::nil(),
            session: Uuid::nil(),
            connected_at: "t".into(),
            services: None,
            attributes: None,
            groups: vec!["g".into()],
        };
        let p = Presence {
            connected: true,
            session: Some(c),
        };
        let v = serde_json::to_value(&p).unwrap();
        for k in [
            "connected",
            "gateway",
            "session",
            "connected_at",
            "services",
            "attributes",
            "groups",
        ] {
            assert!(v.get(k).is_some(), "{k}: {v}");
        }
        let back: Presence = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}
