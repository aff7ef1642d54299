//! JSON frames on the device WebSocket.
//!
//! Device frames ([`ClientFrame`]) are parsed by [`ClientFrame::parse`], which keeps
//! an event's unknown top-level fields (they travel to Hive unchanged) and names what
//! was wrong when a frame is refused. Numbers are read exactly, and an integer
//! outside `i64::MIN..=u64::MAX` anywhere in a frame refuses it ([`crate::json`]);
//! an event's extra fields follow [`header::check_extra`]. Gateway frames ([`ServerFrame`]) serialize to the
//! shapes of the contract; they also deserialize, for device clients and tests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::fleet::Capabilities;
use crate::header;

/// Longest event or request name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest device-chosen event id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest response status, in characters.
pub const MAX_STATUS_CHARS: usize = 128;

/// Error codes carried in `error` and `nack` frames.
pub mod code {
    /// The frame is not a JSON object of a known type with well-typed fields.
    pub const BAD_FRAME: &str = "bad_frame";
    /// The frame uses a top-level name the gateway injects, or one RabbitMQ reads
    /// itself (`CC`, `BCC`, `x-...`, in any letter case).
    pub const RESERVED_FIELD: &str = "reserved_field";
    /// A response names no request pending for this device.
    pub const UNKNOWN_REQUEST: &str = "unknown_request";
    /// The token was refused.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// `nack`: the broker could not be reached or did not confirm in time.
    pub const UNAVAILABLE: &str = "unavailable";
    /// `nack`: the broker refused the message (negative publisher confirm).
    pub const REJECTED: &str = "rejected";
    /// `nack`: no queue takes the message (nothing consumes device events yet, for
    /// instance before device-service first started); send it again later.
    pub const UNROUTABLE: &str = "unroutable";
    /// `renew`: the device is not in the registry, or is disabled.
    pub const FORBIDDEN: &str = "forbidden";
}

/// A frame a device sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `{"type":"auth","token":"<jwt>","services"?:[..],"attributes"?:{..}}`: first
    /// authentication or refresh, optionally declaring capabilities.
    Auth {
        /// The JWT. Never log it.
        token: String,
        /// `services` and `attributes`, when the frame carries them.
        capabilities: Capabilities,
    },
    /// `{"type":"register","services"?:[..],"attributes"?:{..}}`: declares (again)
    /// what the device offers; at least one of the two fields.
    Register(Capabilities),
    /// `{"type":"event","name":..,"data":..,"id":..,...extra}`.
    Event(DeviceEvent),
    /// `{"type":"response","request_id":..,"status":..,"data":..}`.
    Response {
        /// The `id` of the request being answered.
        request_id: String,
        /// `"ok"`, `"error"` or any other short string.
        status: String,
        /// The device's answer.
        data: Value,
    },
    /// `{"type":"enrol","code":"<one-time code>"}`: instead of `auth`, a device
    /// without a token trades an enrolment code for one.
    Enrol {
        /// The one-time code. Never log it.
        code: String,
    },
    /// `{"type":"renew"}`: an authenticated device asks for a fresh token.
    Renew,
}

/// An event sent by a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEvent {
    /// 1 to [`MAX_NAME_CHARS`] characters.
    pub name: String,
    /// Any JSON; `null` when the frame had none.
    pub data: Value,
    /// The device's own id for this event: asks for an `ack`/`nack`.
    pub id: Option<String>,
    /// Every other top-level field, carried to Hive unchanged.
    pub extra: Map<String, Value>,
}

/// Why a device frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    /// [`code::BAD_FRAME`] or [`code::RESERVED_FIELD`].
    pub code: &'static str,
    /// What was wrong, for the device's developer.
    pub message: String,
}

impl FrameError {
    fn bad(message: impl Into<String>) -> Self {
        FrameError {
            code: code::BAD_FRAME,
            message: message.into(),
        }
    }
}

impl ClientFrame {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        let value = crate::json::parse_exact(text).map_err(|e| match e {
            crate::json::Error::OutOfRange(e) => FrameError::bad(e.to_string()),
            e => FrameError::bad(format!("frame is not valid JSON: {e}")),
        })?;
        let Value::Object(mut obj) = value else {
            return Err(FrameError::bad("frame must be a JSON object"));
        };
        let kind = match obj.remove("type") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(FrameError::bad("field `type` must be a string")),
            None => return Err(FrameError::bad("missing field `type`")),
        };
        match kind.as_str() {
            "auth" => {
                let token = take_string(&mut obj, "token")?;
                let capabilities = Capabilities::take(&mut obj).map_err(FrameError::bad)?;
                Ok(ClientFrame::Auth {
                    token,
                    capabilities,
                })
            }
            "register" => {
                let capabilities = Capabilities::take(&mut obj).map_err(FrameError::bad)?;
                if capabilities.is_empty() {
                    return Err(FrameError::bad(
                        "a register frame needs `services` or `attributes`",
                    ));
                }
                Ok(ClientFrame::Register(capabilities))
            }
            "event" => {
                if let Some(reserved) = obj.keys().find(|k| header::is_reserved(k)) {
                    return Err(FrameError {
                        code: code::RESERVED_FIELD,
                        message: format!("field `{reserved}` is reserved for the gateway"),
                    });
                }
                let name = take_string(&mut obj, "name")?;
                let chars = name.chars().count();
                if chars == 0 || chars > MAX_NAME_CHARS {
                    return Err(FrameError::bad(format!(
                        "field `name` must have 1 to {MAX_NAME_CHARS} characters"
                    )));
                }
                let id = match obj.remove("id") {
                    None => None,
                    Some(Value::String(id)) if id.chars().count() <= MAX_ID_CHARS => Some(id),
                    Some(Value::String(_)) => {
                        return Err(FrameError::bad(format!(
                            "field `id` must have at most {MAX_ID_CHARS} characters"
                        )));
                    }
                    Some(_) => return Err(FrameError::bad("field `id` must be a string")),
                };
                let data = obj.remove("data").unwrap_or(Value::Null);
                header::check_extra(&obj).map_err(|e| match e {
                    header::ExtraError::BrokerReserved(_) => FrameError {
                        code: code::RESERVED_FIELD,
                        message: e.to_string(),
                    },
                    e => FrameError::bad(e.to_string()),
                })?;
                Ok(ClientFrame::Event(DeviceEvent {
                    name,
                    data,
                    id,
                    extra: obj,
                }))
            }
            "enrol" => Ok(ClientFrame::Enrol {
                code: take_string(&mut obj, "code")?,
            }),
            "renew" => Ok(ClientFrame::Renew),
            "response" => {
                let request_id = take_string(&mut obj, "request_id")?;
                let status = take_string(&mut obj, "status")?;
                if status.is_empty() || status.chars().count() > MAX_STATUS_CHARS {
                    return Err(FrameError::bad(format!(
                        "field `status` must have 1 to {MAX_STATUS_CHARS} characters"
                    )));
                }
                let data = obj.remove("data").unwrap_or(Value::Null);
                Ok(ClientFrame::Response {
                    request_id,
                    status,
                    data,
                })
            }
            other => Err(FrameError::bad(format!(
                "unknown frame type `{}`",
                truncate(other, 64)
            ))),
        }
    }
}

fn take_string(obj: &mut Map<String, Value>, field: &str) -> Result<String, FrameError> {
    match obj.remove(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FrameError::bad(format!("field `{field}` must be a string"))),
        None => Err(FrameError::bad(format!("missing field `{field}`"))),
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Sent on connect when the upgrade carried no token.
    Hello {
        /// How long the device has to send its `auth` frame.
        auth_timeout_ms: u64,
    },
    /// Authentication (or refresh) succeeded.
    Welcome {
        /// The device (the token's `sub`).
        device: Uuid,
        /// This session's id.
        session: Uuid,
        /// When the current token expires, RFC 3339.
        expires_at: String,
    },
    /// An event with an `id` was confirmed by the broker.
    Ack {
        /// The device's id of the event.
        id: String,
    },
    /// An event with an `id` could not be stored.
    Nack {
        /// The device's id of the event.
        id: String,
        /// [`code::UNAVAILABLE`], [`code::REJECTED`] or [`code::UNROUTABLE`].
        code: String,
    },
    /// A frame was refused; the connection stays open unless a close follows.
    Error {
        /// A snake_case code from [`code`].
        code: String,
        /// What was wrong.
        message: String,
    },
    /// An enrolment code was accepted: the device's first token. `welcome` follows.
    Enrolled {
        /// The device the code was issued for.
        device: Uuid,
        /// Its token (a JWT); keep it for the next connections.
        token: String,
        /// When the token expires, RFC 3339.
        expires_at: String,
    },
    /// A `renew` was granted: a fresh token, which the session now runs under.
    Renewed {
        /// The new token (a JWT).
        token: String,
        /// When it expires, RFC 3339.
        expires_at: String,
    },
    /// An event from Hive.
    Event {
        /// The command's id (UUID).
        id: String,
        /// The event name.
        name: String,
        /// Hive's data.
        #[serde(default)]
        data: Value,
        /// Every extra field Hive sent.
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
    /// A `register` frame (or capabilities in `auth`) was taken.
    Registered {
        /// The services the device declared now; `null` when it declared none (every
        /// request reaches it).
        services: Option<Vec<String>>,
    },
    /// A request from Hive that the device must answer with a `response`.
    Request {
        /// The request id; echo it as `request_id`.
        id: String,
        /// The request name.
        name: String,
        /// Hive's data.
        #[serde(default)]
        data: Value,
        /// Answers after this instant are refused, RFC 3339.
        deadline: String,
        /// Every extra field Hive sent.
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The frame as JSON text.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_as_long_as_a_request_name() {
        // A service is the name of the requests a device answers.
        assert_eq!(crate::fleet::MAX_SERVICE_CHARS, MAX_NAME_CHARS);
    }
    use serde_json::json;

    #[test]
    fn event_keeps_extra_fields() {
        let f = ClientFrame::parse(
            r#"{"type":"event","name":"t","data":{"c":1},"id":"7","unit":"C","meta":{"a":[1]}}"#,
        )
        .unwrap();
        let ClientFrame::Event(e) = f else { panic!() };
        assert_eq!(e.name, "t");
        assert_eq!(e.id.as_deref(), Some("7"));
        assert_eq!(e.data, json!({"c":1}));
        assert_eq!(Value::Object(e.extra), json!({"unit":"C","meta":{"a":[1]}}));
    }

    #[test]
    fn bad_frames_name_the_problem() {
        for (text, code, needle) in [
            ("nope", code::BAD_FRAME, "not valid JSON"),
            ("[1]", code::BAD_FRAME, "JSON object"),
            (r#"{"name":"x"}"#, code::BAD_FRAME, "`type`"),
            (r#"{"type":"dance"}"#, code::BAD_FRAME, "unknown frame type"),
            (r#"{"type":"event"}"#, code::BAD_FRAME, "`name`"),
            (r#"{"type":"event","name":""}"#, code::BAD_FRAME, "`name`"),
            (r#"{"type":"event","name":1}"#, code::BAD_FRAME, "`name`"),
            (
                r#"{"type":"event","name":"a","id":5}"#,
                code::BAD_FRAME,
                "`id`",
            ),
            (
                r#"{"type":"event","name":"a","device":"x"}"#,
                code::RESERVED_FIELD,
                "`device`",
            ),
            (
                r#"{"type":"response","status":"ok"}"#,
                code::BAD_FRAME,
                "`request_id`",
            ),
            (r#"{"type":"auth"}"#, code::BAD_FRAME, "`token`"),
            (
                r#"{"type":"auth","token":"t","services":"a"}"#,
                code::BAD_FRAME,
                "`services`",
            ),
            (r#"{"type":"register"}"#, code::BAD_FRAME, "`services`"),
            (
                r#"{"type":"register","attributes":[1]}"#,
                code::BAD_FRAME,
                "`attributes`",
            ),
        ] {
            let err = ClientFrame::parse(text).unwrap_err();
            assert_eq!(err.code, code, "{text}");
            assert!(err.message.contains(needle), "{text}: {}", err.message);
        }
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        let text = json!({"type":"event","name":long}).to_string();
        assert_eq!(ClientFrame::parse(&text).unwrap_err().code, code::BAD_FRAME);
    }

    #[test]
    fn capabilities_ride_in_auth_and_register() {
        let f = ClientFrame::parse(r#"{"type":"auth","token":"t","services":["b","a"]}"#).unwrap();
        let ClientFrame::Auth {
            token,
            capabilities,
        } = f
        else {
            panic!()
        };
        assert_eq!(token, "t");
        assert_eq!(capabilities.services, Some(vec!["a".into(), "b".into()]));
        let f = ClientFrame::parse(r#"{"type":"register","attributes":{"fw":"2"}}"#).unwrap();
        let ClientFrame::Register(c) = f else {
            panic!()
        };
        assert_eq!(c.services, None);
        assert_eq!(c.attributes.unwrap()["fw"], "2");
        let attrs = format!(r#"{{"a":"{}"}}"#, "x".repeat(9000));
        let text = format!(r#"{{"type":"register","attributes":{attrs}}}"#);
        assert_eq!(ClientFrame::parse(&text).unwrap_err().code, code::BAD_FRAME);
        assert_eq!(
            serde_json::to_value(ServerFrame::Registered {
                services: Some(vec!["a".into()])
            })
            .unwrap(),
            json!({"type":"registered","services":["a"]})
        );
    }

    #[test]
    fn names_rabbitmq_reads_are_refused_in_any_case() {
        for name in [
            "CC", "cc", "Cc", "BCC", "bcc", "bCc", "x-death", "X-Match", "x-", "X-",
        ] {
            let text = json!({"type":"event","name":"a","id":"1",(name):["event.x.y"]}).to_string();
            let err = ClientFrame::parse(&text).unwrap_err();
            assert_eq!(err.code, code::RESERVED_FIELD, "{name}");
            assert!(err.message.contains(name), "{name}: {}", err.message);
        }
        for name in ["ccc", "c", "xdeath", "x_death", "bc", "cc-x", "ex-x", "é"] {
            let text = json!({"type":"event","name":"a",(name):1}).to_string();
            assert!(ClientFrame::parse(&text).is_ok(), "{name}");
        }
    }

    #[test]
    fn extra_fields_are_capped_at_64_kib_of_json() {
        // `"pad":"…"` is 8 bytes plus the string, `{}` 2 more.
        let fits = "x".repeat(header::MAX_EXTRA_JSON_BYTES - 10);
        let text =
            json!({"type":"event","name":"a","data":"d".repeat(100_000),"pad":fits}).to_string();
        assert!(ClientFrame::parse(&text).is_ok());
        let over = "x".repeat(header::MAX_EXTRA_JSON_BYTES - 9);
        let text = json!({"type":"event","name":"a","pad":over}).to_string();
        let err = ClientFrame::parse(&text).unwrap_err();
        assert_eq!(err.code, code::BAD_FRAME);
        assert!(err.message.contains("65537 bytes"), "{}", err.message);
    }

    #[test]
    fn integers_past_64_bits_are_refused_anywhere() {
        for text in [
            r#"{"type":"event","name":"a","data":{"v":[18446744073709551616]}}"#,
            r#"{"type":"event","name":"a","n":-9223372036854775809}"#,
            r#"{"type":"response","request_id":"r","status":"ok","data":1e2,"x":100000000000000000000}"#,
        ] {
            let err = ClientFrame::parse(text).unwrap_err();
            assert_eq!(err.code, code::BAD_FRAME, "{text}");
            assert!(err.message.contains("outside the range"), "{}", err.message);
        }
        let text = r#"{"type":"event","name":"a","data":[18446744073709551615,-9223372036854775808],"big":"18446744073709551616"}"#;
        let ClientFrame::Event(e) = ClientFrame::parse(text).unwrap() else {
            panic!()
        };
        assert_eq!(e.data, json!([u64::MAX, i64::MIN]));
    }

    #[test]
    fn enrol_and_renew_frames() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"enrol","code":"ABCD"}"#).unwrap(),
            ClientFrame::Enrol {
                code: "ABCD".into()
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"renew"}"#).unwrap(),
            ClientFrame::Renew
        );
        for bad in [r#"{"type":"enrol"}"#, r#"{"type":"enrol","code":7}"#] {
            assert_eq!(ClientFrame::parse(bad).unwrap_err().code, code::BAD_FRAME);
        }
        let f = ServerFrame::Renewed {
            token: "t".into(),
            expires_at: "e".into(),
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"type":"renewed","token":"t","expires_at":"e"})
        );
    }

    #[test]
    fn server_frames_have_the_contract_shape() {
        let f = ServerFrame::Nack {
            id: "1".into(),
            code: code::UNAVAILABLE.into(),
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"type":"nack","id":"1","code":"unavailable"})
        );
        let mut extra = Map::new();
        extra.insert("prio".into(), json!(3));
        let f = ServerFrame::Event {
            id: "u".into(),
            name: "n".into(),
            data: json!([1]),
            extra,
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","id":"u","name":"n","data":[1],"prio":3})
        );
        let back: ServerFrame = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }
}
