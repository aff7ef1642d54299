//! Which publish a `basic.return` belongs to.
//!
//! AMQP's `basic.return` carries no delivery tag. RabbitMQ sends a message's return
//! before its `basic.ack`, and no more: between the two, other acks and other returns
//! may come, and one `basic.ack` with `multiple` may confirm several publishes at
//! once. The client library hands each return it has received to whichever confirm
//! it completes next, in whatever order it completes them; with routable and
//! unroutable `mandatory` publishes in flight on one channel, a return often lands
//! on another publish's confirm: an online device would look offline, and an event no
//! queue took would be acked.
//!
//! So a return is matched by what it carries: exchange, routing key and a digest of
//! the body, `message_id` and `correlation_id` (the services give every message one
//! of these, so a return never matches another message; two messages alike in all
//! of them would route alike, so which of them got the return would not matter).
//! Every confirm of a channel is completed through its [`Book`]: each return that
//! surfaces on any of them goes to a pool, and a publish takes the return that
//! matches it from there.
//!
//! When can a publish conclude that no return of its own is coming? Its return was
//! received before its ack, so by the time the library has processed that ack
//! (completing every confirm the ack covers), the return sits on a completed
//! confirm: every completion takes the oldest waiting return, and every publish
//! returned up to this one has been confirmed by then. Two cases remain:
//!
//! - the publish's own confirm carried no return: the return, if any, was taken by
//!   a confirm completed earlier; polling every confirm of the channel finds it;
//! - its confirm carried another publish's return: its own may still be waiting
//!   for a confirm the same ack completes a moment later. A round trip on the
//!   channel (`basic.qos`, which changes nothing on a channel without consumers)
//!   is a barrier: its answer is processed after that ack, and then polling finds
//!   the return if there is one.
//!
//! One gap remains: a confirm exists from the moment its publish is handed to the
//! library, a little before that publish's task can enter it in the book (the task
//! resumes once the frames are written). Should the broker's ack complete it in
//! between, carrying another publish's return, that publish does not see its
//! return. Waiting for every such publish to enter closes the gap but costs the
//! gateway's event path half its throughput (the wait lasts as long as the
//! channel's send backlog), so the book does not wait; the gap is a task wake-up
//! long and needs a return in flight at that moment.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::message::BasicReturnMessage;
use lapin::types::ShortString;
use lapin::{Confirmation, PublisherConfirm};

/// How long a return nobody claimed is kept: longer than any publish timeout.
const KEEP_RETURN: Duration = Duration::from_secs(120);
/// The most unclaimed returns kept per channel.
const MAX_POOL: usize = 4096;
/// The most confirms of given-up publishes kept per channel (each may still carry
/// another publish's return).
const MAX_ORPHANS: usize = 4096;

/// What a message is recognised by when it comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    exchange: ShortString,
    routing_key: ShortString,
    digest: u64,
}

impl Identity {
    pub(crate) fn new(
        exchange: &ShortString,
        routing_key: &ShortString,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Self {
        Self {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            digest: digest(properties, body),
        }
    }

    fn of(r: &BasicReturnMessage) -> Self {
        let d = &r.delivery;
        Self::new(&d.exchange, &d.routing_key, &d.properties, &d.data)
    }
}

fn digest(properties: &BasicProperties, body: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
        .hash(&mut h);
    properties
        .correlation_id()
        .as_ref()
        .map(ShortString::as_str)
        .hash(&mut h);
    h.finish()
}

/// How a publish ended: the broker's ack or nack, and for a `mandatory` publish
/// whether it came back; or the channel's error when no confirm can come.
#[derive(Debug)]
pub(crate) enum Outcome {
    Confirmed { acked: bool, returned: bool },
    Failed(lapin::Error),
}

struct Entry {
    confirm: PublisherConfirm,
    /// Whether its publish still waits for it; an orphan (its publish gave up) is
    /// kept because its confirm may still carry another publish's return.
    owned: bool,
    /// The owner's waker, once it polled.
    waker: Option<Waker>,
    /// `Some` once completed: acked or not, or the channel's error.
    done: Option<Result<bool, lapin::Error>>,
    /// Whether the own confirm carried a return that was not this publish's.
    carried_other: bool,
    identity: Option<Identity>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    entries: HashMap<u64, Entry>,
    /// Returns that surfaced and that no publish has claimed yet.
    pool: Vec<(Identity, Instant)>,
}

impl Entry {
    /// Records a completed confirm; its return, if any, goes to `pool`.
    fn complete(
        &mut self,
        r: Result<Confirmation, lapin::Error>,
        pool: &mut Vec<(Identity, Instant)>,
    ) {
        let (done, ret) = split(r);
        self.done = Some(done);
        if let Some(ret) = ret {
            let ident = Identity::of(&ret);
            self.carried_other = self.identity.as_ref() != Some(&ident);
            pool.push((ident, Instant::now()));
        }
    }
}

impl Inner {
    /// Polls every entry not yet completed (with its own owner's waker, so no
    /// owner loses its wake-up) and moves the returns that surfaced to the pool.
    fn sweep(&mut self) {
        let mut finished = Vec::new();
        for (&id, e) in &mut self.entries {
            if e.done.is_some() {
                continue;
            }
            let waker = e.waker.clone().unwrap_or_else(|| Waker::noop().clone());
            let mut cx = Context::from_waker(&waker);
            if let Poll::Ready(r) = Pin::new(&mut e.confirm).poll(&mut cx) {
                e.complete(r, &mut self.pool);
                if !e.owned {
                    finished.push(id);
                }
            }
        }
        for id in finished {
            self.entries.remove(&id);
        }
        let now = Instant::now();
        if self.pool.len() > MAX_POOL
            || self
                .pool
                .first()
                .is_some_and(|(_, at)| now.duration_since(*at) > KEEP_RETURN)
        {
            self.pool
                .retain(|(_, at)| now.duration_since(*at) <= KEEP_RETURN);
            let excess = self.pool.len().saturating_sub(MAX_POOL);
            self.pool.drain(..excess);
        }
    }

    /// Takes this publish's return from the pool.
    fn claim(&mut self, identity: &Identity) -> bool {
        match self.pool.iter().position(|(i, _)| i == identity) {
            Some(at) => {
                self.pool.remove(at);
                true
            }
            None => false,
        }
    }
}

/// A confirmation as (acked, the return it carried), or the channel's error.
fn split(
    r: Result<Confirmation, lapin::Error>,
) -> (Result<bool, lapin::Error>, Option<BasicReturnMessage>) {
    match r {
        Ok(c) => {
            let acked = c.is_ack();
            (Ok(acked), c.take_message())
        }
        Err(e) => (Err(e), None),
    }
}

/// The confirms of one publish channel and the returns that surfaced on them.
#[derive(Default, Clone)]
pub(crate) struct Book(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Book")
    }
}

impl Book {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the confirm of a publish; `identity` is `Some` for a `mandatory`
    /// publish. `barrier` makes one round trip on the channel (see the module docs).
    pub(crate) async fn settle<B, F>(
        &self,
        confirm: PublisherConfirm,
        identity: Option<Identity>,
        barrier: B,
    ) -> Outcome
    where
        B: FnOnce() -> F,
        F: Future<Output = ()>,
    {
        let id = {
            let mut inner = self.lock();
            let id = inner.next;
            inner.next += 1;
            inner.entries.insert(
                id,
                Entry {
                    confirm,
                    owned: true,
                    waker: None,
                    done: None,
                    carried_other: false,
                    identity: identity.clone(),
                },
            );
            id
        };
        let guard = Owner { book: self, id };
        let (done, carried_other) = std::future::poll_fn(|cx| {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let e = inner.entries.get_mut(&id).expect("an owned entry stays");
            if e.done.is_none() {
                match Pin::new(&mut e.confirm).poll(cx) {
                    Poll::Pending => {
                        e.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => e.complete(r, &mut inner.pool),
                }
            }
            inner.sweep();
            let e = inner.entries.get_mut(&id).expect("an owned entry stays");
            let done = e.done.clone().expect("completed above or by the sweep");
            Poll::Ready((done, e.carried_other))
        })
        .await;
        let acked = match done {
            Ok(acked) => acked,
            Err(e) => return Outcome::Failed(e),
        };
        let Some(identity) = identity else {
            drop(guard);
            return Outcome::Confirmed {
                acked,
                returned: false,
            };
        };
        if self.lock().claim(&identity) {
            drop(guard);
            return Outcome::Confirmed {
                acked,
                returned: true,
            };
        }
        if carried_other {
            barrier().await;
        }
        let returned = {
            let mut inner = self.lock();
            inner.sweep();
            inner.claim(&identity)
        };
        drop(guard);
        Outcome::Confirmed { acked, returned }
    }
}

/// Removes the owner's entry when its publish is settled or given up; a given-up
/// publish whose confirm has not come leaves an orphan behind.
struct Owner<'a> {
    book: &'a Book,
    id: u64,
}

impl Drop for Owner<'_> {
    fn drop(&mut self) {
        let mut inner = self.book.lock();
        let Some(e) = inner.entries.get_mut(&self.id) else {
            return;
        };
        if e.done.is_some() {
            inner.entries.remove(&self.id);
            return;
        }
        e.owned = false;
        e.waker = None;
        let orphans = inner.entries.values().filter(|e| !e.owned).count();
        if orphans > MAX_ORPHANS {
            // A broker that confirms nothing: the link is replaced soon; keep the book small.
            inner.entries.retain(|_, e| e.owned);
        }
    }
}
