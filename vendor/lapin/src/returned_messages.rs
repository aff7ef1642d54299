use crate::{
    BasicProperties, Promise, message::BasicReturnMessage, publisher_confirm::Confirmation,
    types::PayloadSize,
};
use std::{
    collections::VecDeque,
    fmt,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};
use tracing::{trace, warn};

#[derive(Clone, Default)]
pub(crate) struct ReturnedMessages(Arc<Mutex<Inner>>);

/// What ties a `basic.return` to the publish it answers.
///
/// A return names no delivery tag, and the broker may confirm other publishes
/// between a return and the confirm of its own publish (a `multiple` ack covers
/// several at once). What a return does carry back unchanged is the exchange,
/// the routing key, the body and the properties: a digest of those (with the
/// message and correlation ids) tells whose return it is. Two publishes that agree
/// on all of it are the same message and may trade returns. The digest is keyed
/// with keys secret to the process, so whoever chooses a message's content cannot
/// make it collide with another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ReturnIdentity(u64);

impl ReturnIdentity {
    pub(crate) fn of(
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: &BasicProperties,
    ) -> Self {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        let mut hasher = KEYS.get_or_init(RandomState::new).build_hasher();
        exchange.hash(&mut hasher);
        routing_key.hash(&mut hasher);
        payload.hash(&mut hasher);
        properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            .hash(&mut hasher);
        properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str())
            .hash(&mut hasher);
        Self(hasher.finish())
    }

    fn of_return(message: &BasicReturnMessage) -> Self {
        let delivery = &message.delivery;
        Self::of(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.data,
            &delivery.properties,
        )
    }
}

impl ReturnedMessages {
    pub(crate) fn start_new_delivery(&self, message: BasicReturnMessage) {
        self.lock_inner().current_message = Some(message);
    }

    pub(crate) fn handle_content_header_frame(
        &self,
        size: PayloadSize,
        properties: BasicProperties,
        confirm_mode: bool,
    ) {
        self.lock_inner()
            .handle_content_header_frame(size, properties, confirm_mode);
    }

    pub(crate) fn handle_body_frame(
        &self,
        remaining_size: PayloadSize,
        payload: Vec<u8>,
        confirm_mode: bool,
    ) {
        self.lock_inner()
            .handle_body_frame(remaining_size, payload, confirm_mode);
    }

    pub(crate) fn drain(&self) -> Vec<BasicReturnMessage> {
        self.lock_inner().drain()
    }

    pub(crate) fn register_dropped_confirm(&self, promise: Promise<Confirmation>) {
        self.lock_inner().register_dropped_confirm(promise);
    }

    /// The return of the publish known by `identity`, if the broker returned it.
    ///
    /// The broker sends a publish's return before its confirm, so by the time the
    /// confirm arrives the return, if any, is waiting here.
    pub(crate) fn take_waiting_message(
        &self,
        identity: ReturnIdentity,
    ) -> Option<BasicReturnMessage> {
        let mut inner = self.lock_inner();
        let position = inner
            .waiting_messages
            .iter()
            .position(|(waiting, _)| *waiting == identity)?;
        inner
            .waiting_messages
            .remove(position)
            .map(|(_, message)| message)
    }

    /// Hand over, as if from a dropped confirm, every waiting return that no
    /// publish still awaiting its confirm can claim, so nothing waits forever.
    pub(crate) fn release_unclaimed(&self, claimable: impl Fn(ReturnIdentity) -> bool) {
        let mut inner = self.lock_inner();
        if inner.waiting_messages.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut inner.waiting_messages);
        for (identity, message) in waiting {
            if claimable(identity) {
                inner.waiting_messages.push_back((identity, message));
            } else {
                warn!(
                    exchange = %message.delivery.exchange,
                    routing_key = %message.delivery.routing_key,
                    "Returned message matches no publish awaiting its confirm"
                );
                inner.messages.push(message);
            }
        }
    }

    pub(crate) fn clear_waiting_messages(&self) {
        self.lock_inner().waiting_messages.clear();
    }

    pub(crate) fn clear_dropped_confirms(&self) {
        self.lock_inner().dropped_confirms.clear();
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for ReturnedMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ReturnedMessages");
        if let Ok(inner) = self.0.try_lock() {
            debug
                .field("waiting_messages", &inner.waiting_messages)
                .field("messages", &inner.messages)
                .field("non_confirm_messages", &inner.non_confirm_messages);
        }
        debug.finish()
    }
}

#[derive(Default)]
struct Inner {
    current_message: Option<BasicReturnMessage>,
    non_confirm_messages: Vec<BasicReturnMessage>,
    waiting_messages: VecDeque<(ReturnIdentity, BasicReturnMessage)>,
    messages: Vec<BasicReturnMessage>,
    dropped_confirms: Vec<Promise<Confirmation>>,
}

impl Inner {
    fn handle_content_header_frame(
        &mut self,
        size: PayloadSize,
        properties: BasicProperties,
        confirm_mode: bool,
    ) {
        if let Some(message) = self.current_message.as_mut() {
            message.properties = properties;
        }
        if size == 0 {
            self.new_delivery_complete(confirm_mode);
        }
    }

    fn handle_body_frame(
        &mut self,
        remaining_size: PayloadSize,
        payload: Vec<u8>,
        confirm_mode: bool,
    ) {
        if let Some(message) = self.current_message.as_mut() {
            message.receive_content(payload);
        }
        if remaining_size == 0 {
            self.new_delivery_complete(confirm_mode);
        }
    }

    fn new_delivery_complete(&mut self, confirm_mode: bool) {
        if let Some(message) = self.current_message.take() {
            // Without the body: a return is routine (an unroutable `mandatory`
            // publish), and its body is the publisher's data.
            trace!(
                exchange = %message.delivery.exchange,
                routing_key = %message.delivery.routing_key,
                reply_code = message.reply_code,
                "Server returned us a message"
            );
            if confirm_mode {
                self.waiting_messages
                    .push_back((ReturnIdentity::of_return(&message), message));
            } else {
                self.non_confirm_messages.push(message);
            }
        }
    }

    fn process_dropped_confirm(
        &mut self,
        promise: Promise<Confirmation>,
        messages: Option<&mut Vec<BasicReturnMessage>>,
    ) {
        let messages = messages.unwrap_or(&mut self.messages);

        if let Some(confirmation) = promise.try_wait() {
            if let Ok(Confirmation::Nack(Some(message))) | Ok(Confirmation::Ack(Some(message))) =
                confirmation
            {
                trace!("PublisherConfirm was carrying a message, storing it");
                messages.push(message);
            } else {
                trace!("PublisherConfirm was ready but didn't carry a message, discarding");
            }
        } else {
            trace!("PublisherConfirm wasn't ready yet, storing it for further use");
            self.dropped_confirms.push(promise);
        }
    }

    fn register_dropped_confirm(&mut self, promise: Promise<Confirmation>) {
        trace!("Registering new dropped PublisherConfirm");
        self.process_dropped_confirm(promise, None)
    }

    fn drain(&mut self) -> Vec<BasicReturnMessage> {
        let mut messages = std::mem::take(&mut self.messages);
        if !self.non_confirm_messages.is_empty() {
            let mut non_confirm_messages = std::mem::take(&mut self.non_confirm_messages);
            non_confirm_messages.append(&mut messages);
            messages = non_confirm_messages;
        }
        let before = self.dropped_confirms.len();
        if before != 0 {
            for promise in std::mem::take(&mut self.dropped_confirms) {
                self.process_dropped_confirm(promise, Some(&mut messages))
            }
            trace!(
                %before,
                after=%self.dropped_confirms.len(),
                "PublisherConfirms processed"
            );
        }
        messages
    }
}
