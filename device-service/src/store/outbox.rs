//! The outbox: bus messages committed in the same transaction as the change that
//! causes them, and taken out only once the broker confirmed them.
//!
//! Any bus message fits (an exchange, a routing key, headers as a JSON object, a
//! body), so later aggregates (delivery reports, transfers) commit theirs the same
//! way. One replica drains at a time (a transaction-scoped advisory lock), oldest
//! first, so the messages of one device keep the order of its changes.

use std::future::Future;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::{Store, StoreError};

/// `pg_try_advisory_xact_lock` key of the drain: "outbox" in ASCII.
const DRAIN_LOCK_KEY: i64 = 0x6f75_7462_6f78;

/// A bus message waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// The exchange (`""`: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The message's identity (`message_id`), kept across republishing.
    pub message_id: Uuid,
    /// The headers, as JSON (mapped to AMQP values when published).
    pub headers: Map<String, Value>,
    /// The body.
    pub body: Vec<u8>,
    /// Persistent (delivery mode 2).
    pub persistent: bool,
}

/// Adds `m` to the outbox inside `tx`.
pub(crate) async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    m: &OutboxMessage,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO outbox (exchange, routing_key, message_id, headers, body, persistent)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &m.exchange,
            &m.routing_key,
            &m.message_id,
            &Value::Object(m.headers.clone()),
            &m.body,
            &m.persistent,
        ],
    )
    .await?;
    Ok(())
}

impl Store {
    /// Drains up to `limit` of the oldest messages: `publish` gets them in order and
    /// answers how many of the first ones the broker confirmed; those are deleted and
    /// the rest stay for the next round. `None` when another replica is draining.
    pub async fn drain_outbox<F, Fut>(
        &self,
        limit: i64,
        publish: F,
    ) -> Result<Option<usize>, StoreError>
    where
        F: FnOnce(Vec<OutboxMessage>) -> Fut,
        Fut: Future<Output = usize>,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&DRAIN_LOCK_KEY])
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let rows = tx
            .query(
                "SELECT id, exchange, routing_key, message_id, headers, body, persistent
                 FROM outbox ORDER BY id LIMIT $1",
                &[&limit],
            )
            .await?;
        if rows.is_empty() {
            return Ok(Some(0));
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.push(r.get::<_, i64>(0));
            let headers = match r.get::<_, Value>(4) {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            messages.push(OutboxMessage {
                exchange: r.get(1),
                routing_key: r.get(2),
                message_id: r.get(3),
                headers,
                body: r.get(5),
                persistent: r.get(6),
            });
        }
        let published = publish(messages).await.min(ids.len());
        if published > 0 {
            tx.execute(
                "DELETE FROM outbox WHERE id = ANY($1)",
                &[&&ids[..published]],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(published))
    }

    /// How many messages wait in the outbox.
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_one("SELECT count(*) FROM outbox", &[])
            .await?
            .get(0))
    }
}
