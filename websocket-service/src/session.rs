//! One device connection: authentication, then one task that owns the socket.
//!
//! The task `select!`s over inbound frames, the outbound queue, publisher confirms,
//! pings, token expiry, close requests from elsewhere (replaced, slow consumer) and
//! shutdown. It is generic over the socket (`Stream` + `Sink` of WebSocket messages),
//! so unit tests drive it through channels.
//!
//! Backpressure: events are published without waiting for their confirm, up to
//! `MAX_IN_FLIGHT` per session; at the limit, and while the device is over its rate
//! (`EVENT_RATE` / `EVENT_BURST`), the task stops reading from the socket, so TCP
//! pushes back on the device instead of the gateway buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::stream::FuturesOrdered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use mosaic_protocol::close::{self, DisconnectReason};
use mosaic_protocol::command::undeliverable;
use mosaic_protocol::exchange::Lifecycle;
use mosaic_protocol::fleet::Capabilities;
use mosaic_protocol::frame::{FrameError, ServerFrame, code};
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;
use uuid::Uuid;

use crate::admission::Slot;
use crate::auth::Identity;
use crate::broker::PublishError;
use crate::gateway::Gateway;
use crate::message::{self, Origin};
use crate::metrics;
use crate::registry::{Control, Outbound, Pending, SessionHandle, SessionInfo, Wake};

mod enrolment;
mod handshake;
mod inbound;

use handshake::authenticate;
use inbound::handle_text;

/// Requests a session remembers at once; more are answered `device_busy`.
const MAX_PENDING_REQUESTS: usize = 64;
/// How long a close frame may take to write.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Confirm = Pin<Box<dyn Future<Output = Done> + Send>>;

pub(super) enum Done {
    /// An event with an id: answer `ack` or `nack`.
    Event(Box<str>, Result<(), PublishError>),
    /// Anything else: nothing to tell the device.
    Quiet,
    /// device-service's answer to a `renew`.
    Renewed(Result<mosaic_protocol::registry::RpcReply, crate::rpc::RpcError>),
}

/// How a session ended: the lifecycle reason and the close frame to send, if any.
pub(super) struct End {
    reason: DisconnectReason,
    close: Option<(u16, &'static str)>,
}

impl End {
    pub(super) fn new(reason: DisconnectReason) -> Self {
        let close = match reason {
            DisconnectReason::ClosedByDevice => None,
            DisconnectReason::TokenExpired => Some((close::UNAUTHORIZED, "token expired")),
            DisconnectReason::Forbidden => Some((close::FORBIDDEN, "token names another device")),
            DisconnectReason::Replaced => Some((close::REPLACED, "replaced")),
            DisconnectReason::PingTimeout => Some((close::INTERNAL_ERROR, "ping timeout")),
            DisconnectReason::Shutdown => Some((close::GOING_AWAY, "shutting down")),
            DisconnectReason::SlowConsumer => Some((close::SLOW_CONSUMER, "slow consumer")),
            DisconnectReason::PolicyViolation => {
                Some((close::POLICY_VIOLATION, "too many bad frames"))
            }
            DisconnectReason::BrokerUnavailable => {
                Some((close::TRY_AGAIN_LATER, "broker unavailable; retry later"))
            }
            DisconnectReason::Kicked => Some((close::KICKED, "kicked")),
            DisconnectReason::GatewayLost | DisconnectReason::Error => {
                Some((close::INTERNAL_ERROR, "internal error"))
            }
            DisconnectReason::Revoked => Some((close::FORBIDDEN, "revoked")),
        };
        End { reason, close }
    }

    pub(super) fn with_close(reason: DisconnectReason, code: u16, text: &'static str) -> Self {
        End {
            reason,
            close: Some((code, text)),
        }
    }
}

/// Whether a socket error means "the device sent a message over the size limit".
pub(super) fn is_too_big(err: &impl std::fmt::Display) -> bool {
    // tungstenite reports `Space limit exceeded: Message too long: N > M`; its error
    // type is private to axum, so the text is what we have.
    let s = err.to_string();
    s.contains("Message too long") || s.contains("Space limit exceeded")
}

/// The refusal of a binary frame: the protocol is JSON text.
pub(super) fn binary_refused() -> FrameError {
    FrameError {
        code: code::BAD_FRAME,
        message: "binary frames are not accepted; send JSON text".into(),
    }
}

/// A token bucket for the per-device rate limit.
#[derive(Debug)]
struct Bucket {
    tokens: f32,
    at: Instant,
}

impl Bucket {
    fn new(burst: u32) -> Self {
        Bucket {
            tokens: burst as f32,
            at: Instant::now(),
        }
    }

    /// Takes one token; when there is none, says when there will be.
    fn take(&mut self, rate: u32, burst: u32) -> Result<(), Instant> {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f32() * rate as f32;
        self.tokens = (self.tokens + refill).min(burst as f32);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate as f32;
            Err(now + Duration::from_secs_f32(wait))
        }
    }
}

/// Runs a device connection to its end. `identity` is set when the upgrade request
/// carried a valid `Authorization` header; otherwise the device authenticates in band.
/// `slot` is the connection's place under the connection caps, held to the end.
pub(crate) async fn serve<S, E>(
    gw: Arc<Gateway>,
    mut socket: S,
    identity: Option<Identity>,
    mut slot: Slot,
) where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
    E: std::fmt::Display,
{
    let (identity, capabilities) = match identity {
        Some(i) => (i, Capabilities::default()),
        None => match Box::pin(authenticate(&gw, &mut socket)).await {
            Some(i) => i,
            None => return,
        },
    };
    slot.authenticated();
    let session = Uuid::now_v7();
    let span = tracing::info_span!("session", device = %identity.device, %session);
    // The session's state is allocated once, at its size, rather than inside every
    // future that awaits it.
    Box::pin(run_session(gw, socket, identity, capabilities, session).instrument(span)).await;
}

pub(super) async fn send<S: Sink<Message> + Unpin>(
    socket: &mut S,
    frame: &ServerFrame,
    kind: &'static str,
    limit: Duration,
) -> bool {
    send_text(socket, frame.to_text().into(), kind, limit).await
}

/// Writes one text frame within `limit`; says whether it was written.
async fn send_text<S: Sink<Message> + Unpin>(
    socket: &mut S,
    text: Utf8Bytes,
    kind: &'static str,
    limit: Duration,
) -> bool {
    metrics::frame_out(kind);
    matches!(
        tokio::time::timeout(limit, socket.send(Message::Text(text))).await,
        Ok(Ok(()))
    )
}

/// Closes gracefully: sends the close frame, then reads and discards what the device
/// still sends until its own close frame, the end of the stream or [`CLOSE_TIMEOUT`].
/// Dropping a socket whose input is unread makes the kernel reset the connection,
/// and a reset can overtake the close frame: the device would never learn the code.
pub(super) async fn close_with<S, E>(socket: &mut S, code: u16, reason: &'static str)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    metrics::close(code);
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        let _ = socket.close().await;
    })
    .await;
}

fn expiry(exp: u64) -> Instant {
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    // Capped, so an absurd `exp` cannot overflow the clock.
    const MAX: u64 = 10 * 365 * 86_400;
    Instant::now() + Duration::from_secs(exp.saturating_sub(now).min(MAX))
}

pub(super) fn expires_at(exp: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(exp.min(i64::MAX as u64) as i64)
        .map(message::rfc3339)
        .unwrap_or_default()
}

pub(super) struct State {
    origin: Origin,
    info: Arc<SessionInfo>,
    control: Arc<Control>,
    pending: Vec<Pending>,
    inflight: Inflight,
    bad_frames: u32,
}

/// Publishes and calls whose outcome the session waits for, answered in order.
/// Allocated only while one is in flight, so an idle session holds none.
#[derive(Default)]
pub(super) struct Inflight(Option<FuturesOrdered<Confirm>>);

impl Inflight {
    pub(super) fn push_back(&mut self, confirm: Confirm) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(confirm);
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next outcome, in order; `None` when nothing is in flight.
    async fn next(&mut self) -> Option<Done> {
        let futures = self.0.as_mut()?;
        let done = futures.next().await;
        if futures.is_empty() {
            self.0 = None;
        }
        done
    }
}

async fn run_session<S, E>(
    gw: Arc<Gateway>,
    mut socket: S,
    identity: Identity,
    capabilities: Capabilities,
    session: Uuid,
) where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin + Send,
    E: std::fmt::Display,
{
    let limits = &gw.limits;
    let device = identity.device;
    let started = Instant::now();
    let origin = Origin {
        device,
        session,
        gateway: gw.id,
    };
    let control = Arc::new(Control::new(limits.outbound_queue));
    let declared = !capabilities.is_empty();
    let info = Arc::new(SessionInfo {
        connected_at: time::OffsetDateTime::now_utc(),
        groups: identity.groups,
        capabilities: std::sync::Mutex::new(capabilities),
    });
    let handle = SessionHandle {
        session,
        control: control.clone(),
        info: info.clone(),
    };
    control.set_issued_at(identity.iat);
    if let Some(old) = gw.registry.insert(device, handle) {
        old.control.close(DisconnectReason::Replaced);
    }
    // A revocation read between the token check and the insert found no session
    // to close: look again now that this one is registered.
    if gw.revocations.is_revoked(device, identity.iat) {
        control.close(DisconnectReason::Revoked);
    }
    metrics::session_opened();
    let mut end = Box::pin(connect(&gw, origin, &info)).await;
    let mut exp = identity.exp;
    let welcome = ServerFrame::Welcome {
        device,
        session,
        expires_at: expires_at(exp),
    };
    let mut st = State {
        origin,
        info,
        control: control.clone(),
        pending: Vec::new(),
        inflight: Inflight::default(),
        bad_frames: 0,
    };
    if end.is_none() && !Box::pin(send(&mut socket, &welcome, "welcome", limits.pong_timeout)).await
    {
        end = Some(End::new(DisconnectReason::Error));
    }
    if end.is_none() && declared {
        let registered = crate::fleet::registered_frame(&st.info);
        if !Box::pin(send(
            &mut socket,
            &registered,
            "registered",
            limits.pong_timeout,
        ))
        .await
        {
            end = Some(End::new(DisconnectReason::Error));
        }
    }
    let leeway = gw.verifier.leeway();
    let mut expires = expiry(exp.saturating_add(leeway));
    let mut next_ping = Instant::now() + limits.ping_interval;
    let mut pong_deadline: Option<Instant> = None;
    // A frame read but held back by the rate limit, and when it may go on.
    let mut held: Option<(Option<Utf8Bytes>, Instant)> = None;
    let mut bucket = Bucket::new(limits.event_burst);
    let far = Instant::now() + Duration::from_secs(86400 * 365);

    while end.is_none() {
        let reading = held.is_none() && st.inflight.len() < limits.max_in_flight;
        // One timer for every deadline: token expiry, the pong, the next ping and a
        // frame held back by the rate limit.
        let wake_at = [
            expires,
            next_ping,
            pong_deadline.unwrap_or(far),
            held.as_ref().map_or(far, |h| h.1),
        ]
        .into_iter()
        .min()
        .unwrap_or(far);
        // A frame to handle after the select: text, or `None` for a binary frame.
        let mut admit: Option<Option<Utf8Bytes>> = None;
        tokio::select! {
            _ = gw.shutdown.cancelled() => end = Some(End::new(DisconnectReason::Shutdown)),
            _ = sleep_until(wake_at) => {
                let now = Instant::now();
                if now >= expires {
                    end = Some(End::new(DisconnectReason::TokenExpired));
                } else if pong_deadline.is_some_and(|d| now >= d) {
                    end = Some(End::new(DisconnectReason::PingTimeout));
                } else if held.as_ref().is_some_and(|h| now >= h.1) {
                    admit = held.take().map(|(frame, _)| frame);
                } else if now >= next_ping {
                    next_ping = now + limits.ping_interval;
                    if pong_deadline.is_none() {
                        pong_deadline = Some(now + limits.pong_timeout);
                    }
                    st.pending.retain(|p| p.deadline > now);
                    if tokio::time::timeout(limits.pong_timeout, socket.send(Message::Ping(Default::default()))).await.is_err() {
                        end = Some(End::new(DisconnectReason::SlowConsumer));
                    }
                }
            }
            Some(done) = st.inflight.next(), if !st.inflight.is_empty() => {
                if let Done::Renewed(reply) = done {
                    let (frame, identity) = enrolment::renewed(&gw, device, reply);
                    if let Some(i) = identity {
                        exp = i.exp;
                        expires = expiry(exp);
                        control.set_issued_at(i.iat);
                    }
                    let kind = if matches!(frame, ServerFrame::Renewed { .. }) { "renewed" } else { "error" };
                    if !send(&mut socket, &frame, kind, limits.pong_timeout).await {
                        end = Some(End::new(DisconnectReason::SlowConsumer));
                    }
                } else if let Done::Event(id, result) = done {
                    let (frame, kind) = match result {
                        Ok(()) => (ServerFrame::Ack { id: id.into() }, "ack"),
                        Err(e) => {
                            let code = match e {
                                PublishError::Unavailable => code::UNAVAILABLE,
                                PublishError::Rejected => code::REJECTED,
                                PublishError::Unroutable => code::UNROUTABLE,
                            };
                            metrics::nack(code);
                            (ServerFrame::Nack { id: id.into(), code: code.into() }, "nack")
                        }
                    };
                    if !send(&mut socket, &frame, kind, limits.pong_timeout).await {
                        end = Some(End::new(DisconnectReason::SlowConsumer));
                    }
                }
            }
            // A close asked from elsewhere (replaced, slow consumer, kicked, revoked)
            // comes before what is still queued.
            wake = control.next() => match wake {
                Wake::Close(reason) => end = Some(End::new(reason)),
                Wake::Out(Outbound::Event(text)) => {
                    if !send_text(&mut socket, text, "event", limits.pong_timeout).await {
                        end = Some(End::new(DisconnectReason::SlowConsumer));
                    }
                }
                Wake::Out(Outbound::Request(req)) => {
                    if st.pending.len() >= MAX_PENDING_REQUESTS {
                        answer_undeliverable(&gw, origin, &req.pending, undeliverable::DEVICE_BUSY);
                        continue;
                    }
                    st.pending.push(req.pending);
                    if !send_text(&mut socket, req.text, "request", limits.pong_timeout).await {
                        end = Some(End::new(DisconnectReason::SlowConsumer));
                    }
                }
            },
            msg = socket.next(), if reading => match msg {
                None | Some(Ok(Message::Close(_))) => end = Some(End::new(DisconnectReason::ClosedByDevice)),
                Some(Err(e)) => {
                    end = Some(if is_too_big(&e) {
                        End::with_close(DisconnectReason::PolicyViolation, close::MESSAGE_TOO_BIG, "frame too large")
                    } else {
                        tracing::debug!(error = %e, "socket error");
                        End::new(DisconnectReason::ClosedByDevice)
                    });
                }
                Some(Ok(Message::Pong(_))) => pong_deadline = None,
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(Message::Text(t))) => admit = Some(Some(t)),
                Some(Ok(_)) => {
                    metrics::frame_in("binary");
                    admit = Some(None);
                }
            },
        }
        if let Some(frame) = admit {
            match bucket.take(limits.event_rate, limits.event_burst) {
                Ok(()) => {
                    let before = exp;
                    end = Box::pin(handle_text(&gw, &mut socket, &mut st, &mut exp, frame)).await;
                    if exp != before {
                        expires = expiry(exp.saturating_add(leeway));
                    }
                }
                Err(at) => {
                    metrics::rate_limited();
                    held = Some((frame, at));
                }
            }
        }
    }
    let end = end.unwrap_or_else(|| End::new(DisconnectReason::Error));
    // A frame the rate limit held back was read from the device: it is handled
    // (an event published, a response answered), never dropped.
    if let Some((Some(text), _)) = held {
        inbound::handle_held(&gw, &mut st, &text);
    }

    Box::pin(finish(gw, socket, st, end, started)).await;
}

/// The broker work of a connect: the device's command route and its groups' routes,
/// the takeover notice and the `connected` message (with the session's groups and
/// declared capabilities). `Some` (close 1013) when the device must not be told
/// `welcome`: commands could not reach it, or Hive would not hear of it.
async fn connect(gw: &Gateway, origin: Origin, info: &SessionInfo) -> Option<End> {
    // Bind before telling anyone; the takeover publish on the same channel is
    // confirmed only once the broker applied the bind (and fails if it failed).
    if !gw.broker.bind(origin.device).await || !gw.broker.sync_groups(&info.groups).await {
        tracing::warn!("device refused: its command route could not be bound");
        return Some(End::new(DisconnectReason::BrokerUnavailable));
    }
    let fields = crate::fleet::connected_fields(info);
    let (takeover, connected) = tokio::join!(
        gw.broker.publish(message::takeover(origin)),
        gw.broker.publish(message::lifecycle_with(
            origin,
            Lifecycle::Connected,
            None,
            fields
        )),
    );
    match (takeover, connected) {
        (Ok(()), Ok(())) => {}
        // Nothing consumes lifecycle messages yet: nobody to tell, the session is sound.
        (Ok(()), Err(PublishError::Unroutable)) => {
            tracing::debug!("no queue takes lifecycle messages");
        }
        (t, c) => {
            tracing::warn!(takeover = ?t.err(), connected = ?c.err(), "device refused: the broker did not confirm its connect");
            return Some(End::new(DisconnectReason::BrokerUnavailable));
        }
    }
    tracing::info!("device connected");
    None
}

/// Ends a session: unregister, close the socket, answer pending requests, publish
/// the `disconnected` message.
async fn finish<S, E>(gw: Arc<Gateway>, mut socket: S, mut st: State, end: End, started: Instant)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    let limits = &gw.limits;
    let origin = st.origin;
    let device = origin.device;
    let session = origin.session;
    // Unregister first, so no new command is queued for this session.
    if gw.registry.remove(device, session) {
        if end.reason == DisconnectReason::Replaced {
            // Replaced by a session on another replica (a local one would hold the entry).
            gw.registry.mark_moved(device);
        }
        // At shutdown the replica's queue goes away with its connection anyway.
        if !gw.shutdown.is_cancelled() {
            gw.broker.unbind(device).await;
        }
    }
    if !gw.shutdown.is_cancelled() {
        gw.broker.release_groups(&st.info.groups).await;
    }
    metrics::session_closed();
    if let Some((code, text)) = end.close {
        close_with(&mut socket, code, text).await;
    }
    drop(socket);
    // Requesters learn at once that their device is gone.
    for out in st.control.close_queue() {
        if let Outbound::Request(req) = out {
            answer_undeliverable(
                &gw,
                origin,
                &req.pending,
                undeliverable::DEVICE_DISCONNECTED,
            );
        }
    }
    for p in st.pending.drain(..) {
        answer_undeliverable(&gw, origin, &p, undeliverable::DEVICE_DISCONNECTED);
    }
    // Events already read are published; their confirms go nowhere now.
    let _ = tokio::time::timeout(limits.publish_timeout, async {
        while st.inflight.next().await.is_some() {}
    })
    .await;
    let duration_ms = started.elapsed().as_millis() as u64;
    let lifecycle = message::lifecycle(
        origin,
        Lifecycle::Disconnected,
        Some((end.reason, duration_ms)),
    );
    if gw.broker.publish(lifecycle).await.is_err() {
        tracing::warn!("disconnect lifecycle message not confirmed");
    }
    tracing::info!(
        reason = end.reason.as_str(),
        duration_ms,
        "device disconnected"
    );
}

fn answer_undeliverable(gw: &Arc<Gateway>, origin: Origin, p: &Pending, reason: &str) {
    if let Some(m) = message::undeliverable(
        origin.device,
        Some(origin.session),
        gw.id,
        &p.reply_to,
        &p.id,
        reason,
    ) {
        gw.tracker.spawn(gw.broker.publish(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::{Value, json};
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;
    use tokio_util::sync::PollSender;

    const SECRET: &str = "unit-test-secret-0123456789-abcdefghij";

    /// A socket made of two channels: what the device sends, and what it receives.
    struct Pipe {
        inbound: mpsc::Receiver<Message>,
        outbound: PollSender<Message>,
    }

    impl Stream for Pipe {
        type Item = Result<Message, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.inbound.poll_recv(cx).map(|m| m.map(Ok))
        }
    }

    impl Sink<Message> for Pipe {
        type Error = ();
        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            self.outbound.poll_reserve(cx).map_err(|_| ())
        }
        fn start_send(mut self: Pin<&mut Self>, m: Message) -> Result<(), ()> {
            self.outbound.send_item(m).map_err(|_| ())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            self.outbound.close();
            Poll::Ready(Ok(()))
        }
    }

    struct TestDevice {
        send: mpsc::Sender<Message>,
        recv: mpsc::Receiver<Message>,
    }

    impl TestDevice {
        async fn send(&self, v: Value) {
            self.send
                .send(Message::Text(v.to_string().into()))
                .await
                .unwrap();
        }
        async fn recv(&mut self) -> Message {
            tokio::time::timeout(Duration::from_secs(5), self.recv.recv())
                .await
                .expect("a frame in time")
                .expect("socket open")
        }
        async fn json(&mut self) -> Value {
            match self.recv().await {
                Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// A gateway with no broker connection: every publish is `unavailable`.
    fn gateway(extra: &[&str]) -> Arc<Gateway> {
        let mut args = vec!["ws", "--jwt-secret", SECRET, "--publish-timeout-ms", "50"];
        args.extend_from_slice(extra);
        let config = crate::Config::try_parse_from(args).unwrap();
        Arc::new(Gateway::new(&config).unwrap())
    }

    /// A place under caps that never refuse.
    fn slot() -> Slot {
        crate::admission::Admission::new(usize::MAX, usize::MAX)
            .admit(false)
            .unwrap()
    }

    fn start(gw: &Arc<Gateway>) -> (TestDevice, tokio::task::JoinHandle<()>) {
        let (dev_tx, inbound) = mpsc::channel(16);
        let (out_tx, dev_rx) = mpsc::channel(16);
        let pipe = Pipe {
            inbound,
            outbound: PollSender::new(out_tx),
        };
        let task = tokio::spawn(serve(gw.clone(), pipe, None, slot()));
        (
            TestDevice {
                send: dev_tx,
                recv: dev_rx,
            },
            task,
        )
    }

    fn token(device: Uuid, ttl: u64) -> String {
        let exp = jsonwebtoken::get_current_timestamp() + ttl;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": device, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn close_code(m: Message) -> u16 {
        match m {
            Message::Close(Some(f)) => f.code,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_a_broker_a_device_is_refused_with_1013_not_welcomed() {
        let gw = gateway(&[]);
        let (mut d, task) = start(&gw);
        assert_eq!(d.json().await["type"], "hello");
        d.send(json!({"type":"nope"})).await;
        assert_eq!(d.json().await["code"], "bad_frame");
        let device = Uuid::new_v4();
        d.send(json!({"type":"auth","token": token(device, 60)}))
            .await;
        // No broker: commands could not reach it, so no `welcome`, a retryable close.
        assert_eq!(close_code(d.recv().await), close::TRY_AGAIN_LATER);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(!gw.registry.contains(device));
    }

    #[tokio::test]
    async fn shutdown_closes_a_device_still_authenticating_with_1001() {
        let gw = gateway(&[]);
        let (mut d, task) = start(&gw);
        assert_eq!(d.json().await["type"], "hello");
        gw.shutdown.cancel();
        assert_eq!(close_code(d.recv().await), close::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_session_future_stays_small() {
        let gw = gateway(&[]);
        let (_, inbound) = mpsc::channel(1);
        let (out_tx, _) = mpsc::channel(1);
        let pipe = Pipe {
            inbound,
            outbound: PollSender::new(out_tx),
        };
        let fut = serve(gw, pipe, None, slot());
        let size = std::mem::size_of_val(&fut);
        eprintln!("session future: {size} bytes");
        // The task holds the handshake; the session loop is boxed at its own size.
        assert!(size < 1024, "{size}");
        fn returned<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = returned(run_session::<Pipe, Infallible>);
        eprintln!("session loop: {size} bytes");
        assert!(size < 4 * 1024, "{size}");
    }

    /// The largest durations the configuration accepts go through a whole session
    /// (hello with the auth timeout, pings, events, shutdown) without overflowing the
    /// clock, as `PONG_TIMEOUT_MS=18446744073709551615` used to.
    #[tokio::test]
    async fn the_longest_auth_timeout_does_not_overflow_the_clock() {
        // The session loop with the longest durations runs against a real broker
        // (tests/tests/websocket/limits.rs); here, the handshake's deadline.
        let max = crate::config::MAX_TIMEOUT_MS.to_string();
        let gw = gateway(&["--auth-timeout-ms", &max]);
        let (mut d, task) = start(&gw);
        assert_eq!(
            d.json().await["auth_timeout_ms"],
            crate::config::MAX_TIMEOUT_MS
        );
        gw.shutdown.cancel();
        assert_eq!(close_code(d.recv().await), close::GOING_AWAY);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .expect("the session task did not panic");
    }

    #[tokio::test]
    async fn no_auth_in_time_closes_with_4408() {
        let gw = gateway(&["--auth-timeout-ms", "50"]);
        let (mut d, _) = start(&gw);
        assert_eq!(d.json().await["auth_timeout_ms"], 50);
        assert_eq!(close_code(d.recv().await), close::AUTH_TIMEOUT);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = Bucket::new(3);
        for _ in 0..3 {
            b.take(10, 3).unwrap();
        }
        let at = b.take(10, 3).unwrap_err();
        let wait = at.duration_since(Instant::now());
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
    }

    #[test]
    fn close_codes_follow_the_contract() {
        assert_eq!(End::new(DisconnectReason::Replaced).close.unwrap().0, 4409);
        assert_eq!(End::new(DisconnectReason::Shutdown).close.unwrap().0, 1001);
        assert_eq!(
            End::new(DisconnectReason::TokenExpired).close.unwrap(),
            (4401, "token expired")
        );
        assert_eq!(End::new(DisconnectReason::Forbidden).close.unwrap().0, 4403);
        assert_eq!(
            End::new(DisconnectReason::SlowConsumer).close.unwrap().0,
            4429
        );
        assert!(End::new(DisconnectReason::ClosedByDevice).close.is_none());
    }
}
