//! The device registry and enrolment, in plain Rust: validation, the records, the bus
//! messages each change commits with (through the store's outbox), one-time codes,
//! and token minting for enrolment and renewal.
//!
//! Disabling or deleting a device revokes its tokens: the same transaction puts a
//! revocation into the outbox for the `mosaic.revocations` stream, which every gateway
//! follows (see `mosaic_protocol::registry`).

use std::sync::Arc;

use mosaic_protocol::exchange;
use mosaic_protocol::registry::{self as wire, Change, RpcReply, refusal};
use mosaic_runtime::health::Readiness;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::metrics;
use crate::store::enrolments::Issued;
use crate::store::{Device, DeviceFilter, Edit, NewDevice, OutboxMessage, Store, StoreError};
use crate::tokens::Signer;

/// Longest `name` and `external_id`, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest `type`, in characters.
pub const MAX_TYPE_CHARS: usize = 64;
/// Most groups of one device.
pub const MAX_GROUPS: usize = 64;
/// Longest group name (of `[A-Za-z0-9_-]`).
pub const MAX_GROUP_CHARS: usize = 64;
/// Largest `attributes`, as JSON text.
pub const MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;
/// Default, smallest and largest enrolment code lifetime, in milliseconds.
pub const DEFAULT_CODE_TTL_MS: u64 = 86_400_000;
/// Smallest `ttl_ms` of an enrolment code.
pub const MIN_CODE_TTL_MS: u64 = 60_000;
/// Largest `ttl_ms` of an enrolment code (30 days).
pub const MAX_CODE_TTL_MS: u64 = 2_592_000_000;
/// Default and largest page of the listing.
pub const DEFAULT_PAGE: i64 = 100;
/// Largest `limit` of the listing.
pub const MAX_PAGE: i64 = 1000;

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// `DATABASE_URL` (or `TOKEN_SIGNING_KEY`, named) is not set.
    #[error("{0} is not configured on this service")]
    NotConfigured(&'static str),
    /// PostgreSQL is unreachable or failing.
    #[error("the database is unavailable; try again later")]
    Unavailable,
    /// No such device.
    #[error("no device with this id in the registry")]
    NotFound,
    /// A device with this id exists.
    #[error("a device with this id exists")]
    Exists,
    /// Another device has this external id.
    #[error("another device has this external_id")]
    ExternalIdTaken,
    /// The device is disabled.
    #[error("the device is disabled")]
    Disabled,
    /// The body or a parameter is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => RegistryError::NotFound,
            StoreError::Conflict(c) if c.contains("external_id") => RegistryError::ExternalIdTaken,
            StoreError::Conflict(_) => RegistryError::Exists,
            StoreError::Unavailable(why) => {
                warn!(error = %why, "database call failed");
                RegistryError::Unavailable
            }
        }
    }
}

/// A device record as Hive sees it (REST answers and the `registry.*` messages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceRecord {
    /// The device's UUID (the `sub` of its tokens).
    pub id: Uuid,
    /// A name for people, 1 to 128 characters.
    pub name: String,
    /// Its id elsewhere (serial number), unique, 1 to 128 characters.
    pub external_id: Option<String>,
    /// Its kind, 1 to 64 characters.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Its groups (each 1 to 64 of `[A-Za-z0-9_-]`).
    pub groups: Vec<String>,
    /// Anything JSON, an object of at most 8 KiB as JSON text.
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// Whether it may connect, enrol and renew its token.
    pub enabled: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Its first connect (RFC 3339), once seen.
    pub activated_at: Option<String>,
    /// Its latest connect or disconnect (RFC 3339).
    pub last_seen: Option<String>,
}

/// The registry groups of a device, for the tokens minted for it; none when the
/// lookup fails (the token is still minted: groups only route commands).
async fn groups_of(store: &Store, device: Uuid) -> Vec<String> {
    match store.device(device).await {
        Ok(d) => d.groups,
        Err(e) => {
            debug!(%device, error = %e, "groups of a device not read; its token carries none");
            Vec::new()
        }
    }
}

/// RFC 3339, UTC.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl From<&Device> for DeviceRecord {
    fn from(d: &Device) -> Self {
        DeviceRecord {
            id: d.id,
            name: d.name.clone(),
            external_id: d.external_id.clone(),
            device_type: d.device_type.clone(),
            groups: d.groups.clone(),
            attributes: d.attributes.clone(),
            enabled: d.enabled,
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
            activated_at: d.activated_at.map(rfc3339),
            last_seen: d.last_seen.map(rfc3339),
        }
    }
}

/// What `POST /v1/devices` takes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceBody {
    /// The device's UUID; a random one when absent.
    pub id: Option<Uuid>,
    /// 1 to 128 characters.
    pub name: String,
    /// 1 to 128 characters, unique.
    pub external_id: Option<String>,
    /// 1 to 64 characters.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Each 1 to 64 of `[A-Za-z0-9_-]`, at most 64.
    #[serde(default)]
    pub groups: Vec<String>,
    /// A JSON object, at most 8 KiB as JSON text.
    #[schema(value_type = Object)]
    pub attributes: Option<Value>,
}

/// The listing's parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// Where the previous page ended.
    pub cursor: Option<String>,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only enabled or disabled devices.
    pub enabled: Option<bool>,
    /// Text in the name or external id.
    pub q: Option<String>,
}

/// A page of devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page {
    /// The devices, in id order.
    pub devices: Vec<DeviceRecord>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A one-time enrolment code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enrolment {
    /// The code, to hand to the device; shown once, stored only as a digest.
    pub code: String,
    /// RFC 3339.
    pub expires_at: String,
}

fn check_text(field: &str, v: &str, max: usize) -> Result<(), RegistryError> {
    let n = v.chars().count();
    if n == 0 || n > max {
        return Err(RegistryError::Invalid(format!(
            "field `{field}` must have 1 to {max} characters"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(RegistryError::Invalid(format!(
            "field `{field}` must not contain control characters"
        )));
    }
    Ok(())
}

/// Whether `g` is a valid group name: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_group_name(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= MAX_GROUP_CHARS
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_groups(groups: Vec<String>) -> Result<Vec<String>, RegistryError> {
    if groups.len() > MAX_GROUPS {
        return Err(RegistryError::Invalid(format!(
            "field `groups` takes at most {MAX_GROUPS} groups"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(groups.len());
    for g in groups {
        if !is_group_name(&g) {
            return Err(RegistryError::Invalid(format!(
                "every group must be 1 to {MAX_GROUP_CHARS} of A-Z, a-z, 0-9, '_', '-'"
            )));
        }
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
}

fn check_attributes(v: Value) -> Result<Value, RegistryError> {
    if !v.is_object() {
        return Err(RegistryError::Invalid(
            "field `attributes` must be a JSON object".into(),
        ));
    }
    let len = serde_json::to_vec(&v)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if len > MAX_ATTRIBUTES_BYTES {
        return Err(RegistryError::Invalid(format!(
            "field `attributes` takes {len} bytes as JSON text; at most {MAX_ATTRIBUTES_BYTES}"
        )));
    }
    Ok(v)
}

/// RFC 7396: `patch` merged into `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The registry message of `change` for `record`, committed at `at`.
fn registry_message(record: &DeviceRecord, change: Change, at: OffsetDateTime) -> OutboxMessage {
    let message_id = Uuid::now_v7();
    let at = rfc3339(at);
    let mut h = Map::new();
    h.insert("kind".into(), wire::KIND.into());
    h.insert("message_id".into(), message_id.to_string().into());
    h.insert("device".into(), record.id.to_string().into());
    h.insert("name".into(), change.as_str().into());
    h.insert("at".into(), at.clone().into());
    h.insert("received_at".into(), at.into());
    OutboxMessage {
        exchange: exchange::EVENTS.to_owned(),
        routing_key: wire::key(record.id, change),
        message_id,
        headers: h,
        body: serde_json::to_vec(record).expect("records serialize"),
        persistent: true,
    }
}

/// When a revocation made at `now` takes effect: at least a second after the
/// previous one, since tokens minted after that one carry an `iat` up to a second
/// past it (see [`Signer::mint`]) and must fall under this one.
fn revocation_time(now: OffsetDateTime, previous: Option<OffsetDateTime>) -> OffsetDateTime {
    match previous {
        Some(p) if p.unix_timestamp() + 1 > now.unix_timestamp() => {
            OffsetDateTime::from_unix_timestamp(p.unix_timestamp() + 1).unwrap_or(now)
        }
        _ => now,
    }
}

/// The revocations-stream entry for `device` at `at`.
fn revocation_message(device: Uuid, at: OffsetDateTime) -> OutboxMessage {
    let mut h = Map::new();
    h.insert("kind".into(), wire::KIND_REVOCATION.into());
    h.insert(wire::DEVICE.into(), device.to_string().into());
    h.insert(wire::REVOKED_AT.into(), at.unix_timestamp().into());
    OutboxMessage {
        exchange: String::new(),
        routing_key: wire::REVOCATIONS_STREAM.to_owned(),
        message_id: Uuid::now_v7(),
        headers: h,
        body: b"null".to_vec(),
        persistent: true,
    }
}

/// Alphabet of enrolment codes: no 0/O, 1/I/L or U, so a code reads back aloud.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTVWXYZ23456789";

/// A fresh code: 25 symbols of 30 (over 120 bits) in five groups of five.
fn new_code() -> String {
    let mut rng = rand::rng();
    let mut s = String::with_capacity(29);
    for i in 0..25 {
        if i > 0 && i % 5 == 0 {
            s.push('-');
        }
        s.push(CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char);
    }
    s
}

/// The stored digest of a code as a device may type it: dashes and spaces dropped,
/// letters upper-cased.
pub fn code_digest(code: &str) -> [u8; 32] {
    let normal: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    Sha256::digest(normal.as_bytes()).into()
}

/// The registry: the store (when configured), the signer (when configured), and
/// the outbox drainer's wake-up.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Option<Store>,
    signer: Option<Arc<Signer>>,
    outbox: Arc<Notify>,
    database: Readiness,
}

impl Registry {
    /// A registry over `store` and `signer` (either may be absent). `database` is
    /// true while PostgreSQL answers and the schema is migrated.
    pub fn new(
        store: Option<Store>,
        signer: Option<Signer>,
        outbox: Arc<Notify>,
        database: Readiness,
    ) -> Self {
        Registry {
            store,
            signer: signer.map(Arc::new),
            outbox,
            database,
        }
    }

    /// The store, when configured and up; fails at once while PostgreSQL is known to
    /// be down, rather than waiting for a connection.
    fn store(&self) -> Result<&Store, RegistryError> {
        let store = self
            .store
            .as_ref()
            .ok_or(RegistryError::NotConfigured("DATABASE_URL"))?;
        if !self.database.get() {
            return Err(RegistryError::Unavailable);
        }
        Ok(store)
    }

    /// The public key of minted tokens, as a JWKS document.
    pub fn jwks(&self) -> Result<Vec<u8>, RegistryError> {
        self.signer
            .as_ref()
            .map(|s| s.jwks().to_vec())
            .ok_or(RegistryError::NotConfigured("TOKEN_SIGNING_KEY"))
    }

    /// Adds a device.
    pub async fn create(&self, body: NewDeviceBody) -> Result<DeviceRecord, RegistryError> {
        check_text("name", &body.name, MAX_NAME_CHARS)?;
        if let Some(e) = &body.external_id {
            check_text("external_id", e, MAX_NAME_CHARS)?;
        }
        if let Some(t) = &body.device_type {
            check_text("type", t, MAX_TYPE_CHARS)?;
        }
        let groups = check_groups(body.groups)?;
        let attributes = check_attributes(body.attributes.unwrap_or_else(|| json!({})))?;
        let store = self.store()?;
        let at = OffsetDateTime::now_utc();
        let new = NewDevice {
            id: body.id.unwrap_or_else(Uuid::new_v4),
            name: body.name,
            external_id: body.external_id,
            device_type: body.device_type,
            groups,
            attributes,
            at,
        };
        let d = store
            .create_device(&new, |d| {
                vec![registry_message(&d.into(), Change::Created, at)]
            })
            .await?;
        self.committed(Change::Created);
        info!(device = %d.id, "device created");
        Ok((&d).into())
    }

    /// One device's record.
    pub async fn get(&self, id: Uuid) -> Result<DeviceRecord, RegistryError> {
        Ok((&self.store()?.device(id).await?).into())
    }

    /// The time of the device's latest connect or disconnect, as the registry knows
    /// it (for presence of a device that is not connected).
    pub async fn last_seen(&self, id: Uuid) -> Result<Option<OffsetDateTime>, RegistryError> {
        Ok(self.store()?.device(id).await?.last_seen)
    }

    /// A page of devices.
    pub async fn list(&self, q: ListQuery) -> Result<Page, RegistryError> {
        let limit = q.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(RegistryError::Invalid(format!(
                "`limit` must be 1 to {MAX_PAGE}"
            )));
        }
        let after = match q.cursor.as_deref() {
            None => None,
            Some(c) => Some(
                Uuid::parse_str(c)
                    .map_err(|_| RegistryError::Invalid("`cursor` is not one we gave".into()))?,
            ),
        };
        if let Some(g) = &q.group
            && !is_group_name(g)
        {
            return Err(RegistryError::Invalid(format!(
                "`group` must be 1 to {MAX_GROUP_CHARS} of A-Z, a-z, 0-9, '_', '-'"
            )));
        }
        if let Some(text) = &q.q {
            check_text("q", text, MAX_NAME_CHARS)?;
        }
        let filter = DeviceFilter {
            after,
            limit: limit + 1,
            group: q.group,
            enabled: q.enabled,
            search: q.q,
        };
        let mut rows = self.store()?.devices(&filter).await?;
        let next_cursor = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|d| d.id.to_string())
        } else {
            None
        };
        Ok(Page {
            devices: rows.iter().map(DeviceRecord::from).collect(),
            next_cursor,
        })
    }

    /// Applies a JSON merge patch (RFC 7396) of `name`, `groups`, `attributes` and
    /// `enabled`. Disabling revokes the device's tokens.
    pub async fn patch(&self, id: Uuid, patch: Value) -> Result<DeviceRecord, RegistryError> {
        let Value::Object(patch) = patch else {
            return Err(RegistryError::Invalid(
                "the body must be a JSON object (a merge patch)".into(),
            ));
        };
        if let Some(k) = patch
            .keys()
            .find(|k| !matches!(k.as_str(), "name" | "groups" | "attributes" | "enabled"))
        {
            let k: String = k.chars().take(64).collect();
            return Err(RegistryError::Invalid(format!(
                "field `{k}` cannot be changed (name, groups, attributes, enabled can)"
            )));
        }
        let name = match patch.get("name") {
            None => None,
            Some(Value::String(n)) => {
                check_text("name", n, MAX_NAME_CHARS)?;
                Some(n.clone())
            }
            Some(_) => {
                return Err(RegistryError::Invalid(
                    "field `name` must be a string".into(),
                ));
            }
        };
        let groups = match patch.get("groups") {
            None => None,
            Some(Value::Null) => Some(Vec::new()),
            Some(v) => {
                let g: Vec<String> = serde_json::from_value(v.clone()).map_err(|_| {
                    RegistryError::Invalid("field `groups` must be an array of strings".into())
                })?;
                Some(check_groups(g)?)
            }
        };
        let enabled = match patch.get("enabled") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(RegistryError::Invalid(
                    "field `enabled` must be true or false".into(),
                ));
            }
        };
        let attributes = patch.get("attributes").cloned();
        if let Some(a) = &attributes
            && !(a.is_object() || a.is_null())
        {
            return Err(RegistryError::Invalid(
                "field `attributes` must be an object (merged) or null (cleared)".into(),
            ));
        }
        let store = self.store()?;
        let at = OffsetDateTime::now_utc();
        let edited = store
            .edit_device(
                id,
                |old| {
                    let attributes = match &attributes {
                        None => old.attributes.clone(),
                        Some(Value::Null) => json!({}),
                        Some(p) => {
                            let mut a = old.attributes.clone();
                            merge_patch(&mut a, p);
                            check_attributes(a)?
                        }
                    };
                    let enabled = enabled.unwrap_or(old.enabled);
                    Ok::<_, RegistryError>(Edit {
                        name: name.clone().unwrap_or_else(|| old.name.clone()),
                        groups: groups.clone().unwrap_or_else(|| old.groups.clone()),
                        attributes,
                        enabled,
                        revoked_at: (old.enabled && !enabled)
                            .then(|| revocation_time(at, old.revoked_at)),
                        at,
                    })
                },
                |old, new| {
                    let mut m = vec![registry_message(&new.into(), Change::Updated, at)];
                    if old.enabled && !new.enabled {
                        m.push(revocation_message(new.id, new.revoked_at.unwrap_or(at)));
                    }
                    m
                },
            )
            .await??;
        self.committed(Change::Updated);
        info!(device = %id, enabled = edited.enabled, "device updated");
        Ok((&edited).into())
    }

    /// Removes a device and revokes its tokens.
    pub async fn delete(&self, id: Uuid) -> Result<(), RegistryError> {
        let at = OffsetDateTime::now_utc();
        self.store()?
            .delete_device(id, |d| {
                let mut record: DeviceRecord = d.into();
                record.updated_at = rfc3339(at);
                vec![
                    registry_message(&record, Change::Deleted, at),
                    revocation_message(d.id, revocation_time(at, d.revoked_at)),
                ]
            })
            .await?;
        self.committed(Change::Deleted);
        info!(device = %id, "device deleted");
        Ok(())
    }

    /// A one-time enrolment code for a registered, enabled device, valid `ttl_ms`.
    pub async fn enrolment(
        &self,
        id: Uuid,
        ttl_ms: Option<u64>,
    ) -> Result<Enrolment, RegistryError> {
        let ttl_ms = ttl_ms.unwrap_or(DEFAULT_CODE_TTL_MS);
        if !(MIN_CODE_TTL_MS..=MAX_CODE_TTL_MS).contains(&ttl_ms) {
            return Err(RegistryError::Invalid(format!(
                "field `ttl_ms` must be {MIN_CODE_TTL_MS} to {MAX_CODE_TTL_MS}"
            )));
        }
        if self.signer.is_none() {
            return Err(RegistryError::NotConfigured("TOKEN_SIGNING_KEY"));
        }
        let store = self.store()?;
        let code = new_code();
        let now = OffsetDateTime::now_utc();
        let expires_at = now + time::Duration::milliseconds(ttl_ms as i64);
        match store
            .create_enrolment(id, &code_digest(&code), now, expires_at)
            .await?
        {
            Issued::Yes => {
                metrics::enrolment("issued");
                info!(device = %id, "enrolment code issued");
                Ok(Enrolment {
                    code,
                    expires_at: rfc3339(expires_at),
                })
            }
            Issued::Disabled => Err(RegistryError::Disabled),
        }
    }

    /// A gateway's `enrol`: the code traded for the device's first token.
    pub async fn enrol(&self, code: &str) -> RpcReply {
        let refused = |code: &str| RpcReply::Refused { code: code.into() };
        if code.len() > wire::MAX_CODE_BYTES || code.is_empty() {
            metrics::enrolment("refused");
            return refused(refusal::UNAUTHORIZED);
        }
        let Some(signer) = &self.signer else {
            metrics::enrolment("not_configured");
            return refused(refusal::UNAUTHORIZED);
        };
        let store = match self.store() {
            Ok(s) => s,
            Err(RegistryError::NotConfigured(_)) => return refused(refusal::UNAUTHORIZED),
            Err(_) => return refused(refusal::UNAVAILABLE),
        };
        match store.redeem_enrolment(&code_digest(code)).await {
            Ok(Some((device, revoked_at))) => {
                match signer.mint(device, revoked_at, &groups_of(store, device).await) {
                    Ok(m) => {
                        metrics::enrolment("enrolled");
                        metrics::token_minted("enrol");
                        info!(%device, "device enrolled");
                        RpcReply::Token {
                            device,
                            token: m.token,
                            expires_at: rfc3339(m.expires_at),
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "minting a token failed");
                        refused(refusal::UNAVAILABLE)
                    }
                }
            }
            Ok(None) => {
                metrics::enrolment("refused");
                debug!("enrolment code refused");
                refused(refusal::UNAUTHORIZED)
            }
            Err(e) => {
                warn!(error = %e, "enrolment: database call failed");
                refused(refusal::UNAVAILABLE)
            }
        }
    }

    /// A gateway's `renew`: a fresh token for a registered, enabled device.
    pub async fn renew(&self, device: Uuid) -> RpcReply {
        let refused = |code: &str| RpcReply::Refused { code: code.into() };
        let (Some(signer), Ok(store)) = (&self.signer, self.store()) else {
            return refused(refusal::UNAVAILABLE);
        };
        match store.renewable(device).await {
            Ok(Some(revoked_at)) => {
                match signer.mint(device, revoked_at, &groups_of(store, device).await) {
                    Ok(m) => {
                        metrics::token_minted("renew");
                        RpcReply::Token {
                            device,
                            token: m.token,
                            expires_at: rfc3339(m.expires_at),
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "minting a token failed");
                        refused(refusal::UNAVAILABLE)
                    }
                }
            }
            Ok(None) => refused(refusal::FORBIDDEN),
            Err(e) => {
                warn!(error = %e, "renewal: database call failed");
                refused(refusal::UNAVAILABLE)
            }
        }
    }

    /// Records sightings from lifecycle messages (see `crate::seen`); returns how
    /// many devices were activated.
    pub async fn record_seen(
        &self,
        seen: &[(Uuid, OffsetDateTime, bool)],
    ) -> Result<usize, RegistryError> {
        let n = self
            .store()?
            .record_seen(seen, |d| {
                let at = d.activated_at.unwrap_or_else(OffsetDateTime::now_utc);
                vec![registry_message(&d.into(), Change::Activated, at)]
            })
            .await?;
        if n > 0 {
            for _ in 0..n {
                self.committed(Change::Activated);
            }
        }
        Ok(n)
    }

    /// A change committed: count it and wake the outbox drainer.
    fn committed(&self, change: Change) {
        metrics::registry_change(change.as_str());
        self.outbox.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A (a selection).
        for (target, patch, want) in [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
        ] {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    #[test]
    fn codes_are_long_and_typed_back_loosely() {
        let c = new_code();
        assert_eq!(c.len(), 29, "{c}");
        assert_ne!(c, new_code());
        assert_eq!(
            code_digest(&c),
            code_digest(&c.to_ascii_lowercase().replace('-', " "))
        );
    }

    #[test]
    fn groups_are_checked_and_deduplicated() {
        assert_eq!(
            check_groups(vec!["a".into(), "b-1".into(), "a".into()]).unwrap(),
            vec!["a", "b-1"]
        );
        for bad in ["", "a b", "é", &"x".repeat(65), "a.b"] {
            assert!(check_groups(vec![bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
