//! Which device sessions this replica holds: `device -> session handle`.
//!
//! A handle reaches its session through one shared [`Control`]: the session's
//! bounded outbound queue and its close request. The queue holds no storage while
//! it is empty, so an idle session costs the registry one small allocation.
//!
//! One entry per device. Registering a device that already has an entry returns the
//! older handle so the caller can close it (4409 replaced); a session removes only its
//! own entry, so a replaced session never unregisters its successor.
//!
//! It also counts the sessions of each group (from their tokens), under the same
//! lock: the broker binds `group.<name>` while the count is above zero.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::fleet::Capabilities;
use tokio::sync::Notify;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use uuid::Uuid;

/// Something to write to one device, queued in its bounded outbound queue.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A ready `event` frame from Hive.
    Event(Utf8Bytes),
    /// A `request` frame; the session remembers it until answered or expired.
    Request(Box<RequestOut>),
}

/// A request on its way to a device, with what is needed to answer the requester.
#[derive(Debug)]
pub(crate) struct RequestOut {
    pub text: Utf8Bytes,
    pub pending: Pending,
}

/// A request sent to a device and not yet answered.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The request id (the `correlation_id` of the answer).
    pub id: Box<str>,
    /// Where the answer goes (default exchange, this routing key).
    pub reply_to: Box<str>,
    /// Answers after this are refused with `unknown_request`.
    pub deadline: Instant,
}

/// A way to reach a session from outside its task: its bounded outbound queue, and
/// a request to end it.
#[derive(Debug)]
pub(crate) struct Control {
    reason: AtomicU8,
    /// Wakes the session: something was queued, or it was asked to end.
    notify: Notify,
    /// The `iat` of the token the session runs under (0: none), for revocations.
    issued_at: AtomicU64,
    /// The outbound queue. Its storage exists only while something waits in it.
    queue: Mutex<Queue>,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Outbound>,
    /// The most items it holds (`OUTBOUND_QUEUE`).
    capacity: usize,
    /// Set once the session stopped taking from it.
    closed: bool,
}

/// What woke a session: something to write, or the request to end.
#[derive(Debug)]
pub(crate) enum Wake {
    /// The next item of the outbound queue.
    Out(Outbound),
    /// [`Control::close`] was called, with this reason.
    Close(DisconnectReason),
}

const REASONS: [DisconnectReason; 5] = [
    DisconnectReason::Replaced,
    DisconnectReason::SlowConsumer,
    DisconnectReason::Error,
    DisconnectReason::Kicked,
    DisconnectReason::Revoked,
];

impl Control {
    /// A control whose outbound queue holds at most `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Self {
        Control {
            reason: AtomicU8::new(0),
            notify: Notify::new(),
            issued_at: AtomicU64::new(0),
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                capacity: capacity.max(1),
                closed: false,
            }),
        }
    }

    /// Asks the session to end for `reason` (the first reason given wins).
    pub fn close(&self, reason: DisconnectReason) {
        let code = REASONS.iter().position(|r| *r == reason).unwrap_or(2) as u8 + 1;
        let _ = self
            .reason
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.notify.notify_one();
    }

    /// The reason given to [`Control::close`], if it was called.
    fn reason(&self) -> Option<DisconnectReason> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            code => Some(REASONS[(code - 1) as usize]),
        }
    }

    /// Records the `iat` of the session's current token.
    pub fn set_issued_at(&self, iat: Option<u64>) {
        self.issued_at.store(iat.unwrap_or(0), Ordering::Release);
    }

    /// The `iat` of the session's current token (`None`: the token has none).
    pub fn issued_at(&self) -> Option<u64> {
        Some(self.issued_at.load(Ordering::Acquire)).filter(|i| *i != 0)
    }

    /// Queues `out` for the session without waiting: `Full` when the queue holds its
    /// capacity, `Closed` once the session stopped taking from it (as a bounded
    /// channel's `try_send`).
    pub fn try_send(&self, out: Outbound) -> Result<(), TrySendError<Outbound>> {
        let mut q = self.queue.lock().unwrap();
        if q.closed {
            return Err(TrySendError::Closed(out));
        }
        if q.items.len() >= q.capacity {
            return Err(TrySendError::Full(out));
        }
        q.items.push_back(out);
        drop(q);
        self.notify.notify_one();
        Ok(())
    }

    /// The next thing for the session to do: end, once [`Control::close`] was
    /// called, else write the oldest queued item. Cancel safe: an item is taken only
    /// when it is returned.
    pub async fn next(&self) -> Wake {
        loop {
            if let Some(reason) = self.reason() {
                return Wake::Close(reason);
            }
            if let Some(out) = self.pop() {
                return Wake::Out(out);
            }
            // A `notify_one` between the checks above and this wait is kept as a
            // permit, so no wake-up is lost.
            self.notify.notified().await;
        }
    }

    fn pop(&self) -> Option<Outbound> {
        let mut q = self.queue.lock().unwrap();
        let out = q.items.pop_front();
        if q.items.is_empty() && q.items.capacity() > 0 {
            // An idle session keeps no queue storage.
            q.items = VecDeque::new();
        }
        out
    }

    /// Resolves once [`Control::close`] was called, with its reason.
    #[cfg(test)]
    pub async fn closed(&self) -> DisconnectReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.notify.notified().await;
        }
    }

    /// Stops the queue (later [`Control::try_send`]s fail with `Closed`) and returns
    /// what was still in it.
    pub fn close_queue(&self) -> VecDeque<Outbound> {
        let mut q = self.queue.lock().unwrap();
        q.closed = true;
        std::mem::take(&mut q.items)
    }
}

/// What the fleet may ask about a session: when it began, its groups, and what the
/// device declared it offers.
#[derive(Debug)]
pub(crate) struct SessionInfo {
    /// When the session began (shown as RFC 3339).
    pub connected_at: time::OffsetDateTime,
    /// From the token; fixed for the session.
    pub groups: Vec<String>,
    /// Changed by `register` frames.
    pub capabilities: Mutex<Capabilities>,
}

impl Default for SessionInfo {
    fn default() -> Self {
        SessionInfo {
            connected_at: time::OffsetDateTime::now_utc(),
            groups: Vec::new(),
            capabilities: Mutex::default(),
        }
    }
}

impl SessionInfo {
    /// The declared capabilities now.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities.lock().unwrap().clone()
    }

    /// Whether a request named `name` may reach the device.
    pub fn offers(&self, name: &str) -> bool {
        self.capabilities.lock().unwrap().offers(name)
    }
}

/// The registry's view of one session.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    pub session: Uuid,
    pub control: Arc<Control>,
    pub info: Arc<SessionInfo>,
}

/// How long a device that moved to another replica is remembered.
const MOVED_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// Above this many remembered moves, expired ones are pruned.
const MOVED_PRUNE_AT: usize = 1024;

/// The sessions and the group counts, under one lock.
#[derive(Debug, Default)]
struct Held {
    map: HashMap<Uuid, SessionHandle>,
    groups: HashMap<String, u64>,
}

impl Held {
    fn join(&mut self, h: &SessionHandle) {
        for g in &h.info.groups {
            *self.groups.entry(g.clone()).or_default() += 1;
        }
    }

    fn leave(&mut self, h: &SessionHandle) {
        for g in &h.info.groups {
            if let Some(n) = self.groups.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    self.groups.remove(g);
                }
            }
        }
    }
}

/// Sessions held by this replica, by device.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    map: Mutex<Held>,
    /// Devices whose session here was taken over by another replica, and when: while
    /// this replica's binding for them is being removed, a request may reach both
    /// replicas, and only the new holder should answer.
    moved: Mutex<HashMap<Uuid, Instant>>,
}

impl Registry {
    /// Registers `handle` for `device`, returning the session it replaces.
    pub fn insert(&self, device: Uuid, handle: SessionHandle) -> Option<SessionHandle> {
        let mut held = self.map.lock().unwrap();
        held.join(&handle);
        let old = held.map.insert(device, handle);
        if let Some(old) = &old {
            held.leave(old);
        }
        old
    }

    /// Removes `device` if `session` still holds it; says whether it did.
    pub fn remove(&self, device: Uuid, session: Uuid) -> bool {
        let mut held = self.map.lock().unwrap();
        match held.map.get(&device) {
            Some(h) if h.session == session => {
                if let Some(h) = held.map.remove(&device) {
                    held.leave(&h);
                }
                true
            }
            _ => false,
        }
    }

    /// The session holding `device`.
    pub fn get(&self, device: Uuid) -> Option<SessionHandle> {
        self.map.lock().unwrap().map.get(&device).cloned()
    }

    /// Whether some session holds `device`.
    pub fn contains(&self, device: Uuid) -> bool {
        self.map.lock().unwrap().map.contains_key(&device)
    }

    /// Every device held now.
    pub fn devices(&self) -> Vec<Uuid> {
        self.map.lock().unwrap().map.keys().copied().collect()
    }

    /// Every session held now.
    pub fn handles(&self) -> Vec<SessionHandle> {
        self.map.lock().unwrap().map.values().cloned().collect()
    }

    /// Every session held now, with its device.
    pub fn entries(&self) -> Vec<(Uuid, SessionHandle)> {
        let held = self.map.lock().unwrap();
        held.map.iter().map(|(d, h)| (*d, h.clone())).collect()
    }

    /// The sessions of the members of `group` held now.
    pub fn members(&self, group: &str) -> Vec<(Uuid, SessionHandle)> {
        let held = self.map.lock().unwrap();
        if !held.groups.contains_key(group) {
            return Vec::new();
        }
        held.map
            .iter()
            .filter(|(_, h)| h.info.groups.iter().any(|g| g == group))
            .map(|(d, h)| (*d, h.clone()))
            .collect()
    }

    /// Each group with at least one session here, with its number of sessions.
    pub fn group_counts(&self) -> Vec<(String, u64)> {
        let held = self.map.lock().unwrap();
        held.groups.iter().map(|(g, n)| (g.clone(), *n)).collect()
    }

    /// Whether some session here belongs to `group`.
    pub fn has_group(&self, group: &str) -> bool {
        self.map.lock().unwrap().groups.contains_key(group)
    }

    /// Remembers that `device` moved to another replica.
    pub fn mark_moved(&self, device: Uuid) {
        let now = Instant::now();
        let mut moved = self.moved.lock().unwrap();
        if moved.len() >= MOVED_PRUNE_AT {
            moved.retain(|_, at| now.duration_since(*at) < MOVED_WINDOW);
        }
        moved.insert(device, now);
    }

    /// Whether `device` moved to another replica within the last few seconds.
    pub fn moved_recently(&self, device: Uuid) -> bool {
        self.moved
            .lock()
            .unwrap()
            .get(&device)
            .is_some_and(|at| at.elapsed() < MOVED_WINDOW)
    }

    /// Number of devices held.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap().map.len()
    }
}

impl crate::broker::Held for Registry {
    fn devices(&self) -> Vec<Uuid> {
        Registry::devices(self)
    }

    fn holds(&self, device: Uuid) -> bool {
        self.contains(device)
    }

    fn groups(&self) -> Vec<String> {
        self.group_counts().into_iter().map(|(g, _)| g).collect()
    }

    fn has_group(&self, group: &str) -> bool {
        Registry::has_group(self, group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> SessionHandle {
        handle_in(&[])
    }

    fn handle_in(groups: &[&str]) -> SessionHandle {
        SessionHandle {
            session: Uuid::now_v7(),
            control: Arc::new(Control::new(1)),
            info: Arc::new(SessionInfo {
                groups: groups.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn groups_are_counted_per_session() {
        let r = Registry::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let ha = handle_in(&["x", "y"]);
        let hb = handle_in(&["x"]);
        r.insert(a, ha.clone());
        r.insert(b, hb.clone());
        let mut counts = r.group_counts();
        counts.sort();
        assert_eq!(counts, vec![("x".into(), 2), ("y".into(), 1)]);
        assert_eq!(r.members("y").len(), 1);
        assert!(r.members("z").is_empty());
        // A replacement with other groups moves the counts; the old session cannot
        // remove them twice.
        let ha2 = handle_in(&["z"]);
        r.insert(a, ha2.clone());
        assert!(!r.has_group("y"));
        assert!(!r.remove(a, ha.session));
        assert!(r.remove(a, ha2.session));
        assert!(r.remove(b, hb.session));
        assert!(r.group_counts().is_empty());
    }

    #[test]
    fn a_replaced_session_cannot_remove_its_successor() {
        let r = Registry::default();
        let d = Uuid::new_v4();
        let old = handle();
        let new = handle();
        assert!(r.insert(d, old.clone()).is_none());
        assert_eq!(r.insert(d, new.clone()).unwrap().session, old.session);
        assert!(!r.remove(d, old.session));
        assert!(r.contains(d));
        assert!(r.remove(d, new.session));
        assert_eq!(r.len(), 0);
        assert!(!r.moved_recently(d));
        r.mark_moved(d);
        assert!(r.moved_recently(d));
    }

    #[tokio::test]
    async fn the_first_close_reason_wins() {
        let c = Control::new(1);
        c.close(DisconnectReason::SlowConsumer);
        c.close(DisconnectReason::Replaced);
        assert_eq!(c.closed().await, DisconnectReason::SlowConsumer);
    }

    fn event(text: &'static str) -> Outbound {
        Outbound::Event(Utf8Bytes::from_static(text))
    }

    #[tokio::test]
    async fn the_outbound_queue_is_bounded_ordered_and_closes() {
        let c = Control::new(2);
        c.try_send(event("a")).unwrap();
        c.try_send(event("b")).unwrap();
        assert!(matches!(c.try_send(event("c")), Err(TrySendError::Full(_))));
        for want in ["a", "b"] {
            match c.next().await {
                Wake::Out(Outbound::Event(t)) => assert_eq!(t.as_str(), want),
                other => panic!("expected {want}, got {other:?}"),
            }
        }
        // Drained: no storage is kept.
        assert_eq!(c.queue.lock().unwrap().items.capacity(), 0);
        c.try_send(event("d")).unwrap();
        let left = c.close_queue();
        assert_eq!(left.len(), 1);
        assert!(matches!(
            c.try_send(event("e")),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_an_item_and_a_close_goes_first() {
        let c = Arc::new(Control::new(4));
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.next().await }
        });
        tokio::task::yield_now().await;
        c.try_send(event("x")).unwrap();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(woke, Wake::Out(Outbound::Event(_))));
        c.try_send(event("y")).unwrap();
        c.close(DisconnectReason::Kicked);
        assert!(matches!(
            c.next().await,
            Wake::Close(DisconnectReason::Kicked)
        ));
    }
}
