//! A real binary run for fault drills: its pid and memory, SIGKILL, its stderr kept.
//! The binary is `mosaic-postgres`, whose server must go with it however it ends.

use std::os::unix::process::ExitStatusExt;

use mosaic_tests::binary::{Running, rss_bytes};
use mosaic_tests::{eventually, postgres::DATABASE_URL_VAR};

use crate::{START, WAIT, processes_mentioning};

const BIN: &str = env!("CARGO_BIN_EXE_mosaic-postgres");

#[tokio::test]
async fn a_killed_owner_takes_its_server_with_it() {
    let dir = tempfile::tempdir().expect("a directory for the env file");
    let env_file = dir.path().join("postgres.env");
    let env_arg = env_file.to_string_lossy().into_owned();
    let mut owner = Running::spawn_logged(BIN, &["--env-file", &env_arg], &[]);
    let url = eventually(START, "mosaic-postgres to write its env file", || async {
        let text = std::fs::read_to_string(&env_file).ok()?;
        let line = text.lines().find(|l| l.starts_with(DATABASE_URL_VAR))?;
        Some(line[DATABASE_URL_VAR.len() + 1..].to_owned())
    })
    .await;
    let pg = mosaic_tests::Postgres::existing(url.clone()).expect("its URL parses");
    let port = pg.addr().port();
    assert_eq!(
        pg.psql(&url, "SELECT 1")
            .await
            .expect("the server answers")
            .trim(),
        "1"
    );

    let rss = owner.rss_bytes().expect("its memory");
    assert!(rss > 100_000, "an implausible RSS of {rss} bytes");
    assert_eq!(rss_bytes(owner.pid()).map(|r| r > 0), Some(true));
    let needle = format!("MOSAIC_PG_PORT={port}");
    assert!(
        !processes_mentioning(&needle).is_empty(),
        "the watchdog and the server carry {needle}"
    );

    let pid = owner.pid();
    let status = owner.kill().await;
    assert_eq!(status.signal(), Some(9), "{status}");
    assert_eq!(rss_bytes(pid), None, "a reaped process has no memory");
    assert_eq!(owner.rss_bytes(), None);
    eventually(WAIT, "the server and its watchdog to exit", || async {
        processes_mentioning(&needle).is_empty().then_some(())
    })
    .await;
    assert!(
        !pg.accepts_connections(),
        "port {port} still accepts connections"
    );
}

#[tokio::test]
async fn stderr_is_kept_for_the_test() {
    let mut bad = Running::spawn_logged(BIN, &["--no-such-flag"], &[]);
    let status = bad.wait().await;
    assert!(!status.success(), "{status}");
    let stderr = bad.stderr();
    assert!(stderr.contains("--no-such-flag"), "stderr: {stderr:?}");
    assert_eq!(bad.stderr(), stderr, "a second read sees the same file");
}
