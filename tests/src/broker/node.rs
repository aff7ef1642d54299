//! One RabbitMQ node's configuration and tools, shared by the single private node
//! and the cluster: its extra settings, files and environment, `rabbitmqctl`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::RABBITMQ_BIN;

/// The period of the consumer-timeout check that [`NodeConfig::consumer_timeout`]
/// sets (the broker's own default is one minute).
pub const CONSUMER_TIMEOUT_TICK: Duration = Duration::from_secs(1);

/// Extra configuration for a node this process starts: lines appended to its
/// `rabbitmq.conf` and settings for its `advanced.config`.
///
/// The harness's own lines come first (listeners, management port, logging); do not
/// repeat those keys.
///
/// # `consumer_timeout` and how soon it acts
///
/// `consumer_timeout = N` alone is coarse. Each channel checks its oldest unacked
/// delivery only on a timer, `channel_tick_interval`, which fires every minute by
/// default, counted from the channel's opening; the channel is closed at the first
/// tick that finds the delivery older than `N`. Measured on RabbitMQ 3.10.8: with
/// `consumer_timeout = 3000` and the default timer, a channel that received its
/// delivery in its first milliseconds was closed 60.0 s after it (three runs out of
/// three), not 3 s.
///
/// [`NodeConfig::consumer_timeout`] therefore also sets the timer to
/// [`CONSUMER_TIMEOUT_TICK`] (one second). The channel is then closed with `406
/// PRECONDITION_FAILED - delivery acknowledgement on channel N timed out` between the
/// timeout and the timeout plus one second after the delivery. Measured, six
/// deliveries each, spread over the tick: 2.14–3.00 s for 2000 ms, 3.15–4.00 s for
/// 3000 ms, 5.14–6.00 s for 5000 ms. Size a test's wait as the timeout plus the tick
/// plus a margin for a loaded machine.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    conf: Vec<String>,
    rabbit: Vec<(String, String)>,
    advanced: Vec<String>,
    plugins: Vec<String>,
}

impl NodeConfig {
    /// No extra configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one `rabbitmq.conf` line, such as `"consumer_timeout = 3000"` or
    /// `"vm_memory_high_watermark.absolute = 50MB"`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }

    /// Sets an environment key of the `rabbit` application in `advanced.config`, for
    /// settings `rabbitmq.conf` cannot express: `rabbit("channel_tick_interval",
    /// "1000")`. `value` is an Erlang term.
    pub fn rabbit(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.rabbit.push((key.into(), value.into()));
        self
    }

    /// Adds another application's entry to `advanced.config`, as an Erlang term:
    /// `"{rabbitmq_management, [{rates_mode, none}]}"`. Use [`NodeConfig::rabbit`]
    /// for the `rabbit` application.
    pub fn advanced(mut self, entry: impl Into<String>) -> Self {
        self.advanced.push(entry.into());
        self
    }

    /// Enables a plugin of the distribution besides `rabbitmq_management`, such as
    /// `"rabbitmq_web_mqtt"` (offline, from the `enabled_plugins` file). Move its
    /// listeners off their default ports with [`NodeConfig::conf`] lines: another
    /// node on this machine may hold them.
    pub fn plugin(mut self, name: impl Into<String>) -> Self {
        self.plugins.push(name.into());
        self
    }

    /// The `enabled_plugins` file's text.
    fn enabled_plugins(&self) -> String {
        let mut names = vec!["rabbitmq_management".to_owned()];
        names.extend(self.plugins.iter().cloned());
        format!("[{}].\n", names.join(","))
    }

    /// A delivery left unacked longer than `timeout` closes its channel, checked
    /// every [`CONSUMER_TIMEOUT_TICK`] (see the type's documentation for the figures).
    pub fn consumer_timeout(self, timeout: Duration) -> Self {
        self.conf(format!("consumer_timeout = {}", timeout.as_millis()))
            .rabbit(
                "channel_tick_interval",
                CONSUMER_TIMEOUT_TICK.as_millis().to_string(),
            )
    }

    /// The `advanced.config` file's text.
    fn advanced_config(&self) -> String {
        let mut entries = self.advanced.clone();
        if !self.rabbit.is_empty() {
            let settings: Vec<String> = self
                .rabbit
                .iter()
                .map(|(k, v)| format!("{{{k}, {v}}}"))
                .collect();
            entries.push(format!("{{rabbit, [{}]}}", settings.join(", ")));
        }
        format!("[{}].\n", entries.join(",\n "))
    }
}

/// One node's names, ports and files, shared by [`super::Broker`] and the cluster.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    /// `name@localhost`.
    pub(crate) name: String,
    /// Its own directory: configuration, `mnesia/`, `log/`, `rabbit.pid`.
    pub(crate) dir: PathBuf,
    pub(crate) amqp: u16,
    pub(crate) dist: u16,
    pub(crate) mgmt: u16,
}

impl NodeSpec {
    /// Writes the node's configuration files; `extra` goes after the harness's lines
    /// and before `config`'s.
    pub(crate) fn write_files(&self, config: &NodeConfig, extra: &str) -> anyhow::Result<()> {
        let d = &self.dir;
        std::fs::create_dir_all(d.join("log"))?;
        let (amqp, mgmt) = (self.amqp, self.mgmt);
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp}\n\
             management.tcp.ip = 127.0.0.1\n\
             management.tcp.port = {mgmt}\n\
             loopback_users = none\n\
             log.console = false\n\
             log.file.level = warning\n"
        );
        conf.push_str(extra);
        for line in &config.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::write(d.join("rabbitmq.conf"), conf)?;
        std::fs::write(d.join("enabled_plugins"), config.enabled_plugins())?;
        std::fs::write(d.join("env.conf"), "")?;
        std::fs::write(d.join("advanced.config"), config.advanced_config())?;
        Ok(())
    }

    /// The environment of `rabbitmq-server` for this node (all but `HOME`).
    pub(crate) fn env(&self, epmd: u16) -> Vec<(&'static str, OsString)> {
        let d = &self.dir;
        vec![
            ("RABBITMQ_NODENAME", self.name.clone().into()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.amqp.to_string().into()),
            ("RABBITMQ_DIST_PORT", self.dist.to_string().into()),
            ("ERL_EPMD_PORT", epmd.to_string().into()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_MNESIA_BASE", d.join("mnesia").into()),
            ("RABBITMQ_LOG_BASE", d.join("log").into()),
            ("RABBITMQ_PID_FILE", d.join("rabbit.pid").into()),
            // A node that fails to boot writes a crash dump into its working
            // directory, the test's (the package's source tree): keep it with the logs.
            (
                "ERL_CRASH_DUMP",
                d.join("log").join("erl_crash.dump").into(),
            ),
            ("RABBITMQ_CONF_ENV_FILE", d.join("env.conf").into()),
            ("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf").into()),
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                d.join("advanced.config").into(),
            ),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                d.join("enabled_plugins").into(),
            ),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ]
    }
}

/// Erlang's port mapper: the one on `PATH`, or the one inside the Erlang runtime.
pub(crate) fn epmd_path() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("epmd"));
    let in_erts = std::fs::read_dir("/usr/lib/erlang")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("erts-"))
        .map(|e| e.path().join("bin/epmd"));
    on_path
        .chain(in_erts)
        .find(|p| p.is_file())
        .context("epmd not found (is erlang-base installed?)")
}

/// Fails with the command that installs RabbitMQ when it is missing.
pub(crate) fn check_installed() -> anyhow::Result<()> {
    if !Path::new(RABBITMQ_BIN).join("rabbitmq-server").exists() {
        bail!("rabbitmq-server is not installed: apt-get install -y rabbitmq-server");
    }
    Ok(())
}

/// Runs `rabbitmqctl -n node args` with the cookie in `home` and the epmd on `epmd`.
/// Blocking; bounded by the tool's own 30 s timeout.
pub(crate) fn rabbitmqctl(
    home: &Path,
    epmd: u16,
    node: &str,
    args: &[&str],
) -> anyhow::Result<String> {
    let out = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
        .args(["-q", "-t", "30", "-n", node])
        .args(args)
        .env("HOME", home)
        .env("ERL_EPMD_PORT", epmd.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
