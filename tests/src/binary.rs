//! A service binary run for real: a cleared environment, refused settings, SIGTERM,
//! SIGKILL, its memory, its standard error kept for a failing test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{readiness, within};

/// How long each step waits: start, readiness, exit.
pub const WAIT: Duration = Duration::from_secs(30);

/// `bin` with only `PATH` and `vars` in its environment; killed if the test ends
/// before it does.
pub fn command(bin: &str, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `bin` to its end and asserts it refused to start: exit code 64 and a single
/// stderr line naming `setting`. Returns the line.
pub async fn assert_refused(bin: &str, vars: &[(&str, &str)], setting: &str) -> String {
    let out = within(WAIT, "the binary to exit", command(bin, vars).output())
        .await
        .expect("the binary starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        out.status.code(),
        Some(mosaic_runtime::config::EXIT_CONFIG),
        "stderr: {lines:?}"
    );
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    assert!(
        lines[0].contains(setting),
        "{setting} not named: {}",
        lines[0]
    );
    lines[0].to_owned()
}

/// Raises this process's soft limit on open files to at least `wanted` (up to the
/// hard limit), so a test can hold many connections; the binaries it starts inherit
/// the limit. Returns the soft limit in force afterwards.
#[allow(unsafe_code)]
pub fn raise_open_files(wanted: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by
    // reference, which lives for the whole call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < wanted {
            let raised = libc::rlimit {
                rlim_cur: wanted.min(lim.rlim_max),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// The value of `name` in the `literals` of the Kubernetes base's generators
/// (`k8s/base/kustomization.yaml`), e.g. the placeholder `JWT_SECRET` it publishes.
pub fn manifest_literal(name: &str) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let prefix = format!("{name}=");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("- ")?.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no literal {name}= in {}", path.display()))
        .trim()
        .to_owned()
}

/// The path of a workspace binary built next to the running test executable
/// (`<target>/<profile>/<name>`), for tests outside the binary's own package, which
/// Cargo gives no `CARGO_BIN_EXE_<name>` (`cargo test --workspace` builds every
/// service binary before any test runs).
///
/// Panics, naming the command that fixes it, when the binary is missing or older
/// than any source file its dep-info file (`<name>.d`, written by Cargo) lists: a
/// test must never drive yesterday's code.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test executable's path");
    // <target>/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in <target>/<profile>/deps");
    let bin = dir.join(name);
    let build = format!("build it first: cargo build -p {name}");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {build}", bin.display()));
    let depinfo = dir.join(format!("{name}.d"));
    let text = std::fs::read_to_string(&depinfo)
        .unwrap_or_else(|e| panic!("{}: {e}; {build}", depinfo.display()));
    for source in depinfo_sources(&text) {
        // A source that is gone or changed since the build: the binary is stale.
        let stale = match std::fs::metadata(&source).and_then(|m| m.modified()) {
            Ok(changed) => changed > built,
            Err(_) => true,
        };
        if stale {
            panic!(
                "{} is older than {} (or that file is gone); {build}",
                bin.display(),
                source.display()
            );
        }
    }
    bin.to_string_lossy().into_owned()
}

/// The prerequisites of the first rule of a Makefile-style dep-info file (`target:
/// dep dep ...`, spaces in paths escaped with a backslash).
fn depinfo_sources(text: &str) -> Vec<PathBuf> {
    let Some(line) = text.lines().next() else {
        return Vec::new();
    };
    let Some((_, deps)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ' ' => {
                if !current.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(PathBuf::from(current));
    }
    out
}

/// A running service binary, listening on a free loopback port.
///
/// Started with [`Running::start_logged`] or [`Running::spawn_logged`], its standard
/// error goes to a file: [`Running::stderr`] reads it, and it is printed when the
/// `Running` is dropped during a panic (a failing assertion, a timed-out wait).
#[derive(Debug)]
pub struct Running {
    child: Child,
    /// Its `LISTEN_ADDR`.
    pub addr: SocketAddr,
    /// The file holding its standard error, and the directory that owns the file.
    log: Option<(PathBuf, tempfile::TempDir)>,
    /// For [`Running::metric`]: one kept-alive connection, not one per poll.
    http: reqwest::Client,
}

impl Running {
    /// Starts `bin` with `vars` plus `LISTEN_ADDR` on a free port, and waits until its
    /// `/readyz` answers 200. Its output is discarded.
    pub async fn start(bin: &str, vars: &[(&str, &str)]) -> Running {
        let running = Self::launch(bin, &[], vars, false);
        readiness(running.addr, true, WAIT).await;
        running
    }

    /// Like [`Running::start`], keeping its standard error in a file.
    ///
    /// ```no_run
    /// # async fn f() {
    /// # use mosaic_tests::binary::Running;
    /// let mut service = Running::start_logged("target/debug/device-service", &[]).await;
    /// let rss = service.rss_bytes().expect("it runs");
    /// let status = service.kill().await; // SIGKILL, reaped
    /// println!("{rss} bytes, then {status}; its stderr:\n{}", service.stderr());
    /// # }
    /// ```
    pub async fn start_logged(bin: &str, vars: &[(&str, &str)]) -> Running {
        let running = Self::launch(bin, &[], vars, true);
        // A panic here drops `running`, which prints its standard error.
        readiness(running.addr, true, WAIT).await;
        running
    }

    /// Starts `bin` with `args`, `vars` plus `LISTEN_ADDR` on a free port, keeping its
    /// standard error in a file, without waiting for readiness: for a binary started
    /// while what it needs is down, or one without `/readyz`.
    pub fn spawn_logged(bin: &str, args: &[&str], vars: &[(&str, &str)]) -> Running {
        Self::launch(bin, args, vars, true)
    }

    fn launch(bin: &str, args: &[&str], vars: &[(&str, &str)], logged: bool) -> Running {
        let [port] = crate::broker::free_ports::<1>().expect("a free port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listen = addr.to_string();
        let mut all = vars.to_vec();
        all.push(("LISTEN_ADDR", &listen));
        let mut cmd = command(bin, &all);
        cmd.args(args).stdout(Stdio::null());
        let log = if logged {
            let dir = tempfile::Builder::new()
                .prefix("mosaic-stderr-")
                .tempdir()
                .expect("a directory for the binary's stderr");
            let path = dir.path().join("stderr.log");
            let file = std::fs::File::create(&path).expect("the stderr file");
            cmd.stderr(file);
            Some((path, dir))
        } else {
            cmd.stderr(Stdio::null());
            None
        };
        let child = cmd.spawn().expect("the binary starts");
        Running {
            child,
            addr,
            log,
            http: reqwest::Client::new(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the binary has not been reaped")
    }

    /// Its resident memory now (`VmRSS`), in bytes; `None` once it has exited.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.child.id()?)
    }

    /// What it wrote to standard error so far (empty unless started with
    /// [`Running::start_logged`] or [`Running::spawn_logged`]).
    pub fn stderr(&self) -> String {
        self.log
            .as_ref()
            .and_then(|(path, _)| std::fs::read(path).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits at most [`WAIT`] for it to exit by itself and returns its exit status.
    pub async fn wait(&mut self) -> ExitStatus {
        within(WAIT, "the binary to exit", self.child.wait())
            .await
            .expect("wait for the binary")
    }

    /// Kills it with SIGKILL (a crash, an OOM kill) and reaps it; returns its exit
    /// status (killed by signal 9, unless it had already exited).
    pub async fn kill(&mut self) -> ExitStatus {
        // `start_kill` fails only when the process was already reaped.
        let _ = self.child.start_kill();
        within(WAIT, "the killed binary to be reaped", self.child.wait())
            .await
            .expect("wait for the binary")
    }

    /// The value of one series in its `GET /metrics` answer (Prometheus text), such
    /// as `mosaic_amqp_connections_total{link="device-service",outcome="lost"}`;
    /// `None` when the series is absent. Panics when `/metrics` does not answer.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = within(WAIT, "GET /metrics", async {
            self.http
                .get(format!("http://{}/metrics", self.addr))
                .send()
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("the metrics text")
        })
        .await;
        metric_value(&text, series)
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the binary is running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid} failed");
    }

    /// Asserts the process exits with status 0 within [`WAIT`] (a process that
    /// ignored SIGTERM would still be running) and no longer accepts connections.
    pub async fn assert_exits_cleanly(mut self) {
        let status = within(WAIT, "the binary to exit", self.child.wait())
            .await
            .expect("wait for the binary");
        assert_eq!(status.code(), Some(0), "exit status {status}");
        let connect = within(
            WAIT,
            "a connect to the closed port",
            tokio::net::TcpStream::connect(self.addr),
        )
        .await;
        assert!(connect.is_err(), "{} still accepts connections", self.addr);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking() && self.log.is_some() {
            eprintln!(
                "--- stderr of pid {:?} (LISTEN_ADDR {}) ---\n{}--- end ---",
                self.child.id(),
                self.addr,
                self.stderr()
            );
        }
    }
}

/// The resident memory of process `pid` (`VmRSS` in `/proc/<pid>/status`), in bytes;
/// `None` when there is no such process (a zombie has none either).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The value of `series` (a metric name with its labels, exactly as rendered) in
/// Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depinfo_prerequisites_with_escaped_spaces() {
        let text = "/t/debug/svc: /w/a.rs /w/my\\ dir/b.rs\n\n/w/a.rs:\n";
        assert_eq!(
            depinfo_sources(text),
            vec![PathBuf::from("/w/a.rs"), PathBuf::from("/w/my dir/b.rs")]
        );
        assert!(depinfo_sources("").is_empty());
    }

    #[test]
    fn a_series_is_found_by_its_exact_labels() {
        let text = "# TYPE c counter\nc{a=\"x\",b=\"y\"} 3\nc{a=\"x\"} 1\n";
        assert_eq!(metric_value(text, "c{a=\"x\"}"), Some(1.0));
        assert_eq!(metric_value(text, "c{a=\"x\",b=\"y\"}"), Some(3.0));
        assert_eq!(metric_value(text, "c{a=\"z\"}"), None);
    }
}
