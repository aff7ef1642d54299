//! How a simulated device answers the requests Hive sends it.

use std::str::FromStr;

use serde_json::{Value, json};

/// The answer policy, from `--answer`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `echo`: status `ok`, the request's data back.
    Echo,
    /// `fixed:<json>`: status `ok`, this data.
    Fixed(Value),
    /// `error`: status `error` with a message.
    Error,
    /// `silent`: never answer (Hive sees a 504 `device_timeout`).
    Silent,
}

/// `--answer` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected echo, fixed:<json>, error or silent ({0})")]
pub struct AnswerError(String);

impl FromStr for Answer {
    type Err = AnswerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "echo" => Ok(Answer::Echo),
            "error" => Ok(Answer::Error),
            "silent" => Ok(Answer::Silent),
            _ => match s.strip_prefix("fixed:") {
                Some(json) => serde_json::from_str(json)
                    .map(Answer::Fixed)
                    .map_err(|e| AnswerError(format!("bad JSON after fixed: {e}"))),
                None => Err(AnswerError(format!("got {s:?}"))),
            },
        }
    }
}

impl Answer {
    /// The `response` frame for request `id` named `name` carrying `data`, or `None`
    /// when the device stays silent.
    pub fn respond(&self, id: &str, name: &str, data: &Value) -> Option<Value> {
        let (status, data) = match self {
            Answer::Echo => ("ok", data.clone()),
            Answer::Fixed(v) => ("ok", v.clone()),
            Answer::Error => (
                "error",
                json!({"message": format!("simulated failure of request {name:?}")}),
            ),
            Answer::Silent => return None,
        };
        Some(json!({"type": "response", "request_id": id, "status": status, "data": data}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mosaic_protocol::frame::ClientFrame;

    #[test]
    fn parses_every_policy() {
        assert_eq!("echo".parse::<Answer>().unwrap(), Answer::Echo);
        assert_eq!("error".parse::<Answer>().unwrap(), Answer::Error);
        assert_eq!("silent".parse::<Answer>().unwrap(), Answer::Silent);
        assert_eq!(
            r#"fixed:{"on":true}"#.parse::<Answer>().unwrap(),
            Answer::Fixed(json!({"on": true}))
        );
        assert!("fixed:{".parse::<Answer>().is_err());
        assert!("shout".parse::<Answer>().is_err());
    }

    #[test]
    fn responses_are_frames_the_gateway_accepts() {
        let data = json!({"level": 3});
        let cases = [
            (Answer::Echo, "ok", data.clone()),
            (Answer::Fixed(json!([1, 2])), "ok", json!([1, 2])),
        ];
        for (answer, status, expected) in cases {
            let frame = answer.respond("r-1", "dim", &data).unwrap();
            match ClientFrame::parse(&frame.to_string()).unwrap() {
                ClientFrame::Response {
                    request_id,
                    status: s,
                    data: d,
                } => {
                    assert_eq!(request_id, "r-1");
                    assert_eq!(s, status);
                    assert_eq!(d, expected);
                }
                other => panic!("{other:?}"),
            }
        }
        let frame = Answer::Error.respond("r-2", "dim", &data).unwrap();
        let ClientFrame::Response { status, data, .. } =
            ClientFrame::parse(&frame.to_string()).unwrap()
        else {
            panic!()
        };
        assert_eq!(status, "error");
        assert!(data["message"].as_str().unwrap().contains("dim"));
        assert_eq!(Answer::Silent.respond("r-3", "dim", &data), None);
    }
}
