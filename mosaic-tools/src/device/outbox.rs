//! Events a device sent and not yet acked, kept across connections.

use std::collections::VecDeque;

use rand::Rng;

/// Events sent and not yet acked, plus the counters for new ones; lives across
/// connections.
#[derive(Debug)]
pub(super) struct Outbox {
    pub(super) run: String,
    pub(super) next_seq: u64,
    /// Sent with an id, waiting for `ack` (front: oldest).
    pub(super) in_flight: VecDeque<(String, String)>,
    /// To send again (after a reconnect or a nack) before new ones.
    pub(super) resend: VecDeque<(String, String)>,
}

impl Outbox {
    pub(super) fn new() -> Self {
        Outbox {
            run: format!("{:08x}", rand::rng().random::<u32>()),
            next_seq: 0,
            in_flight: VecDeque::new(),
            resend: VecDeque::new(),
        }
    }

    pub(super) fn settle(&mut self, id: &str) -> Option<String> {
        let pos = self.in_flight.iter().position(|(i, _)| i == id)?;
        self.in_flight.remove(pos).map(|(_, text)| text)
    }

    pub(super) fn requeue_in_flight(&mut self) {
        while let Some(e) = self.in_flight.pop_back() {
            self.resend.push_front(e);
        }
    }

    pub(super) fn pending(&self) -> usize {
        self.in_flight.len() + self.resend.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_resends_unacked_events_in_order() {
        let mut o = Outbox::new();
        o.in_flight.push_back(("a".into(), "A".into()));
        o.in_flight.push_back(("b".into(), "B".into()));
        o.in_flight.push_back(("c".into(), "C".into()));
        assert_eq!(o.settle("b").as_deref(), Some("B"));
        assert_eq!(o.settle("b"), None, "settles once");
        o.resend.push_back(("z".into(), "Z".into()));
        o.requeue_in_flight();
        let order: Vec<_> = o.resend.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(order, ["a", "c", "z"]);
        assert_eq!(o.pending(), 3);
    }
}
