//! The operators' documentation against the code: every setting a service reads is
//! documented in docs/configuration.md, with the default the code uses, every metric
//! it exports is named in docs/operations.md, docs/asyncapi.yaml describes every
//! device frame and close code, with examples the code reads as it documents them,
//! and docs/provisioning.md runs as written, command by command, against a stack
//! with the registry.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use clap::CommandFactory;
use mosaic_protocol::frame::{ClientFrame, ServerFrame};
use mosaic_protocol::{close, registry};
use mosaic_tests::{eventually, within};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{API_TOKEN, Stack, WAIT};

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

/// The fenced `sh` blocks of a Markdown page, each with the `## ` heading it sits
/// under.
fn sh_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match &mut block {
            Some(b) if line.trim_start().starts_with("```") => {
                blocks.push((heading.clone(), std::mem::take(b)));
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None if line.trim() == "```sh" => block = Some(String::new()),
            None => {
                if let Some(h) = line.strip_prefix("## ") {
                    heading = h.to_owned();
                }
            }
        }
    }
    assert!(block.is_none(), "an unclosed code block");
    blocks
}

/// The names a block sets when it only sets variables (`NAME=value  # comment`
/// lines): the reader's own values, which the test provides instead.
fn settings_of(block: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for line in block.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, _) = line.split_once('=')?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return None;
        }
        names.push(name.to_owned());
    }
    (!names.is_empty()).then_some(names)
}

/// The first JSON object that starts a line of `text` (curl's answers; a background
/// device's lines around them start otherwise).
fn first_object(text: &str) -> Value {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| {
            serde_json::Deserializer::from_str(l)
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .unwrap_or_else(|| panic!("no JSON answer in:\n{text}"))
}

/// One bash reading its commands from a pipe, so variables carry from block to
/// block, in a process group of its own that is killed with everything it started
/// when the test ends, however it ends.
struct Shell {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    output: Arc<Mutex<String>>,
    eof: Arc<std::sync::atomic::AtomicBool>,
    group: u32,
    blocks: usize,
}

impl Shell {
    fn start(dir: &Path, vars: &[(&str, String)]) -> Shell {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-s"])
            .current_dir(dir)
            .env_clear()
            .env("HOME", dir)
            .env("LC_ALL", "C.UTF-8")
            .envs(vars.iter().map(|(k, v)| (*k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let mut child = cmd.spawn().expect("bash starts");
        let group = child.id().expect("bash is running");
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let eof = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (out, end) = (output.clone(), eof.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf).await {
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            end.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Shell {
            stdin: child.stdin.take(),
            child,
            output,
            eof,
            group,
            blocks: 0,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Writes `text` to the shell and waits until it has run; returns what it printed.
    /// A failing command ends the shell (`set -e`), and the test with it.
    async fn run(&mut self, text: &str) -> String {
        self.blocks += 1;
        let marker = format!("@@ block {} done @@", self.blocks);
        let script = format!("{text}\nprintf '\\n%s\\n' '{marker}'\n");
        let stdin = self.stdin.as_mut().expect("the shell's input is open");
        within(
            WAIT,
            "the shell to take a block",
            stdin.write_all(script.as_bytes()),
        )
        .await
        .expect("the shell reads its input");
        let start = self.output().len();
        eventually(WAIT, &format!("the block to run:\n{text}"), || {
            let output = self.output();
            let ended = self.eof.load(std::sync::atomic::Ordering::SeqCst);
            let marker = marker.clone();
            async move {
                match output[start..].find(&marker) {
                    Some(at) => Some(output[start..start + at].to_owned()),
                    None if ended => {
                        panic!("the shell ended in the block:\n{text}\noutput:\n{output}")
                    }
                    None => None,
                }
            }
        })
        .await
    }

    /// Waits until the shell's output since `from` contains `needle`.
    async fn printed(&self, from: usize, needle: &str) {
        eventually(WAIT, &format!("{needle:?} in the output"), || {
            let found = self.output()[from..].contains(needle);
            async move { found.then_some(()) }
        })
        .await;
    }

    /// Ends the input and waits for the shell to exit; asserts it exited 0.
    async fn finish(mut self) {
        drop(self.stdin.take());
        let status = within(WAIT, "the shell to exit", self.child.wait())
            .await
            .unwrap();
        assert!(
            status.success(),
            "the shell exited with {status}:\n{}",
            self.output()
        );
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // The whole group: bash and the device it started in the background.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.group)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// docs/provisioning.md, as a reader runs it: its `sh` blocks in order in one bash,
/// in an empty directory where `target/debug` holds the built tools, against a stack
/// with the registry; the reader's settings (`API`, `WS`, `API_TOKEN`) come from the
/// environment. After the steps, what the page says happened is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provisioning_walkthrough_runs_as_written() {
    let simulator = mosaic_tests::binary::workspace_bin("mosaic-device");
    let blocks = sh_blocks(&doc("provisioning.md"));
    let stack = Stack::start_registry("docs-provisioning").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("target")).unwrap();
    std::os::unix::fs::symlink(
        Path::new(&simulator).parent().unwrap(),
        dir.path().join("target/debug"),
    )
    .unwrap();
    let vars = [
        ("API", format!("http://{}", stack.api_addr)),
        ("WS", format!("ws://{}/v1/connect", stack.ws_addr)),
        ("API_TOKEN", API_TOKEN.to_owned()),
    ];
    let mut shell = Shell::start(dir.path(), &vars);
    shell.run("set -euo pipefail\nexec 2>&1").await;

    let mut device = String::new();
    let mut steps = Vec::new();
    for (heading, block) in &blocks {
        if let Some(names) = settings_of(block) {
            for name in names {
                assert!(
                    vars.iter().any(|(v, _)| *v == name),
                    "docs/provisioning.md asks the reader to set {name}, which the test does not"
                );
            }
            continue;
        }
        let from = shell.output().len();
        let out = shell.run(block).await;
        let step = heading.split('.').next().unwrap_or_default().to_owned();
        match step.as_str() {
            "1" => {
                // The document the reader fetched is the one the gateway trusts.
                let fetched = std::fs::read_to_string(dir.path().join("jwks.json")).unwrap();
                let trusted =
                    std::fs::read_to_string(stack.jwks.as_ref().unwrap().path().join("jwks.json"))
                        .unwrap();
                let parse = |t: &str| serde_json::from_str::<Value>(t).unwrap();
                assert_eq!(parse(&fetched), parse(&trusted));
            }
            "2" => {
                let record = first_object(&out);
                assert_eq!(record["name"], "boiler-7", "{record}");
                device = record["id"].as_str().expect("an id").to_owned();
                let created = format!("device={device} name=created");
                eventually(WAIT, "registry created at Hive", || {
                    let seen = stack.hive_seen(&created);
                    async move { (!seen.is_empty()).then_some(()) }
                })
                .await;
            }
            "3" => {
                let enrolment = first_object(&out);
                assert!(enrolment["code"].is_string(), "{enrolment}");
            }
            "4" => {
                // A reader sees the device enrol and connect before going on.
                shell
                    .printed(from, &format!("<- enrolled device={device}"))
                    .await;
                shell.printed(from, "connected: ").await;
                eventually(WAIT, "the registry to record the first connect", || async {
                    let (_, r) = stack
                        .call("GET", &format!("/v1/devices/{device}"), None)
                        .await;
                    r["activated_at"].is_string().then_some(())
                })
                .await;
                let activated = format!("device={device} name=activated");
                eventually(WAIT, "registry activated at Hive", || {
                    let seen = stack.hive_seen(&activated);
                    async move { (!seen.is_empty()).then_some(()) }
                })
                .await;
            }
            "5" => {
                let record = first_object(&out);
                assert_eq!(record["id"], device.as_str(), "{record}");
                assert!(record["activated_at"].is_string(), "{record}");
                assert!(record["last_seen"].is_string(), "{record}");
                // Once: a redelivery is marked `(duplicate)` by the sample Hive.
                let activated: Vec<String> = stack
                    .hive_seen(&format!("device={device} name=activated"))
                    .into_iter()
                    .filter(|l| !l.contains("(duplicate)"))
                    .collect();
                assert_eq!(activated.len(), 1, "{activated:?}");
            }
            "6" => {
                let record = first_object(&out);
                assert_eq!(record["enabled"], false, "{record}");
                // The device's session closed with 4403 `revoked`; the simulator stopped.
                shell.printed(from, "4403").await;
                shell.printed(from, "stopped").await;
            }
            other => panic!("a block under an unexpected heading {other:?}: add its check"),
        }
        steps.push(step);
    }
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6"], "the steps run");
    let output = shell.output();
    assert!(
        !output.contains(API_TOKEN),
        "the API token was printed:\n{output}"
    );
    shell.finish().await;
    stack.stop().await;
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
