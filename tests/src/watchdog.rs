//! The supervising shell behind every server the harness starts.
//!
//! A server started by a test must stop when the test process ends, however it ends:
//! a panic, `std::process::exit`, SIGKILL. Destructors do not run in the last two, so
//! the harness does not rely on them. Instead each server runs under `sh -c SCRIPT`,
//! whose standard input is a pipe whose write end only this process holds. When the
//! process exits the kernel closes that end, the script's `read` sees end-of-file, and
//! the script stops its servers, waits for them and removes their directories.
//!
//! While the pipe is open the script may also take commands, one line each, and
//! answer each with one line on its standard output ("stop 1" -> "stopped 1").
//! Servers started by the script must send their own output elsewhere (a log file),
//! so that the script's standard output carries only its answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use anyhow::{Context, bail};

/// A running supervising shell.
#[derive(Debug)]
pub(crate) struct Watchdog {
    what: &'static str,
    /// Closing this pipe (at process exit, or in [`Watchdog::stop`]) ends the script.
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
    /// The script's output lines, read by a thread of their own.
    lines: Mutex<Receiver<String>>,
}

impl Watchdog {
    /// Starts `sh -c script` with the environment already set on `cmd` (made with
    /// [`Watchdog::command`]). `what` names the server in error messages.
    pub(crate) fn spawn(mut cmd: Command, what: &'static str) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C on the test run reaches the tests only, and
            // the script, seeing its pipe close, stops the servers in order.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning the {what} watchdog"))?;
        let stdout = child.stdout.take().context("watchdog stdout")?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name(format!("{what}-watchdog"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the watchdog reader")?;
        Ok(Watchdog {
            what,
            stdin: Mutex::new(child.stdin.take()),
            child: Mutex::new(child),
            lines: Mutex::new(rx),
        })
    }

    /// A `sh -c script` command to pass to [`Watchdog::spawn`] once its environment
    /// is set.
    pub(crate) fn command(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    /// The script's next output line, waiting at most `timeout`.
    pub(crate) fn line(&self, timeout: Duration) -> anyhow::Result<String> {
        match self.lines.lock().unwrap().recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                bail!("the {} watchdog said nothing for {timeout:?}", self.what)
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the {} watchdog exited ({:?})", self.what, self.exited())
            }
        }
    }

    /// Sends one command line and returns the script's one-line answer, waiting at
    /// most `timeout` for it.
    pub(crate) fn send(&self, command: &str, timeout: Duration) -> anyhow::Result<String> {
        {
            let mut stdin = self.stdin.lock().unwrap();
            let pipe = stdin
                .as_mut()
                .with_context(|| format!("the {} watchdog was stopped", self.what))?;
            writeln!(pipe, "{command}")
                .and_then(|()| pipe.flush())
                .with_context(|| format!("writing to the {} watchdog", self.what))?;
        }
        self.line(timeout)
    }

    /// The script's exit status, once it has ended.
    pub(crate) fn exited(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Closes the pipe and waits for the script to stop its servers and exit.
    /// Idempotent.
    pub(crate) fn stop(&self) {
        drop(self.stdin.lock().unwrap().take());
        let _ = self.child.lock().unwrap().wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}
