//! The fleet: which devices are connected and where, what each offers, groups,
//! kick, and scatter-gather requests, across every gateway replica, with RabbitMQ
//! as the only state. Plain Rust in and out; `api::fleet` maps it to HTTP.
//!
//! - [`view`]: the live gateway replicas, from their announcements on `mosaic.fleet`.
//! - [`sessions`]: which gateway holds which session (from lifecycle messages), and
//!   the `gateway_lost` disconnects the leader publishes for a vanished gateway.
//! - [`gather`]: collecting the many replies of a listing or a fan-out.
//!
//! Every question goes to the gateways on `mosaic.commands` with a fleet `kind`
//! (`mosaic_protocol::command::Kind`) and `reply_to` = this replica's reply queue:
//! presence and kick `mandatory` to `device.<uuid>` (returned = not connected, at
//! once), a listing and a broadcast request to `broadcast`, a group call to
//! `group.<name>` (returned = no member connected). The view says which gateways
//! will answer, so a call returns as soon as all of them did.
//!
//! This replica's fleet queue `mosaic.device-service.fleet.<replica>` (exclusive,
//! auto-delete) is bound to `mosaic.fleet` with `gateway.#` and to `mosaic.events`
//! with `lifecycle.#`: [`Fleet::consume`] feeds the view and the session tracker.
//! [`Fleet::run`] expires silent gateways, keeps the leadership, publishes the
//! `gateway_lost` disconnects when leader, and on every new link asks the gateways
//! to announce themselves and rebuilds the session tracker from a listing.

pub mod gather;
pub mod sessions;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use mosaic_amqp::{Incoming, Link, Publish, Routed};
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::command::{Kind, ReplyKind};
use mosaic_protocol::exchange::{self, Lifecycle};
use mosaic_protocol::fleet::{Announcement, Connected, Presence, valid_group};
use mosaic_protocol::header;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::broker::long;
use crate::commands::{CommandError, headers};
use crate::metrics;
use crate::pending::{Collecting, Pending, Reply};
use mosaic_amqp::header_str;

pub use gather::{Budget, DeviceAnswer, Fanout, Listing, Outcome};
pub use sessions::Sessions;
pub use view::View;

/// How often silent gateways are looked for, and leadership tried.
const TICK: Duration = Duration::from_millis(500);
/// How often a replica that is not the leader tries to become it.
const LEADER_RETRY: Duration = Duration::from_secs(2);
/// `gateway_lost` disconnects published at once by the leader.
const LOST_CONCURRENCY: usize = 256;
/// Namespace of the `message_id` of a `gateway_lost` disconnect (UUIDv5 of the session).
const GATEWAY_LOST_NAMESPACE: Uuid = uuid::uuid!("b5e1c0de-6a37-4f0e-9d2c-6d6f7361696c");
/// Largest page of a listing.
pub const MAX_PAGE: u32 = 1000;
/// Default page of a listing.
pub const DEFAULT_PAGE: u32 = 100;

/// Why a fleet call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The name, extra fields or headers of an event or request, or the broker.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A group name outside the pattern.
    #[error("a group name must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`")]
    BadGroup,
    /// A cursor that is not a device id.
    #[error("`cursor` must be a device id")]
    BadCursor,
    /// No gateway holds the device.
    #[error("no gateway holds this device")]
    NotConnected,
    /// No gateway answered in time.
    #[error("no gateway answered within {0} ms")]
    Timeout(u64),
    /// Too many fan-outs run in this replica.
    #[error("too many group and broadcast requests run now; try again shortly")]
    Overloaded,
}

/// Where a fan-out goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every member of a group.
    Group(String),
    /// Every connected device.
    Everyone,
}

impl Audience {
    fn key(&self) -> String {
        match self {
            Audience::Group(g) => exchange::group_key(g),
            Audience::Everyone => exchange::BROADCAST_KEY.to_owned(),
        }
    }
}

/// A listing's filters and page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only members of this group.
    pub group: Option<String>,
    /// Only devices that declared this service.
    pub service: Option<String>,
    /// At most this many (1..=[`MAX_PAGE`]).
    pub limit: u32,
    /// Devices after this id.
    pub after: Option<Uuid>,
}

/// One page of connected devices across every gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// The devices, in id order.
    pub devices: Vec<Connected>,
    /// The cursor of the next page, when there is one.
    pub next: Option<Uuid>,
    /// Gateways that answered.
    pub gateways: usize,
    /// Whether a live gateway did not answer in time (its devices are missing).
    pub partial: bool,
}

/// The settings of the fleet.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's reply queue.
    pub reply_queue: ShortString,
    /// Bound on each publish and its confirm.
    pub publish_timeout: Duration,
    /// How long presence, kick and listing wait for the gateways (`FLEET_TIMEOUT_MS`).
    pub ask_timeout: Duration,
    /// A gateway silent this long is lost (`FLEET_LOST_AFTER_MS`).
    pub lost_after: Duration,
    /// Fan-outs at once in this replica (`MAX_FANOUTS`).
    pub max_fanouts: usize,
    /// Bytes of answers held by this replica's fan-outs (`MAX_FANOUT_ANSWER_BYTES`).
    pub max_answer_bytes: usize,
}

/// The fleet, as one device-service replica sees and drives it.
#[derive(Debug)]
pub struct Fleet {
    link: watch::Receiver<Option<Arc<Link>>>,
    pending: Arc<Pending>,
    settings: Settings,
    /// The live gateways.
    pub view: View,
    /// The sessions each gateway holds.
    pub sessions: Sessions,
    leader: AtomicBool,
    fanouts: Arc<Semaphore>,
    budget: Arc<Budget>,
    /// Gateways that left cleanly, and when: sessions still tracked for them once
    /// `lost_after` passed (their `disconnected` never came) are orphans too.
    down: std::sync::Mutex<Vec<(Uuid, Instant)>>,
}

/// A scatter-gather request under way: take answers as they come, then the outcome.
#[derive(Debug)]
pub struct Call {
    /// The request's id (every device gets the same).
    pub id: Uuid,
    fanout: Arc<Fanout>,
    deadline: Instant,
    view: watch::Receiver<u64>,
    live_at_start: Vec<Uuid>,
    audience: Audience,
    fleet: Arc<Fleet>,
    _collecting: Option<Collecting>,
    _permit: OwnedSemaphorePermit,
}

impl Call {
    /// The answers that arrived since the last call, waiting (until the deadline)
    /// for at least one unless the fan-out is complete; empty at the end.
    pub async fn next(&mut self) -> Vec<DeviceAnswer> {
        loop {
            let ready = self.fanout.take_ready();
            if !ready.is_empty() {
                return ready;
            }
            if self.fanout.is_complete() || Instant::now() >= self.deadline {
                return Vec::new();
            }
            tokio::select! {
                _ = self.fanout.changed() => {}
                _ = tokio::time::sleep_until(self.deadline) => {}
                r = self.view.changed() => if r.is_ok() {
                    let view = &self.fleet.view;
                    let gone: Vec<Uuid> = self
                        .live_at_start
                        .iter()
                        .copied()
                        .filter(|g| !view.is_live(*g))
                        .collect();
                    if !gone.is_empty() {
                        self.fanout.gateways_lost(&|g| gone.contains(&g));
                    }
                    // A gateway whose last member of the group left before the
                    // request reached it announces so at once: it will not report.
                    if let Audience::Group(group) = &self.audience {
                        let holding = view.with_group(group);
                        self.fanout.not_expected(&|g| !holding.contains(&g));
                    }
                },
            }
        }
    }

    /// Every answer, once the fan-out is complete or at its deadline.
    pub async fn all(mut self) -> (Vec<DeviceAnswer>, Outcome) {
        let mut answers = Vec::new();
        loop {
            let more = self.next().await;
            if more.is_empty() {
                break;
            }
            answers.extend(more);
        }
        let outcome = self.finish();
        (answers, outcome)
    }

    /// Ends the call: whoever has not answered timed out.
    pub fn finish(&self) -> Outcome {
        let o = self.fanout.finish();
        metrics::fanout_finished([
            ("answered", o.answered),
            ("timed_out", o.timed_out.len()),
            ("left", o.left.len()),
            ("busy", o.busy.len()),
        ]);
        o
    }
}

impl Fleet {
    /// The fleet of one replica; nothing runs until [`Fleet::run`] and
    /// [`Fleet::consume`].
    pub fn new(
        link: watch::Receiver<Option<Arc<Link>>>,
        pending: Arc<Pending>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Fleet {
            link,
            pending,
            view: View::new(settings.lost_after),
            sessions: Sessions::default(),
            leader: AtomicBool::new(false),
            fanouts: Arc::new(Semaphore::new(settings.max_fanouts)),
            budget: Budget::new(settings.max_answer_bytes),
            down: std::sync::Mutex::new(Vec::new()),
            settings,
        })
    }

    /// Whether this replica is the leader now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    fn link(&self) -> Result<Arc<Link>, FleetError> {
        match &*self.link.borrow() {
            Some(l) if l.can_publish() => Ok(l.clone()),
            _ => Err(CommandError::BrokerUnavailable.into()),
        }
    }

    fn properties(&self, id: Uuid, table: FieldTable, ttl: Duration) -> BasicProperties {
        BasicProperties::default()
            .with_headers(table)
            .with_message_id(ShortString::from(id.to_string()))
            .with_content_type("application/json".into())
            .with_delivery_mode(1)
            .with_reply_to(self.settings.reply_queue.clone())
            .with_correlation_id(ShortString::from(id.to_string()))
            .with_expiration(ShortString::from(ttl.as_millis().max(1).to_string()))
    }

    fn command_table(kind: Kind, id: Uuid) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(header::KIND.into(), long(kind.as_str()));
        t.insert(header::ID.into(), long(&id.to_string()));
        t
    }

    async fn publish(
        &self,
        link: &Arc<Link>,
        key: String,
        mandatory: bool,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Result<Routed, FleetError> {
        let m = Publish {
            exchange: exchange::COMMANDS,
            routing_key: key,
            mandatory,
            properties,
            body,
        };
        Ok(link
            .publish(0, m, self.settings.publish_timeout)
            .await
            .map_err(CommandError::from)?)
    }

    /// Asks the gateway holding `device` one question; `None` when none holds it.
    async fn ask_one(&self, device: Uuid, kind: Kind) -> Result<Option<Reply>, FleetError> {
        let id = Uuid::now_v7();
        let link = self.link()?;
        let mut ticket = self
            .pending
            .register(id)
            .map_err(CommandError::Overloaded)?;
        let timeout = self.settings.ask_timeout;
        let props = self.properties(id, Self::command_table(kind, id), timeout);
        let ask = async {
            let routed = self
                .publish(
                    &link,
                    exchange::device_key(device),
                    true,
                    props,
                    b"null".to_vec(),
                )
                .await?;
            if routed == Routed::Returned {
                return Ok(None);
            }
            Ok(Some(tokio::select! {
                r = &mut ticket.rx => r.unwrap_or(Reply::BrokerLost),
                _ = link.lost().cancelled() => Reply::BrokerLost,
            }))
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::Timeout(timeout.as_millis() as u64)),
        }
    }

    /// The presence of one device, from the gateway that holds it.
    pub async fn presence(&self, device: Uuid) -> Result<Presence, FleetError> {
        let not_connected = Presence {
            connected: false,
            session: None,
        };
        match self.ask_one(device, Kind::Presence).await? {
            None => Ok(not_connected),
            Some(Reply::Fleet(m)) if m.kind == ReplyKind::Presence => {
                serde_json::from_slice(&m.data).map_err(|e| {
                    debug!(error = %e, "unreadable presence answer");
                    CommandError::BadReply.into()
                })
            }
            Some(Reply::Undeliverable { .. }) => Ok(not_connected),
            Some(_) => Err(CommandError::BrokerUnavailable.into()),
        }
    }

    /// Ends the session of one device (close 4410, lifecycle reason `kicked`).
    pub async fn kick(&self, device: Uuid) -> Result<(), FleetError> {
        match self.ask_one(device, Kind::Kick).await? {
            Some(Reply::Fleet(m)) if m.kind == ReplyKind::Kicked => Ok(()),
            None | Some(Reply::Undeliverable { .. }) => Err(FleetError::NotConnected),
            Some(_) => Err(CommandError::BrokerUnavailable.into()),
        }
    }

    /// One page of the connected devices across every gateway.
    pub async fn list(self: &Arc<Self>, q: &Query) -> Result<Listed, FleetError> {
        for g in q.group.iter() {
            if !valid_group(g) {
                return Err(FleetError::BadGroup);
            }
        }
        let limit = q.limit.clamp(1, MAX_PAGE);
        let timeout = self.settings.ask_timeout;
        let deadline = Instant::now() + timeout;
        self.view.warmed(deadline).await;
        let link = self.link()?;
        let id = Uuid::now_v7();
        let mut table = Self::command_table(Kind::List, id);
        table.insert(header::LIMIT.into(), AMQPValue::LongLongInt(limit.into()));
        if let Some(a) = q.after {
            table.insert(header::AFTER.into(), long(&a.to_string()));
        }
        if let Some(g) = &q.group {
            table.insert(header::GROUP.into(), long(g));
        }
        if let Some(s) = &q.service {
            table.insert(header::SERVICE.into(), long(s));
        }
        let expected = self.view.live();
        let live_at_start = expected.clone();
        let listing = Listing::new(expected);
        let _collecting = self.pending.collect(id, listing.clone());
        let props = self.properties(id, table, timeout);
        let routed = self
            .publish(
                &link,
                exchange::BROADCAST_KEY.to_owned(),
                true,
                props,
                b"null".to_vec(),
            )
            .await?;
        let mut changes = self.view.changes();
        if routed == Routed::Yes {
            // Every expected gateway answers, and at least one does.
            loop {
                if listing.is_complete() {
                    break;
                }
                tokio::select! {
                    _ = listing.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = link.lost().cancelled() => return Err(CommandError::BrokerUnavailable.into()),
                    r = changes.changed() => if r.is_ok() {
                        let view = &self.view;
                        let gone: Vec<Uuid> = live_at_start.iter().copied().filter(|g| !view.is_live(*g)).collect();
                        listing.gateways_lost(&|g| gone.contains(&g));
                    },
                }
            }
        }
        let (pages, missing) = listing.take();
        metrics::fleet_call("list", if missing { "partial" } else { "ok" });
        let gateways = pages.len();
        let mut more = false;
        let mut by_device: HashMap<Uuid, Connected> = HashMap::new();
        for p in pages {
            more |= p.more;
            for c in p.devices {
                // A device seen on two gateways while it moves: the newer session.
                match by_device.get(&c.device) {
                    Some(old) if old.session >= c.session => {}
                    _ => {
                        by_device.insert(c.device, c);
                    }
                }
            }
        }
        let mut devices: Vec<Connected> = by_device.into_values().collect();
        devices.sort_unstable_by_key(|c| c.device);
        let limit = limit as usize;
        if devices.len() > limit {
            more = true;
            devices.truncate(limit);
        }
        let next = if more {
            devices.last().map(|c| c.device)
        } else {
            None
        };
        Ok(Listed {
            devices,
            next,
            gateways,
            partial: missing,
        })
    }

    /// Sends an event to every connected member of `group`; returns its id and how
    /// many gateways hold members (0 when none: nobody to tell, still accepted).
    pub async fn group_event(
        &self,
        group: &str,
        name: &str,
        data: &Value,
        extra: &Map<String, Value>,
    ) -> Result<(Uuid, usize), FleetError> {
        if !valid_group(group) {
            return Err(FleetError::BadGroup);
        }
        let id = Uuid::now_v7();
        let table = headers(Kind::Event, id, name, extra, None)?;
        let link = self.link()?;
        let props = BasicProperties::default()
            .with_headers(table)
            .with_message_id(ShortString::from(id.to_string()))
            .with_content_type("application/json".into())
            .with_delivery_mode(1);
        let body = serde_json::to_vec(data).expect("JSON values serialize");
        let routed = self
            .publish(&link, exchange::group_key(group), true, props, body)
            .await?;
        let gateways = match routed {
            Routed::Returned => 0,
            Routed::Yes => self.view.with_group(group).len().max(1),
        };
        metrics::fleet_call("group_event", "ok");
        Ok((id, gateways))
    }

    /// Starts a scatter-gather request: every targeted device that offers `name` gets
    /// it, with the same id; answers come through the returned [`Call`].
    pub async fn fanout(
        self: &Arc<Self>,
        audience: Audience,
        name: &str,
        data: &Value,
        extra: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Call, FleetError> {
        if let Audience::Group(g) = &audience
            && !valid_group(g)
        {
            return Err(FleetError::BadGroup);
        }
        let id = Uuid::now_v7();
        let started = Instant::now();
        let deadline = started + timeout;
        let deadline_text = (time::OffsetDateTime::now_utc() + timeout)
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a current time formats as RFC 3339");
        let table = headers(Kind::Request, id, name, extra, Some(&deadline_text))?;
        let permit = self.fanouts.clone().try_acquire_owned().map_err(|_| {
            metrics::fleet_call("fanout", "overloaded");
            FleetError::Overloaded
        })?;
        self.view
            .warmed(deadline.min(started + self.settings.ask_timeout))
            .await;
        let link = self.link()?;
        let expected = match &audience {
            Audience::Group(g) => self.view.with_group(g),
            Audience::Everyone => self.view.live(),
        };
        let live_at_start = self.view.live();
        let fanout = Fanout::new(expected, self.budget.clone());
        let collecting = self.pending.collect(id, fanout.clone());
        let props = self.properties(id, table, timeout);
        let body = serde_json::to_vec(data).expect("JSON values serialize");
        let key = audience.key();
        let routed = self.publish(&link, key, true, props, body).await?;
        match routed {
            // Nobody holds a member: complete at once, nobody asked.
            Routed::Returned => fanout.gateways_lost(&|_| true),
            Routed::Yes => fanout.expect_one(),
        }
        Ok(Call {
            id,
            fanout,
            deadline,
            view: self.view.changes(),
            live_at_start,
            audience,
            fleet: self.clone(),
            _collecting: Some(collecting),
            _permit: permit,
        })
    }

    /// Reads this replica's fleet queue (no-ack) until its channel ends.
    pub async fn consume(self: Arc<Self>, mut rx: mpsc::Receiver<Incoming>) {
        while let Some(Incoming { delivery: d, .. }) = rx.recv().await {
            let key = d.routing_key.as_str();
            if d.exchange.as_str() == exchange::FLEET {
                self.on_fleet(key, &d.data);
            } else if let Some(rest) = key.strip_prefix("lifecycle.") {
                let headers = d.properties.headers().as_ref();
                let uuid = |name| header_str(headers, name).and_then(|s| Uuid::parse_str(s).ok());
                let (Some(device), Some(session)) = (uuid(header::DEVICE), uuid(header::SESSION))
                else {
                    continue;
                };
                match rest.rsplit_once('.').and_then(|(_, n)| Lifecycle::parse(n)) {
                    Some(Lifecycle::Connected) => {
                        if let Some(g) = uuid(header::GATEWAY) {
                            self.sessions.connected(device, session, g);
                        }
                    }
                    Some(Lifecycle::Disconnected) => self.sessions.disconnected(device, session),
                    _ => {}
                }
            }
        }
    }

    fn on_fleet(&self, key: &str, body: &[u8]) {
        let mut parts = key.split('.');
        let (Some("gateway"), Some(id), Some(what), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Ok(gateway) = Uuid::parse_str(id) else {
            return;
        };
        match what {
            "up" | "down" => match serde_json::from_slice::<Announcement>(body) {
                Ok(a) if a.gateway == gateway => {
                    let heard = self.view.heard(a, what == "up");
                    if heard == view::Heard::New {
                        info!(%gateway, "gateway replica joined the fleet");
                    } else if heard == view::Heard::Down {
                        info!(%gateway, "gateway replica left the fleet");
                        self.down
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((gateway, Instant::now()));
                    }
                }
                _ => debug!(%gateway, "unreadable gateway announcement dropped"),
            },
            "lost" => self.sessions.forget_orphans(gateway),
            _ => {}
        }
    }
}

impl Fleet {
    /// Keeps the fleet's state: expires silent gateways (their sessions become
    /// orphans), tries to become the leader, publishes the orphans' `gateway_lost`
    /// disconnects while leader, and on every new link asks the gateways to announce
    /// themselves and rebuilds the session tracker from a listing. Runs until
    /// `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut links = self.link.clone();
        let mut generation = 0;
        let mut leader_channel: Option<(u64, Channel)> = None;
        let mut next_try = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        let warm_after = Instant::now() + self.settings.lost_after / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                r = links.changed() => if r.is_err() { return },
            }
            if Instant::now() >= warm_after {
                self.view.set_warm();
            }
            metrics::fleet_state(self.view.live().len(), self.is_leader());
            let link = links.borrow_and_update().clone();
            let Some(link) = link else {
                self.leader.store(false, Ordering::Release);
                leader_channel = None;
                continue;
            };
            if link.generation() != generation {
                generation = link.generation();
                self.leader.store(false, Ordering::Release);
                leader_channel = None;
                next_try = Instant::now();
                tokio::spawn(self.clone().bootstrap(link.clone()));
            }
            // Leadership: the exclusive queue, on a channel of its own.
            if leader_channel.is_none() && Instant::now() >= next_try {
                next_try = Instant::now() + LEADER_RETRY;
                if let Some(ch) = try_lead(&link).await {
                    info!("this replica leads the fleet's gateway-loss announcements");
                    leader_channel = Some((generation, ch));
                    self.leader.store(true, Ordering::Release);
                }
            }
            for g in self.view.expire() {
                let n = self.sessions.lose(g);
                metrics::gateway_lost();
                warn!(gateway = %g, sessions = n, "gateway replica fell silent: declared lost");
            }
            let due: Vec<Uuid> = {
                let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let (due, keep): (Vec<_>, Vec<_>) = down
                    .drain(..)
                    .partition(|(_, at)| now.duration_since(*at) >= self.settings.lost_after);
                *down = keep;
                due.into_iter().map(|(g, _)| g).collect()
            };
            for g in due {
                if !self.view.is_live(g) && self.sessions.held_by(g) > 0 {
                    let n = self.sessions.lose(g);
                    warn!(gateway = %g, sessions = n, "sessions of a gateway that left never disconnected");
                }
            }
            if self.is_leader() {
                for g in self.sessions.orphaned_gateways() {
                    if self.announce_lost(&link, g).await {
                        self.sessions.forget_orphans(g);
                    }
                }
            }
        }
    }

    /// Publishes `disconnected` (`gateway_lost`) for each orphan of `gateway`, then
    /// `gateway.<id>.lost`; true when every publish was confirmed.
    async fn announce_lost(&self, link: &Arc<Link>, gateway: Uuid) -> bool {
        let orphans = self.sessions.orphans(gateway);
        let timeout = self.settings.publish_timeout;
        let failed = futures_util::stream::iter(orphans.iter().copied())
            .map(|(device, session)| {
                let m = lost_disconnect(device, session, gateway);
                link.publish(0, m, timeout)
            })
            .buffer_unordered(LOST_CONCURRENCY)
            .filter(|r| std::future::ready(r.is_err()))
            .count()
            .await;
        if failed > 0 {
            warn!(%gateway, failed, "gateway_lost disconnects not confirmed; trying again");
            return false;
        }
        metrics::gateway_lost_sessions(orphans.len());
        let body = serde_json::json!({"gateway": gateway, "sessions": orphans.len()});
        let m = Publish {
            exchange: exchange::FLEET,
            routing_key: exchange::gateway_lost_key(gateway),
            mandatory: false,
            properties: BasicProperties::default().with_content_type("application/json".into()),
            body: body.to_string().into_bytes(),
        };
        let ok = link.publish(0, m, timeout).await.is_ok();
        info!(%gateway, sessions = orphans.len(), "gateway_lost announced for every session of the lost gateway");
        ok
    }

    /// On a new link: ask every gateway to announce itself, then rebuild the session
    /// tracker from a listing of every gateway.
    async fn bootstrap(self: Arc<Self>, link: Arc<Link>) {
        let id = Uuid::now_v7();
        let props = BasicProperties::default()
            .with_headers(Self::command_table(Kind::Announce, id))
            .with_delivery_mode(1);
        if let Err(e) = self
            .publish(
                &link,
                exchange::BROADCAST_KEY.to_owned(),
                false,
                props,
                b"null".to_vec(),
            )
            .await
        {
            debug!(error = %e, "asking the gateways to announce failed");
        }
        self.sessions.begin_bootstrap();
        let mut q = Query {
            limit: MAX_PAGE,
            ..Default::default()
        };
        let mut listed = 0usize;
        loop {
            if link.lost().is_cancelled() {
                break;
            }
            match self.list(&q).await {
                Ok(page) => {
                    for c in &page.devices {
                        self.sessions.listed(c.device, c.session, c.gateway);
                    }
                    listed += page.devices.len();
                    match page.next {
                        Some(n) => q.after = Some(n),
                        None => break,
                    }
                }
                Err(e) => {
                    debug!(error = %e, "listing the fleet at start failed; following lifecycle messages only");
                    break;
                }
            }
        }
        self.sessions.end_bootstrap();
        info!(sessions = listed, "fleet sessions listed");
    }
}

/// Tries to declare the leader queue on a channel outside the link's monitored set;
/// the channel (kept open while leading) or `None` when another replica leads.
async fn try_lead(link: &Link) -> Option<Channel> {
    let ch = link.open_channel().await.ok()?;
    let declared = ch
        .queue_declare(
            crate::broker::LEADER_QUEUE.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => Some(ch),
        Err(e) => {
            debug!(error = %e, "another replica leads");
            None
        }
    }
}

/// The `disconnected` message device-service publishes for a session whose gateway
/// was lost, as the gateway would have (plus `reason` `gateway_lost`).
pub fn lost_disconnect(device: Uuid, session: Uuid, gateway: Uuid) -> Publish {
    let message_id = Uuid::new_v5(&GATEWAY_LOST_NAMESPACE, session.as_bytes());
    let now = time::OffsetDateTime::now_utc();
    let received_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a current time formats as RFC 3339");
    let mut h = FieldTable::default();
    h.insert(header::KIND.into(), long(header::KIND_LIFECYCLE));
    h.insert(header::DEVICE.into(), long(&device.to_string()));
    h.insert(header::SESSION.into(), long(&session.to_string()));
    h.insert(header::GATEWAY.into(), long(&gateway.to_string()));
    h.insert(header::NAME.into(), long(Lifecycle::Disconnected.as_str()));
    h.insert(header::MESSAGE_ID.into(), long(&message_id.to_string()));
    h.insert(header::RECEIVED_AT.into(), long(&received_at));
    h.insert(
        header::REASON.into(),
        long(DisconnectReason::GatewayLost.as_str()),
    );
    Publish {
        exchange: exchange::EVENTS,
        routing_key: exchange::lifecycle_key(device, Lifecycle::Disconnected),
        mandatory: false,
        properties: BasicProperties::default()
            .with_headers(h)
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(message_id.to_string()))
            .with_timestamp(now.unix_timestamp().max(0) as u64),
        body: b"null".to_vec(),
    }
}
