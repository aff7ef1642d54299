//! The device registry's rows. Each change commits with the outbox messages the
//! caller builds from the row it produced.

use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;
use uuid::Uuid;

use super::outbox::{self, OutboxMessage};
use super::{Store, StoreError};

const COLUMNS: &str = "id, name, external_id, type, groups, attributes, enabled, created_at, \
                       updated_at, activated_at, last_seen, revoked_at";

/// A device record.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Its UUID (the `sub` of its tokens).
    pub id: Uuid,
    /// A name for people.
    pub name: String,
    /// Its id in another system (serial number, asset tag), unique when set.
    pub external_id: Option<String>,
    /// Its kind (model, product line).
    pub device_type: Option<String>,
    /// Its groups.
    pub groups: Vec<String>,
    /// Anything JSON (an object).
    pub attributes: Value,
    /// Whether it may connect, enrol and renew.
    pub enabled: bool,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
    /// Its first connect, once seen.
    pub activated_at: Option<OffsetDateTime>,
    /// Its latest connect or disconnect.
    pub last_seen: Option<OffsetDateTime>,
    /// Its latest revocation: tokens issued at or before it are refused.
    pub revoked_at: Option<OffsetDateTime>,
}

impl Device {
    fn from_row(r: &Row) -> Self {
        Device {
            id: r.get(0),
            name: r.get(1),
            external_id: r.get(2),
            device_type: r.get(3),
            groups: r.get(4),
            attributes: r.get(5),
            enabled: r.get(6),
            created_at: r.get(7),
            updated_at: r.get(8),
            activated_at: r.get(9),
            last_seen: r.get(10),
            revoked_at: r.get(11),
        }
    }
}

/// A device to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    /// Its UUID.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// External id.
    pub external_id: Option<String>,
    /// Type.
    pub device_type: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Attributes (an object).
    pub attributes: Value,
    /// Creation time.
    pub at: OffsetDateTime,
}

/// The new values of a device's editable fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// Name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Attributes.
    pub attributes: Value,
    /// Enabled.
    pub enabled: bool,
    /// Set when this edit revokes the device's tokens.
    pub revoked_at: Option<OffsetDateTime>,
    /// The edit's time.
    pub at: OffsetDateTime,
}

/// A page of the listing: filters, and where the previous page ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Only ids after this one (the cursor).
    pub after: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only enabled (or disabled) devices.
    pub enabled: Option<bool>,
    /// Only devices whose name or external id contains this text (any case).
    pub search: Option<String>,
}

/// `%text%` for ILIKE, with `\`, `%` and `_` taken literally.
fn contains_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

async fn insert_messages(
    tx: &tokio_postgres::Transaction<'_>,
    messages: Vec<OutboxMessage>,
) -> Result<(), tokio_postgres::Error> {
    for m in &messages {
        outbox::insert(tx, m).await?;
    }
    Ok(())
}

impl Store {
    /// Creates a device and commits `messages(&device)` with it. A taken id or
    /// external id is [`StoreError::Conflict`] (`devices_pkey`,
    /// `devices_external_id_key`).
    pub async fn create_device(
        &self,
        new: &NewDevice,
        messages: impl FnOnce(&Device) -> Vec<OutboxMessage>,
    ) -> Result<Device, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO devices (id, name, external_id, type, groups, attributes, \
                     enabled, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, true, $7, $7) RETURNING {COLUMNS}"
                ),
                &[
                    &new.id,
                    &new.name,
                    &new.external_id,
                    &new.device_type,
                    &new.groups,
                    &new.attributes,
                    &new.at,
                ],
            )
            .await?;
        let device = Device::from_row(&row);
        insert_messages(&tx, messages(&device)).await?;
        tx.commit().await?;
        Ok(device)
    }

    /// One device.
    pub async fn device(&self, id: Uuid) -> Result<Device, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM devices WHERE id = $1"),
                &[&id],
            )
            .await?;
        row.map(|r| Device::from_row(&r))
            .ok_or(StoreError::NotFound)
    }

    /// A page of devices in id order.
    pub async fn devices(&self, f: &DeviceFilter) -> Result<Vec<Device>, StoreError> {
        let client = self.client().await?;
        let pattern = f.search.as_deref().map(contains_pattern);
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM devices
                     WHERE ($1::uuid IS NULL OR id > $1)
                       AND ($2::text IS NULL OR groups @> ARRAY[$2::text])
                       AND ($3::boolean IS NULL OR enabled = $3)
                       AND ($4::text IS NULL OR name ILIKE $4 ESCAPE '\\'
                            OR external_id ILIKE $4 ESCAPE '\\')
                     ORDER BY id LIMIT $5"
                ),
                &[&f.after, &f.group, &f.enabled, &pattern, &f.limit],
            )
            .await?;
        Ok(rows.iter().map(Device::from_row).collect())
    }

    /// Edits a device under a row lock: `edit` sees the current record and returns
    /// the new values (or refuses with `E`); `messages(old, new)` commit with it.
    pub async fn edit_device<E>(
        &self,
        id: Uuid,
        edit: impl FnOnce(&Device) -> Result<Edit, E>,
        messages: impl FnOnce(&Device, &Device) -> Vec<OutboxMessage>,
    ) -> Result<Result<Device, E>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!("SELECT {COLUMNS} FROM devices WHERE id = $1 FOR UPDATE"),
                &[&id],
            )
            .await?
            .ok_or(StoreError::NotFound)?;
        let old = Device::from_row(&row);
        let e = match edit(&old) {
            Ok(e) => e,
            Err(refused) => return Ok(Err(refused)),
        };
        let row = tx
            .query_one(
                &format!(
                    "UPDATE devices SET name = $2, groups = $3, attributes = $4, enabled = $5,
                       revoked_at = COALESCE($6, revoked_at), updated_at = $7
                     WHERE id = $1 RETURNING {COLUMNS}"
                ),
                &[
                    &id,
                    &e.name,
                    &e.groups,
                    &e.attributes,
                    &e.enabled,
                    &e.revoked_at,
                    &e.at,
                ],
            )
            .await?;
        let new = Device::from_row(&row);
        insert_messages(&tx, messages(&old, &new)).await?;
        tx.commit().await?;
        Ok(Ok(new))
    }

    /// Deletes a device (and its enrolment codes); `messages(record)` commit with it.
    pub async fn delete_device(
        &self,
        id: Uuid,
        messages: impl FnOnce(&Device) -> Vec<OutboxMessage>,
    ) -> Result<Device, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!("DELETE FROM devices WHERE id = $1 RETURNING {COLUMNS}"),
                &[&id],
            )
            .await?
            .ok_or(StoreError::NotFound)?;
        let device = Device::from_row(&row);
        insert_messages(&tx, messages(&device)).await?;
        tx.commit().await?;
        Ok(device)
    }

    /// Whether `id` may get a fresh token: `Some(revoked_at)` when it is registered
    /// and enabled, `None` otherwise.
    pub async fn renewable(&self, id: Uuid) -> Result<Option<Option<OffsetDateTime>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT revoked_at FROM devices WHERE id = $1 AND enabled",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records sightings, `(device, when, connected)`: `last_seen` moves forward, and
    /// a device seen connecting for the first time is activated, committing
    /// `activated(&record)` with it. Devices not in the registry are skipped.
    /// Returns how many devices were activated.
    pub async fn record_seen(
        &self,
        seen: &[(Uuid, OffsetDateTime, bool)],
        activated: impl Fn(&Device) -> Vec<OutboxMessage>,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut count = 0;
        for (device, at, connected) in seen {
            tx.execute(
                "UPDATE devices SET last_seen = GREATEST(last_seen, $2) WHERE id = $1",
                &[device, at],
            )
            .await?;
            if *connected {
                let row = tx
                    .query_opt(
                        &format!(
                            "UPDATE devices SET activated_at = $2
                             WHERE id = $1 AND activated_at IS NULL RETURNING {COLUMNS}"
                        ),
                        &[device, at],
                    )
                    .await?;
                if let Some(row) = row {
                    insert_messages(&tx, activated(&Device::from_row(&row))).await?;
                    count += 1;
                }
            }
        }
        tx.commit().await?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_text_is_literal() {
        assert_eq!(contains_pattern("a%b_c\\"), "%a\\%b\\_c\\\\%");
    }
}
