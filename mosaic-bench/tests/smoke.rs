//! Smoke test: every scenario of `mosaic-bench` at a tiny size (20 devices, a few
//! seconds each) against the services' binaries of this build; the registry
//! scenario also starts a private PostgreSQL from the distribution's package, as the
//! tests do. It asserts only that each scenario completes and reports each figure
//! beside a baseline, never a performance threshold: these machines are shared and
//! noisy.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mosaic-bench");
/// Bound on the whole run (a broker start on a busy machine included).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn every_scenario_runs_at_a_tiny_size() {
    let dir = Path::new(BIN).parent().expect("the target directory");
    for service in ["websocket-service", "device-service"] {
        assert!(
            dir.join(service).is_file(),
            "{} is missing: cargo build -p websocket-service -p device-service (cargo test --workspace builds it)",
            dir.join(service).display()
        );
    }
    let out = tempfile::tempdir().expect("a temporary directory");
    let json = out.path().join("results.json");
    let mut child = Command::new(BIN)
        .arg("--json")
        .arg(&json)
        .arg("--plots")
        .arg(out.path().join("plots"))
        .args(["--no-progress", "all", "--tiny"])
        .stdin(Stdio::null())
        .spawn()
        .expect("mosaic-bench starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for mosaic-bench") {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mosaic-bench all --tiny did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "mosaic-bench all --tiny failed: {status}");

    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the results file")).expect("JSON");
    let scenarios: Vec<&str> = run["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| s["scenario"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        scenarios,
        ["idle", "relay", "request", "broadcast", "soak", "registry"]
    );
    for s in run["scenarios"].as_array().expect("scenarios") {
        let figures = s["figures"].as_array().expect("figures");
        assert!(!figures.is_empty(), "{} reported no figure", s["scenario"]);
        for f in figures {
            assert!(
                f["figure"]["value"].is_number() && f["baseline"]["value"].is_number(),
                "{}: a figure without its baseline: {f}",
                s["scenario"]
            );
        }
    }
}
