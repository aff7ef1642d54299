//! A private PostgreSQL for tests.
//!
//! The server comes from the distribution's package (`/usr/lib/postgresql/<version>/bin`),
//! runs on a free loopback port with its own data directory and unix socket
//! directory, and trades durability for speed (`fsync=off`). PostgreSQL refuses to
//! run as root, so when the tests run as root its files and processes belong to the
//! `postgres` user. Each test takes a fresh database with [`Postgres::database`].
//! The harness needs no PostgreSQL client library: it uses the package's `psql`.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::broker::free_ports;
use crate::watchdog::Watchdog;

/// Where Debian's packages put each PostgreSQL version's programs.
const POSTGRESQL_LIB: &str = "/usr/lib/postgresql";
/// How long the server may take to start or stop (0.04–0.2 s on a two-core machine).
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `psql` call may take.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// Variable naming an already running server's admin URL
/// (`postgres://postgres@127.0.0.1:<port>/postgres`).
pub const DATABASE_URL_VAR: &str = "MOSAIC_TEST_DATABASE_URL";

/// A PostgreSQL server, private to this process or shared by the whole test run.
#[derive(Debug)]
pub struct Postgres {
    admin_url: String,
    addr: SocketAddr,
    /// The package's programs, when installed here (else `psql` from `PATH`).
    bin: Option<PathBuf>,
    _private: Option<Private>,
}

#[derive(Debug)]
struct Private {
    /// Stops the server when this process exits, or on drop; declared before `dir` so
    /// that it goes first.
    watchdog: Watchdog,
    dir: tempfile::TempDir,
}

/// The server shared by every test in this process: the one the environment names,
/// or a private one started on first use.
pub fn postgres() -> &'static Postgres {
    static POSTGRES: OnceLock<Postgres> = OnceLock::new();
    POSTGRES.get_or_init(|| match std::env::var(DATABASE_URL_VAR) {
        Ok(url) => Postgres::existing(url).expect("bad database URL"),
        Err(_) => Postgres::start().expect("could not start a private PostgreSQL"),
    })
}

impl Postgres {
    /// A server someone else runs, named by its admin URL (a superuser's, on a
    /// database that exists): its databases can be created, the server not stopped.
    pub fn existing(admin_url: impl Into<String>) -> anyhow::Result<Self> {
        let admin_url = admin_url.into();
        let rest = admin_url
            .split_once("://")
            .map(|(_, r)| r)
            .context("database URL without a scheme")?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let hostport = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:5432")
        };
        let addr = hostport
            .parse()
            .with_context(|| format!("database host:port {hostport:?} must be numeric"))?;
        Ok(Postgres {
            admin_url,
            addr,
            bin: bin_dir().ok(),
            _private: None,
        })
    }

    /// Starts a private server on a free loopback port and waits until it accepts
    /// connections: 0.6–1.8 s with `initdb` on a two-core machine, depending on the load.
    ///
    /// ```no_run
    /// # async fn f() -> anyhow::Result<()> {
    /// let pg = mosaic_tests::Postgres::start()?;
    /// let url = pg.database("relay_survives_a_restart").await; // postgres://postgres@127.0.0.1:P/relay_...
    /// pg.stop_server()?;
    /// pg.start_server()?;
    /// # Ok(()) }
    /// ```
    pub fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let owner = server_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("mosaic-postgres-")
            .tempdir()?;
        let d = dir.path();
        for sub in ["sock", "log"] {
            std::fs::create_dir(d.join(sub))?;
        }
        if let Some((uid, gid)) = owner {
            for p in [d.to_owned(), d.join("sock"), d.join("log")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", p.display()))?;
            }
        }

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .arg("-D")
            .arg(d.join("data"))
            .env("HOME", d)
            .current_dir(d)
            .stdin(Stdio::null());
        as_owner(&mut initdb, owner);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let [port] = free_ports::<1>()?;
        let mut cmd = Watchdog::command(WATCHDOG);
        cmd.env("HOME", d)
            .current_dir(d)
            .env("MOSAIC_PG_BIN", &bin)
            .env("MOSAIC_PG_DIR", d)
            .env("MOSAIC_PG_PORT", port.to_string());
        as_owner(&mut cmd, owner);
        let watchdog = Watchdog::spawn(cmd, "postgres")?;
        let pg = Postgres {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            bin: Some(bin),
            _private: Some(Private { watchdog, dir }),
        };
        let line = pg.watchdog()?.line(Duration::from_secs(30))?;
        if line.trim() != "started" {
            bail!("postgres watchdog failed to start: {line:?}");
        }
        pg.wait_until_up()?;
        Ok(pg)
    }

    fn watchdog(&self) -> anyhow::Result<&Watchdog> {
        self._private
            .as_ref()
            .map(|p| &p.watchdog)
            .context("only a server of this process can be stopped and started")
    }

    fn wait_until_up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.accepts_connections() {
                return Ok(());
            }
            if let Some(status) = self.watchdog()?.exited() {
                bail!("the postgres watchdog exited ({status})");
            }
            if started.elapsed() > SERVER_TIMEOUT {
                let log = self
                    .log_file()
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .unwrap_or_default();
                bail!("PostgreSQL did not come up within {SERVER_TIMEOUT:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts connections now (`pg_isready`).
    pub fn accepts_connections(&self) -> bool {
        if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            return false;
        }
        Command::new(self.program("pg_isready"))
            .args(["-q", "-t", "2", "-d", &self.admin_url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The admin URL (database `postgres`, superuser `postgres`, no password).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The server's TCP listener (for a fault proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's log file, when this process started the server.
    pub fn log_file(&self) -> Option<PathBuf> {
        self._private
            .as_ref()
            .map(|p| p.dir.path().join("log/server.log"))
    }

    /// Creates a fresh, empty database named after `test` plus a random suffix and
    /// returns its URL, `postgres://postgres@127.0.0.1:<port>/<db>`: tests running
    /// at once never see each other's tables.
    pub async fn database(&self, test: &str) -> String {
        let name = database_name(test);
        self.psql(&self.admin_url, &format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e:#}"));
        self.url_of(&name)
    }

    /// The URL of database `db` on this server, with the admin URL's user.
    pub fn url_of(&self, db: &str) -> String {
        let (base, query) = match self.admin_url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (self.admin_url.as_str(), None),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let authority_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        let mut url = format!("{}/{db}", &base[..authority_end]);
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        url
    }

    /// Runs `sql` (one or more statements) with `psql` against `url`, stopping at the
    /// first error, and returns the rows unaligned, one per line, fields split by `|`.
    pub async fn psql(&self, url: &str, sql: &str) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(self.program("psql"));
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(PSQL_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("psql took over {PSQL_TIMEOUT:?}"))?
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops a private server (a fast shutdown: open connections are cut) and waits
    /// until it has exited. Its data stays for [`Postgres::start_server`]. A shared
    /// server is refused: stopping it would disturb every test using it.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        let answer = self.watchdog()?.send("stop", SERVER_TIMEOUT)?;
        if answer.trim() != "stopped" {
            bail!("stopping PostgreSQL: the watchdog answered {answer:?}");
        }
        Ok(())
    }

    /// Starts a private server again on the same port and data, and waits until it
    /// accepts connections (after a clean stop first, when it was running).
    pub fn start_server(&self) -> anyhow::Result<()> {
        let answer = self.watchdog()?.send("start", SERVER_TIMEOUT)?;
        if answer.trim() != "started" {
            bail!("starting PostgreSQL: the watchdog answered {answer:?}");
        }
        self.wait_until_up()
    }

    /// Stops a private server for good and removes its files (also done when the
    /// process exits, or on drop).
    pub fn shutdown(&self) {
        if let Some(p) = &self._private {
            p.watchdog.stop();
        }
    }

    /// The data directory's parent (data, socket and log directories), when this
    /// process started the server.
    pub fn dir(&self) -> Option<&Path> {
        self._private.as_ref().map(|p| p.dir.path())
    }

    /// The pid of a private server's main process (`postmaster.pid`), while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        let file = self.dir()?.join("data/postmaster.pid");
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The path of one of the package's programs (`pgbench`, `psql`), or the bare
    /// name (looked up in `PATH`) when the package's directory lacks it.
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bin {
            Some(bin) if bin.join(name).exists() => bin.join(name),
            _ => PathBuf::from(name),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A database name from a test name: lower-case letters, digits and `_`, at most 63
/// bytes with the random suffix.
fn database_name(test: &str) -> String {
    let mut base: String = test
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '_',
        })
        .take(40)
        .collect();
    if base.is_empty() {
        base.push_str("test");
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}_{}", &suffix[..16])
}

/// The programs of the newest PostgreSQL version installed.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(POSTGRESQL_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("PostgreSQL is not installed: apt-get install -y postgresql")
}

/// The `postgres` user's ids when this process runs as root (PostgreSQL refuses to
/// run as root); `None` otherwise: the server runs as the current user.
fn server_owner() -> anyhow::Result<Option<(u32, u32)>> {
    if std::fs::metadata("/proc/self")?.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let ids = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .context("no postgres user (the postgresql package creates it)")?;
    Ok(Some(ids))
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
}

/// Runs as `sh -c` (as the server's user): starts the server, prints "started", then
/// serves commands on its standard input, each answered with one line: `stop` ->
/// `stopped` (a fast shutdown), `start` -> `started`. At end-of-file it stops the
/// server and removes the directories.
const WATCHDOG: &str = r#"
set -u
D="$MOSAIC_PG_DIR"; BIN="$MOSAIC_PG_BIN"; pg=
launch() {
  "$BIN/postgres" -D "$D/data" -p "$MOSAIC_PG_PORT" -k "$D/sock" \
    -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off -c max_connections=300 \
    >>"$D/log/server.log" 2>&1 </dev/null &
  pg=$!
}
halt() {
  if [ -n "$pg" ]; then
    kill -INT "$pg" 2>/dev/null
    wait "$pg" 2>/dev/null
  fi
  pg=
}
launch
echo started
while read -r verb; do
  case "$verb" in
    stop) halt; echo stopped ;;
    start) halt; launch; echo started ;;
    *) echo "unknown command $verb" ;;
  esac
done
halt
rm -rf "$D"
exit 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_valid_identifiers() {
        let name = database_name("stack::e2e::Relay-Survives a RESTART of everything, twice");
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        assert!(name.starts_with("stack__e2e__relay_survives_a_restart_of"));
        assert_ne!(database_name("t"), database_name("t"));
    }

    #[test]
    fn urls_of_other_databases_keep_user_host_and_options() {
        let pg = Postgres::existing("postgres://admin:pw@127.0.0.1:6543/postgres?sslmode=disable")
            .unwrap();
        assert_eq!(pg.addr(), SocketAddr::from(([127, 0, 0, 1], 6543)));
        assert_eq!(
            pg.url_of("t_1"),
            "postgres://admin:pw@127.0.0.1:6543/t_1?sslmode=disable"
        );
        let bare = Postgres::existing("postgres://postgres@127.0.0.1:5432").unwrap();
        assert_eq!(bare.url_of("x"), "postgres://postgres@127.0.0.1:5432/x");
    }
}
