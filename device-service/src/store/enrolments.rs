//! One-time enrolment codes, stored as SHA-256 digests only.

use time::OffsetDateTime;
use uuid::Uuid;

use super::{Store, StoreError};

/// What became of a request for a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// The code is stored.
    Yes,
    /// The device is disabled: no code.
    Disabled,
}

impl Store {
    /// Stores a code (its digest) for `device`, valid until `expires_at`; also drops
    /// codes that expired long ago. [`StoreError::NotFound`] when the device is not
    /// registered.
    pub async fn create_enrolment(
        &self,
        device: Uuid,
        code_hash: &[u8],
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
    ) -> Result<Issued, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let enabled: bool = tx
            .query_opt(
                "SELECT enabled FROM devices WHERE id = $1 FOR SHARE",
                &[&device],
            )
            .await?
            .ok_or(StoreError::NotFound)?
            .get(0);
        if !enabled {
            return Ok(Issued::Disabled);
        }
        tx.execute(
            "INSERT INTO enrolments (code_hash, device, created_at, expires_at)
             VALUES ($1, $2, $3, $4)",
            &[&code_hash, &device, &now, &expires_at],
        )
        .await?;
        tx.execute(
            "DELETE FROM enrolments WHERE expires_at < $1::timestamptz - interval '7 days'",
            &[&now],
        )
        .await?;
        tx.commit().await?;
        Ok(Issued::Yes)
    }

    /// Uses a code, once: `Some((device, revoked_at))` when the code exists, is
    /// unused and unexpired and its device is enabled; it is marked used in the same
    /// statement, so of two concurrent attempts (on any replicas) exactly one wins.
    pub async fn redeem_enrolment(
        &self,
        code_hash: &[u8],
    ) -> Result<Option<(Uuid, Option<OffsetDateTime>)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "UPDATE enrolments e SET used_at = now()
                 FROM devices d
                 WHERE e.code_hash = $1 AND e.used_at IS NULL AND e.expires_at > now()
                   AND d.id = e.device AND d.enabled
                 RETURNING e.device, d.revoked_at",
                &[&code_hash],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}
