//! Collecting many answers to one id: the pages of a listing, and the reports and
//! device answers of a scatter-gather request.
//!
//! The reply consumer hands every message with the call's id to its collector
//! ([`crate::pending::Collector`]); the collector sorts it under a lock and wakes
//! the caller. Nothing here waits on the network.
//!
//! A fan-out knows which gateways it waits for (from the view). Each gateway's
//! report (the devices it asked) reaches the reply queue before any answer of its
//! devices, so an answer from a device no report named, or a second answer from
//! one device, is dropped. A fan-out is complete when every expected gateway
//! reported and every device asked has an outcome: answered, left (it disconnected
//! first, or its gateway was lost) or busy (connected but unable to take it);
//! at the deadline the rest time out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mosaic_protocol::command::{ReplyKind, undeliverable};
use mosaic_protocol::fleet::{FanoutReport, Page};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tracing::debug;
use uuid::Uuid;

use crate::metrics;
use crate::pending::{Collector, ReplyMessage};

/// Bytes of device answers held in memory by one replica's fan-outs
/// (`MAX_FANOUT_ANSWER_BYTES`): past it an answer keeps its status and loses its
/// data (`"truncated": true`).
#[derive(Debug)]
pub struct Budget {
    left: AtomicUsize,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Budget {
            left: AtomicUsize::new(bytes),
        })
    }

    fn take(&self, n: usize) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.left.fetch_add(n, Ordering::AcqRel);
    }

    /// Bytes left.
    pub fn left(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

/// One device's answer to a fan-out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceAnswer {
    /// The device.
    pub device: Uuid,
    /// Its status.
    pub status: String,
    /// Its data (`null` when truncated, or when it was not JSON).
    pub data: Value,
    /// Set when the data was dropped because the replica held too many answers.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Waiting(Uuid),
    Done,
}

#[derive(Debug, Default)]
struct Fan {
    expected: HashSet<Uuid>,
    reported: HashSet<Uuid>,
    devices: HashMap<Uuid, Slot>,
    waiting: usize,
    /// Answers not yet taken by the caller.
    ready: VecDeque<(DeviceAnswer, usize)>,
    answered: usize,
    left: Vec<Uuid>,
    busy: Vec<Uuid>,
    /// Routed to some queue but no gateway was expected: wait for one report.
    need_one: bool,
}

/// The state of one scatter-gather request.
#[derive(Debug)]
pub struct Fanout {
    fan: Mutex<Fan>,
    notify: Notify,
    budget: Arc<Budget>,
}

/// How a fan-out ended, for the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Devices asked.
    pub asked: usize,
    /// Devices that answered.
    pub answered: usize,
    /// Devices asked that did not answer in time.
    pub timed_out: Vec<Uuid>,
    /// Devices that disconnected before answering (or whose gateway was lost).
    pub left: Vec<Uuid>,
    /// Devices connected but unable to take the request.
    pub busy: Vec<Uuid>,
    /// Gateways that reported.
    pub gateways: usize,
}

impl Fanout {
    /// A fan-out waiting for the reports of `expected`.
    pub fn new(expected: Vec<Uuid>, budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Fanout {
            fan: Mutex::new(Fan {
                expected: expected.into_iter().collect(),
                ..Default::default()
            }),
            notify: Notify::new(),
            budget,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fan> {
        self.fan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request reached some queue although no gateway was expected: complete
    /// only after at least one report.
    pub fn expect_one(&self) {
        let mut f = self.lock();
        if f.expected.is_empty() && f.reported.is_empty() {
            f.need_one = true;
        }
    }

    /// Whether every expected gateway reported and every device asked has an outcome.
    pub fn is_complete(&self) -> bool {
        let f = self.lock();
        f.expected.is_empty() && f.waiting == 0 && !f.need_one
    }

    /// Resolves at the next change.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Takes the answers that arrived since the last call (their bytes go back to
    /// the budget).
    pub fn take_ready(&self) -> Vec<DeviceAnswer> {
        let mut f = self.lock();
        let mut out = Vec::with_capacity(f.ready.len());
        while let Some((a, bytes)) = f.ready.pop_front() {
            self.budget.give(bytes);
            out.push(a);
        }
        out
    }

    /// Stops waiting for the reports of the gateways `gone` names (they no longer
    /// hold the group); a report that still comes is taken.
    pub fn not_expected(&self, gone: &dyn Fn(Uuid) -> bool) {
        let mut f = self.lock();
        let before = f.expected.len();
        f.expected.retain(|g| !gone(*g));
        if f.expected.len() != before {
            drop(f);
            self.notify.notify_one();
        }
    }

    /// The gateways in `lost` will not report: their devices still waiting left.
    pub fn gateways_lost(&self, lost: &dyn Fn(Uuid) -> bool) {
        let mut f = self.lock();
        let f = &mut *f;
        f.expected.retain(|g| !lost(*g));
        let mut gone = Vec::new();
        for (d, slot) in f.devices.iter_mut() {
            if let Slot::Waiting(g) = *slot
                && lost(g)
            {
                *slot = Slot::Done;
                gone.push(*d);
            }
        }
        f.waiting -= gone.len();
        f.left.extend(gone);
        self.notify.notify_one();
    }

    /// Ends the fan-out: whoever is still waiting timed out.
    pub fn finish(&self) -> Outcome {
        let f = self.lock();
        let timed_out: Vec<Uuid> = f
            .devices
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Waiting(_)))
            .map(|(d, _)| *d)
            .collect();
        Outcome {
            asked: f.devices.len(),
            answered: f.answered,
            timed_out,
            left: f.left.clone(),
            busy: f.busy.clone(),
            gateways: f.reported.len(),
        }
    }

    fn report(&self, f: &mut Fan, r: FanoutReport) {
        if !f.reported.insert(r.gateway) {
            debug!(gateway = %r.gateway, "second fan-out report dropped");
            return;
        }
        f.expected.remove(&r.gateway);
        f.need_one = false;
        for d in r.asked {
            if let std::collections::hash_map::Entry::Vacant(e) = f.devices.entry(d) {
                e.insert(Slot::Waiting(r.gateway));
                f.waiting += 1;
            }
        }
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        let f = self.fan.get_mut().unwrap_or_else(|e| e.into_inner());
        let held: usize = f.ready.iter().map(|(_, b)| *b).sum();
        self.budget.give(held);
    }
}

impl Collector for Fanout {
    fn offer(&self, m: ReplyMessage) {
        let mut guard = self.lock();
        let f = &mut *guard;
        match m.kind {
            ReplyKind::Fanout => match serde_json::from_slice::<FanoutReport>(&m.data) {
                Ok(r) => self.report(f, r),
                Err(e) => debug!(error = %e, "unreadable fan-out report dropped"),
            },
            ReplyKind::Response | ReplyKind::Undeliverable => {
                let Some(device) = m.device else { return };
                let from = m.gateway;
                match f.devices.get_mut(&device) {
                    Some(slot @ Slot::Waiting(_))
                        if from.is_none() || *slot == Slot::Waiting(from.unwrap_or_default()) =>
                    {
                        *slot = Slot::Done;
                    }
                    _ => {
                        metrics::fanout_refused();
                        debug!(%device, "answer from a device not asked, or asked once, dropped");
                        return;
                    }
                }
                f.waiting -= 1;
                if m.kind == ReplyKind::Undeliverable {
                    match m.reason.as_deref() {
                        Some(undeliverable::DEVICE_BUSY) => f.busy.push(device),
                        _ => f.left.push(device),
                    }
                } else {
                    let bytes = m.data.len();
                    let parsed = if m.data.iter().all(u8::is_ascii_whitespace) {
                        Some(Value::Null)
                    } else {
                        serde_json::from_slice(&m.data).ok()
                    };
                    let (data, truncated, held) = match parsed {
                        Some(v) if self.budget.take(bytes) => (v, false, bytes),
                        Some(_) => {
                            metrics::fanout_truncated();
                            (Value::Null, true, 0)
                        }
                        None => (Value::Null, false, 0),
                    };
                    f.answered += 1;
                    f.ready.push_back((
                        DeviceAnswer {
                            device,
                            status: m.status.unwrap_or_else(|| "ok".into()),
                            data,
                            truncated,
                        },
                        held,
                    ));
                }
            }
            _ => return,
        }
        drop(guard);
        self.notify.notify_one();
    }
}

/// The pages of one listing, by gateway.
#[derive(Debug)]
pub struct Listing {
    state: Mutex<(HashSet<Uuid>, Vec<Page>)>,
    notify: Notify,
}

impl Listing {
    /// A listing waiting for the pages of `expected`.
    pub fn new(expected: Vec<Uuid>) -> Arc<Self> {
        Arc::new(Listing {
            state: Mutex::new((expected.into_iter().collect(), Vec::new())),
            notify: Notify::new(),
        })
    }

    /// Whether every expected gateway answered (and, when none was expected, at
    /// least one did).
    pub fn is_complete(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0.is_empty() && !s.1.is_empty()
    }

    /// Whether every expected gateway answered.
    pub fn expected_answered(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0.is_empty()
    }

    /// Resolves at the next page.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// The pages so far, and whether a gateway expected did not answer.
    pub fn take(&self) -> (Vec<Page>, bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut s.1), !s.0.is_empty())
    }

    /// The gateways in `lost` will not answer.
    pub fn gateways_lost(&self, lost: &dyn Fn(Uuid) -> bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0.retain(|g| !lost(*g));
        drop(s);
        self.notify.notify_one();
    }
}

impl Collector for Listing {
    fn offer(&self, m: ReplyMessage) {
        if m.kind != ReplyKind::Listing {
            return;
        }
        let page: Page = match serde_json::from_slice(&m.data) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "unreadable listing page dropped");
                return;
            }
        };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1.iter().any(|p| p.gateway == page.gateway) {
            return;
        }
        s.0.remove(&page.gateway);
        s.1.push(page);
        drop(s);
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: ReplyKind, gateway: Uuid, device: Option<Uuid>, data: &[u8]) -> ReplyMessage {
        ReplyMessage {
            id: Uuid::nil(),
            kind,
            device,
            gateway: Some(gateway),
            status: Some("ok".into()),
            reason: None,
            data: data.to_vec(),
        }
    }

    fn report(g: Uuid, asked: &[Uuid]) -> ReplyMessage {
        let body = serde_json::to_vec(&FanoutReport {
            gateway: g,
            asked: asked.to_vec(),
        })
        .unwrap();
        msg(ReplyKind::Fanout, g, None, &body)
    }

    #[test]
    fn every_device_lands_in_one_bucket() {
        let budget = Budget::new(1 << 20);
        let (g1, g2) = (Uuid::new_v4(), Uuid::new_v4());
        let d: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let f = Fanout::new(vec![g1, g2], budget.clone());
        // An answer before its gateway reported is not one of ours.
        f.offer(msg(ReplyKind::Response, g1, Some(d[0]), b"1"));
        f.offer(report(g1, &d[0..3]));
        assert!(!f.is_complete());
        f.offer(msg(ReplyKind::Response, g1, Some(d[0]), br#"{"v":1}"#));
        // Twice, or from the wrong gateway: dropped.
        f.offer(msg(ReplyKind::Response, g1, Some(d[0]), b"2"));
        f.offer(msg(ReplyKind::Response, g2, Some(d[1]), b"2"));
        let mut gone = msg(ReplyKind::Undeliverable, g1, Some(d[1]), b"null");
        gone.reason = Some("device_disconnected".into());
        f.offer(gone);
        f.offer(report(g2, &d[3..5]));
        let mut busy = msg(ReplyKind::Undeliverable, g2, Some(d[3]), b"null");
        busy.reason = Some("device_busy".into());
        f.offer(busy);
        f.offer(msg(ReplyKind::Response, g2, Some(d[4]), b"not json"));
        assert!(!f.is_complete());
        let ready = f.take_ready();
        assert_eq!(ready.len(), 2);
        assert_eq!(ready[0].data, serde_json::json!({"v":1}));
        let out = f.finish();
        assert_eq!(out.asked, 5);
        assert_eq!(out.answered, 2);
        assert_eq!(out.timed_out, vec![d[2]]);
        assert_eq!(out.left, vec![d[1]]);
        assert_eq!(out.busy, vec![d[3]]);
        assert_eq!(out.gateways, 2);
        drop(f);
        assert_eq!(budget.left(), 1 << 20);
    }

    #[test]
    fn a_lost_gateway_releases_its_devices() {
        let (g1, g2) = (Uuid::new_v4(), Uuid::new_v4());
        let d = Uuid::new_v4();
        let f = Fanout::new(vec![g1, g2], Budget::new(10));
        f.offer(report(g1, &[d]));
        f.gateways_lost(&|g| g == g1 || g == g2);
        assert!(f.is_complete());
        assert_eq!(f.finish().left, vec![d]);
    }

    #[test]
    fn answers_past_the_budget_lose_their_data() {
        let g = Uuid::new_v4();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let budget = Budget::new(4);
        let f = Fanout::new(vec![g], budget.clone());
        f.offer(report(g, &[a, b]));
        f.offer(msg(ReplyKind::Response, g, Some(a), b"123"));
        f.offer(msg(ReplyKind::Response, g, Some(b), b"456"));
        assert!(f.is_complete());
        let ready = f.take_ready();
        assert!(!ready[0].truncated && ready[1].truncated);
        assert_eq!(ready[1].data, Value::Null);
        assert_eq!(budget.left(), 4);
    }

    #[test]
    fn no_expected_gateway_waits_for_one_report_when_routed() {
        let f = Fanout::new(vec![], Budget::new(10));
        assert!(f.is_complete());
        f.expect_one();
        assert!(!f.is_complete());
        f.offer(report(Uuid::new_v4(), &[]));
        assert!(f.is_complete());
    }
}
