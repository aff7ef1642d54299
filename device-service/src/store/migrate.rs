//! Schema migrations, embedded in the binary and applied at start.
//!
//! All of them run in one transaction that first takes a transaction-scoped advisory
//! lock: a second replica starting at the same time waits for the first to commit,
//! then finds everything applied. Each applied migration is recorded with a SHA-256
//! of its text; a recorded migration whose text changed stops the start (an edited
//! migration is a bug), and versions this binary does not know (a newer replica
//! applied them) are left alone: migrations only add.

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::StoreError;

/// `pg_advisory_xact_lock` key of the migrations: "mosaic" in ASCII.
const LOCK_KEY: i64 = 0x6d6f_7361_6963;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "registry", include_str!("migrations/0001_registry.sql"))];

/// Applies what is missing; returns how many migrations it applied.
pub(super) async fn run(client: &mut deadpool_postgres::Object) -> Result<usize, StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS mosaic_schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    bytea NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: Vec<(i32, Vec<u8>)> = tx
        .query(
            "SELECT version, checksum FROM mosaic_schema_migrations",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut count = 0;
    for (version, name, sql) in MIGRATIONS {
        let sum = Sha256::digest(sql.as_bytes()).to_vec();
        match applied.iter().find(|(v, _)| v == version) {
            Some((_, recorded)) if *recorded == sum => continue,
            Some(_) => {
                return Err(StoreError::Unavailable(format!(
                    "migration {version} ({name}) differs from the one applied to this database"
                )));
            }
            None => {}
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO mosaic_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &sum],
        )
        .await?;
        info!(version, name, "migration applied");
        count += 1;
    }
    let known: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
    if let Some((v, _)) = applied.iter().find(|(v, _)| !known.contains(v)) {
        warn!(
            version = v,
            "the database has a migration this binary does not know (a newer release ran)"
        );
    }
    tx.commit().await?;
    Ok(count)
}
