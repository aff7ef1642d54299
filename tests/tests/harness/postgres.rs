//! The private PostgreSQL: isolated databases, a server that stops and starts again
//! with its data, and nothing left once it is shut down.

use std::time::Instant;

use mosaic_tests::{Postgres, postgres};
use tokio::task::block_in_place;

use crate::assert_nothing_left;

#[tokio::test]
async fn each_test_gets_an_isolated_database() {
    let pg = postgres();
    let a = pg.database("harness::isolated-a").await;
    let b = pg.database("harness::isolated-a").await;
    assert_ne!(a, b, "two calls give two databases");
    assert!(a.starts_with("postgres://"), "{a}");
    pg.psql(
        &a,
        "CREATE TABLE device (id text PRIMARY KEY); INSERT INTO device VALUES ('d1')",
    )
    .await
    .expect("a table in database a");
    let in_a = pg.psql(&a, "SELECT id FROM device").await.expect("query a");
    assert_eq!(in_a.trim(), "d1");
    let in_b = pg
        .psql(&b, "SELECT to_regclass('device') IS NULL")
        .await
        .expect("query b");
    assert_eq!(in_b.trim(), "t", "database b must not see a's table");
    let name = pg
        .psql(&b, "SELECT current_database()")
        .await
        .expect("query b's name");
    assert!(b.ends_with(name.trim()), "{b} vs {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stops_and_starts_with_its_data() {
    let started = Instant::now();
    let pg = block_in_place(Postgres::start).expect("a private PostgreSQL");
    println!("private PostgreSQL up in {:?}", started.elapsed());
    let dir = pg
        .dir()
        .expect("a private server has a directory")
        .to_owned();
    let url = pg.database("harness-stop-start").await;
    pg.psql(&url, "CREATE TABLE t (n int); INSERT INTO t VALUES (42)")
        .await
        .expect("write a row");

    let stopped = Instant::now();
    block_in_place(|| pg.stop_server()).expect("stop");
    println!("stopped in {:?}", stopped.elapsed());
    assert!(
        !pg.accepts_connections(),
        "the server still accepts connections"
    );
    let err = pg
        .psql(&url, "SELECT 1")
        .await
        .expect_err("a query while the server is down");
    assert!(format!("{err:#}").contains("psql failed"), "{err:#}");

    let restarted = Instant::now();
    block_in_place(|| pg.start_server()).expect("start again");
    println!("started again in {:?}", restarted.elapsed());
    let n = pg
        .psql(&url, "SELECT n FROM t")
        .await
        .expect("read the row");
    assert_eq!(n.trim(), "42", "the data survives a restart");

    block_in_place(|| pg.shutdown());
    assert!(!pg.accepts_connections());
    assert_nothing_left(&dir).await;
}
