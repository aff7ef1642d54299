//! The operators' documentation against the code: every setting a service reads is
//! documented in docs/configuration.md, with the default the code uses, every metric
//! it exports is named in docs/operations.md, and docs/asyncapi.yaml describes every
//! device frame and close code, with examples the code reads as it documents them.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use mosaic_protocol::frame::{ClientFrame, ServerFrame};
use mosaic_protocol::{close, registry};
use serde_json::Value;

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// The rows `| `NAME` | default | ...` of docs/configuration.md, by variable name.
fn documented() -> Vec<(String, String)> {
    let text = doc("configuration.md");
    text.lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let default = cells.next()?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                .then(|| (name.to_owned(), default.to_owned()))
        })
        .collect()
}

fn check<C: CommandFactory>(service: &str) {
    let rows = documented();
    let mut problems = Vec::new();
    let mut names: Vec<(String, Option<String>)> = C::command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let default = a
                .get_default_values()
                .first()
                .map(|d| d.to_string_lossy().into_owned());
            Some((env, default))
        })
        .collect();
    names.push((mosaic_runtime::config::LOG_FILTER_VAR.to_owned(), None));
    for (name, default) in names {
        match rows.iter().find(|(n, _)| *n == name) {
            None => problems.push(format!("{service} reads {name}, which is not documented")),
            Some((_, cell)) => {
                if let Some(d) = default
                    && !cell.contains(&format!("`{d}`"))
                {
                    problems.push(format!(
                        "{service}: {name} defaults to `{d}` in the code, the docs say {cell:?}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn websocket_service_settings_are_documented() {
    check::<websocket_service::Config>("websocket-service");
}

#[test]
fn device_service_settings_are_documented() {
    check::<device_service::Config>("device-service");
}

#[test]
fn every_metric_is_in_the_operations_guide() {
    let text = doc("operations.md");
    let missing: Vec<&str> = websocket_service::metrics::ALL
        .iter()
        .chain(device_service::metrics::ALL.iter())
        .chain(mosaic_amqp::metrics::ALL.iter())
        .copied()
        .filter(|m| !text.contains(&format!("`{m}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not name {missing:?}"
    );
}

/// docs/asyncapi.yaml as JSON.
fn asyncapi() -> Value {
    serde_yaml_ng::from_str(&doc("asyncapi.yaml"))
        .unwrap_or_else(|e| panic!("docs/asyncapi.yaml is not valid YAML: {e}"))
}

/// `v`, or what its local `$ref` (`#/...`) names, followed to the end.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("docs/asyncapi.yaml: $ref {r} is not local"));
        v = root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("docs/asyncapi.yaml: $ref {r} names nothing"));
    }
    v
}

/// The messages of a list (an operation's) or a map (a channel's), resolved.
fn messages<'a>(root: &'a Value, list: &'a Value) -> Vec<&'a Value> {
    match list {
        Value::Array(a) => a.iter().map(|m| resolve(root, m)).collect(),
        Value::Object(o) => o.values().map(|m| resolve(root, m)).collect(),
        _ => Vec::new(),
    }
}

/// A message's payload schema, resolved.
fn payload<'a>(root: &'a Value, message: &'a Value) -> &'a Value {
    resolve(root, &message["payload"])
}

/// The `type` tags a frame message allows: its payload's `type` `const`, or `enum`.
fn frame_types(root: &Value, message: &Value) -> Vec<String> {
    let name = message["name"].as_str().unwrap_or("?");
    let schema = payload(root, message);
    let t = resolve(root, &schema["properties"]["type"]);
    let types: Vec<String> = match (t.get("const"), t.get("enum")) {
        (Some(Value::String(c)), _) => vec![c.clone()],
        (_, Some(Value::Array(e))) => e
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    assert!(
        !types.is_empty(),
        "device frame message {name}: its payload has no `type` const or enum"
    );
    let required = schema["required"].as_array().cloned().unwrap_or_default();
    assert!(
        required.contains(&Value::from("type")),
        "device frame message {name}: `type` is not required"
    );
    types
}

/// The deviceSocket operation with `action` (`receive`: device frames, `send`:
/// gateway frames).
fn socket_operation<'a>(root: &'a Value, action: &str) -> &'a Value {
    let ops: Vec<&Value> = root["operations"]
        .as_object()
        .expect("docs/asyncapi.yaml has operations")
        .values()
        .filter(|op| op["action"] == action && op["channel"]["$ref"] == "#/channels/deviceSocket")
        .collect();
    assert_eq!(
        ops.len(),
        1,
        "docs/asyncapi.yaml: one `{action}` operation on deviceSocket"
    );
    ops[0]
}

fn tags(root: &Value, list: &Value) -> BTreeSet<String> {
    messages(root, list)
        .into_iter()
        .flat_map(|m| frame_types(root, m))
        .collect()
}

fn set(types: &[&str]) -> BTreeSet<String> {
    types.iter().map(|t| t.to_string()).collect()
}

#[test]
fn asyncapi_names_every_device_frame() {
    let root = asyncapi();
    let on_channel = tags(&root, &root["channels"]["deviceSocket"]["messages"]);
    let from_device = tags(&root, &socket_operation(&root, "receive")["messages"]);
    let from_gateway = tags(&root, &socket_operation(&root, "send")["messages"]);
    let client = set(ClientFrame::TYPES);
    let server = set(ServerFrame::TYPES);
    assert_eq!(
        from_device, client,
        "docs/asyncapi.yaml: the device frames (receiveDeviceFrames) are not the code's"
    );
    assert_eq!(
        from_gateway, server,
        "docs/asyncapi.yaml: the gateway frames (sendGatewayFrames) are not the code's"
    );
    assert_eq!(
        on_channel,
        &client | &server,
        "docs/asyncapi.yaml: the deviceSocket channel's messages are not the code's frames"
    );
}

/// The keys of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// `fields` (what an example or the code holds) fit `schema`: every required field is
/// there, and none the schema does not name unless it takes other fields.
fn check_fields(what: &str, schema: &Value, fields: &BTreeSet<String>) {
    let properties = keys(&schema["properties"]);
    let required: BTreeSet<String> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let missing: Vec<_> = required.difference(fields).collect();
    assert!(missing.is_empty(), "{what}: required {missing:?} missing");
    if schema.get("additionalProperties").is_none() {
        let unknown: Vec<_> = fields.difference(&properties).collect();
        assert!(unknown.is_empty(), "{what}: {unknown:?} not in the schema");
    }
}

#[test]
fn asyncapi_frame_examples_are_what_the_code_reads_and_sends() {
    let root = asyncapi();
    let mut seen = 0;
    for m in messages(&root, &socket_operation(&root, "receive")["messages"]) {
        let schema = payload(&root, m);
        for example in m["examples"].as_array().into_iter().flatten() {
            let p = &example["payload"];
            let what = format!("device frame example {p}");
            let frame = ClientFrame::parse(&p.to_string())
                .unwrap_or_else(|e| panic!("{what}: the gateway refuses it: {e}"));
            assert_eq!(p["type"], frame.type_name(), "{what}");
            check_fields(&what, schema, &keys(p));
            seen += 1;
        }
    }
    for m in messages(&root, &socket_operation(&root, "send")["messages"]) {
        let schema = payload(&root, m);
        for example in m["examples"].as_array().into_iter().flatten() {
            let p = &example["payload"];
            let what = format!("gateway frame example {p}");
            let frame: ServerFrame = serde_json::from_value(p.clone())
                .unwrap_or_else(|e| panic!("{what}: not a gateway frame: {e}"));
            let sent = serde_json::to_value(&frame).unwrap();
            assert_eq!(&sent, p, "{what}: the gateway sends it as {sent}");
            check_fields(&what, schema, &keys(&sent));
            seen += 1;
        }
    }
    assert!(seen >= ClientFrame::TYPES.len() + ServerFrame::TYPES.len());
}

#[test]
fn asyncapi_names_every_close_code() {
    let root = asyncapi();
    let text = root["channels"]["deviceSocket"]["description"]
        .as_str()
        .expect("the deviceSocket channel has a description");
    let words: BTreeSet<&str> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .collect();
    let missing: Vec<u16> = close::ALL
        .iter()
        .copied()
        .filter(|c| !words.contains(c.to_string().as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/asyncapi.yaml: the deviceSocket description does not name close codes {missing:?}"
    );
}

#[test]
fn asyncapi_registry_traffic_is_the_codes() {
    let root = asyncapi();
    let channels = &root["channels"];
    assert_eq!(
        channels["revocations"]["address"],
        registry::REVOCATIONS_STREAM
    );
    assert_eq!(channels["deviceServiceRpc"]["address"], registry::RPC_QUEUE);
    let kind = |message: &str| {
        let m = resolve(&root, &root["components"]["messages"][message]);
        resolve(&root, &m["headers"])["properties"]["kind"]["const"].clone()
    };
    assert_eq!(kind("RegistryMessage"), registry::KIND);
    assert_eq!(kind("RevocationMessage"), registry::KIND_REVOCATION);
    assert_eq!(kind("RevocationsMarker"), registry::KIND_MARKER);
    assert_eq!(kind("RpcReply"), registry::KIND_RPC_REPLY);

    let defs = &root["components"]["messages"];
    for example in defs["RpcRequest"]["examples"].as_array().unwrap() {
        let p = &example["payload"];
        let r: registry::RpcRequest = serde_json::from_value(p.clone())
            .unwrap_or_else(|e| panic!("request example {p}: {e}"));
        assert_eq!(&serde_json::to_value(&r).unwrap(), p);
    }
    for example in defs["RpcReply"]["examples"].as_array().unwrap() {
        let p = &example["payload"];
        let r: registry::RpcReply =
            serde_json::from_value(p.clone()).unwrap_or_else(|e| panic!("reply example {p}: {e}"));
        assert_eq!(&serde_json::to_value(&r).unwrap(), p);
    }
    let record_schema = resolve(&root, &defs["RegistryMessage"]["payload"]);
    for example in defs["RegistryMessage"]["examples"].as_array().unwrap() {
        let p = &example["payload"];
        let r: device_service::registry::DeviceRecord = serde_json::from_value(p.clone())
            .unwrap_or_else(|e| panic!("registry example {p}: {e}"));
        let sent = serde_json::to_value(&r).unwrap();
        assert_eq!(&sent, p);
        check_fields("the device record", record_schema, &keys(&sent));
        assert_eq!(
            keys(&sent),
            keys(&record_schema["properties"]),
            "the device record's fields"
        );
    }
}
