//! Self-tests of the harness: the servers it starts behave as documented, and nothing
//! of them is left running once they are stopped or their owning process dies.
//!
//! - `broker`: a private node with extra configuration (a short `consumer_timeout`).
//! - `cluster`: three nodes form a cluster, keep serving with one down, and rejoin.
//! - `postgres`: databases are isolated, the server stops and starts again.
//! - `binary`: a real binary killed, its memory read, its stderr kept.
//!
//! The `*_owner` tests are ignored: each runs in a child process started by another
//! test, which kills it with SIGKILL and checks that its servers went with it.

mod binary;
mod broker;
mod cluster;
mod postgres;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mosaic_tests::eventually;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for anything but a server start.
pub const WAIT: Duration = Duration::from_secs(30);
/// How long a server start may take (RabbitMQ: up to 17 s beside a build; a cluster
/// longer).
pub const START: Duration = Duration::from_secs(180);

/// Set in the environment of a child process started by [`spawn_owner`].
const OWNER_VAR: &str = "MOSAIC_HARNESS_OWNER";
/// The line an owner child prints once its server runs.
const OWNER_LINE: &str = "owner-dir ";

/// Whether this process is an owner child started by [`spawn_owner`].
pub fn is_owner_child() -> bool {
    std::env::var_os(OWNER_VAR).is_some()
}

/// Runs the ignored test `test` (its full path: `module::name`) of this binary in a
/// child process and waits until it has printed its server's directory; returns the
/// child and that directory.
pub async fn spawn_owner(test: &str) -> (Child, PathBuf) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_VAR, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the owner child starts");
    let mut lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
    let dir = mosaic_tests::within(START, "the owner child's server", async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read the owner's output")
                .expect("the owner child exited before its server ran");
            // libtest prints "test NAME ... " without a newline before the test runs.
            if let Some((_, dir)) = line.split_once(OWNER_LINE) {
                break PathBuf::from(dir);
            }
        }
    })
    .await;
    assert!(
        dir.exists(),
        "{} should exist while its owner runs",
        dir.display()
    );
    // Keep draining its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, dir)
}

/// In an owner child: prints the server's directory for the parent, then waits to be
/// killed (at most five minutes).
pub fn announce_and_wait(dir: &Path) {
    use std::io::Write;
    println!("{OWNER_LINE}{}", dir.display());
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(300));
    panic!("the owner child was not killed within five minutes");
}

/// Waits (bounded) until `dir` is gone and no process names it in its command line
/// or environment: the servers, epmd and the watchdog shell all carry it.
pub async fn assert_nothing_left(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let left = eventually(WAIT, &format!("every process of {needle} to exit"), || {
        let needle = needle.clone();
        async move {
            let left = processes_mentioning(&needle);
            (left.is_empty() && !Path::new(&needle).exists()).then_some(left)
        }
    })
    .await;
    assert!(left.is_empty());
}

/// The pids and command lines of the processes whose command line or environment
/// contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let read = |f: &str| std::fs::read(entry.path().join(f)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
        let environ = String::from_utf8_lossy(&read("environ")).into_owned();
        // A zombie has neither; it is gone once reaped.
        if cmdline.contains(needle) || environ.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}
