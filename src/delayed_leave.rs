//! Delayed-leave jobs (MSC4140 delegation, issue #8): the state machine that keeps a
//! participant's delayed "leave" event alive on their homeserver while they are connected to
//! the SFU, and sends it when they leave. It follows lk-jwt-service's `DelayedEventJob` with
//! the rules where they differ (a 404 on restart ends the job without sending; an
//! aborted connection sends).
//!
//! Pure and host-agnostic: the host feeds [`Input`]s with the time in milliseconds, makes the
//! callouts the returned [`Action`]s ask for, and calls [`Job::step`] again at
//! [`Job::next_wakeup`]. At most one homeserver callout (restart or send) and one SFU
//! participant lookup are in flight per job.
//!
//! Status: complete and tested here; no adapter runs jobs yet (README "Status").

use crate::webhook::ParticipantSignal;

/// MSC4140's unstable delayed-events endpoint (lk-jwt-service `DelayedEventsEndpoint`).
pub const DELAYED_EVENTS_PATH: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";
/// Longest wait for the first connection and longest send window (the sticky-event timeout).
pub const MAX_WAIT_MS: u64 = 3_600_000;
/// First retry interval after a failed callout; each retry waits 1.5 times longer.
pub const FIRST_RETRY_MS: u64 = 1_000;
/// Longest retry interval.
pub const MAX_RETRY_MS: u64 = 60_000;
/// Shortest interval between two callouts of one job (restarts of a tiny `delay_timeout`, a
/// `Retry-After: 0`), so no client or homeserver can make a job call in a tight loop.
pub const MIN_INTERVAL_MS: u64 = 500;

/// The path of a delayed-event action: `…/delayed_events/{delay_id}/{restart|send}`, with
/// `delay_id` percent-encoded as one path segment.
pub fn action_path(delay_id: &str, action: HomeserverAction) -> String {
    let escaped: String = percent_encoding::utf8_percent_encode(delay_id, SEGMENT).collect();
    let verb = match action {
        HomeserverAction::Restart => "restart",
        HomeserverAction::Send => "send",
    };
    format!("{DELAYED_EVENTS_PATH}/{escaped}/{verb}")
}

/// Characters escaped in a path segment (RFC 3986 `pchar` minus `:` and `@`, which are kept
/// by Go's `url.PathEscape` too).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'@');

/// The two delayed-event actions on the homeserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeserverAction {
    /// Restart the delay (the participant is still there).
    Restart,
    /// Send the leave event now.
    Send,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the participant to connect to the SFU.
    WaitingForInitialConnect,
    /// Connected: the delayed event is restarted before it expires.
    Connected,
    /// Left, aborted, vanished or never connected: sending the leave event.
    Sending,
    /// Over; see [`Outcome`].
    Finished(Outcome),
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The leave event was sent (2xx on send).
    Sent,
    /// The homeserver no longer has the delayed event (404 on send): it was sent already.
    AlreadySent,
    /// The homeserver no longer has the delayed event (404 on restart): nothing to send.
    Gone,
    /// A newer job for the same room and identity took over.
    Replaced,
    /// The homeserver refused the send for good (4xx other than 404 and 429).
    Refused(u16),
    /// Sending kept failing until the send window closed.
    GaveUp,
}

/// What happened, as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Time passed (a wakeup).
    Tick,
    /// A verified LiveKit webhook about this job's participant.
    Participant(ParticipantSignal),
    /// The SFU participant lookup answered: `Some(true)` present, `Some(false)` absent
    /// (Twirp not_found), `None` failed (transport, 5xx).
    Lookup(Option<bool>),
    /// The pending homeserver callout answered: status (`None`: no answer) and a retry delay
    /// from `Retry-After` / `retry_after_ms`, in milliseconds.
    Homeserver {
        /// HTTP status, `None` when the callout failed without one.
        status: Option<u16>,
        /// The server's retry delay (429), milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// A newer job for the same (room, identity) replaced this one.
    Replaced,
}

/// A callout the host must make now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// POST the action to the homeserver ([`action_path`]), then feed [`Input::Homeserver`].
    Homeserver(HomeserverAction),
    /// Ask the SFU whether the participant is in the room (Twirp `GetParticipant`), then feed
    /// [`Input::Lookup`].
    LookupParticipant,
}

/// One delayed-leave job for a (LiveKit room, identity).
#[derive(Debug, Clone)]
pub struct Job {
    delay_timeout_ms: u64,
    sanity_interval_ms: u64,
    state: State,
    /// Waiting: until when; Connected/Sending: when the delayed event expires on the server.
    deadline: u64,
    /// When to restart next (Connected), retry a failed callout, or look up the participant.
    next_homeserver: Option<u64>,
    next_lookup: Option<u64>,
    homeserver_in_flight: Option<HomeserverAction>,
    lookup_in_flight: bool,
    homeserver_retry_ms: u64,
    lookup_retry_ms: u64,
}

impl Job {
    /// A job created at `now` (ms) for a delayed event of `delay_timeout_ms`;
    /// `sanity_interval_ms` is the period of the participant lookup while connected (0: off).
    /// The first participant lookup is due after [`FIRST_RETRY_MS`].
    pub fn new(now: u64, delay_timeout_ms: u64, sanity_interval_ms: u64) -> Self {
        Self {
            delay_timeout_ms,
            sanity_interval_ms,
            state: State::WaitingForInitialConnect,
            deadline: now.saturating_add(delay_timeout_ms.min(MAX_WAIT_MS)),
            next_homeserver: None,
            next_lookup: Some(now.saturating_add(FIRST_RETRY_MS)),
            homeserver_in_flight: None,
            lookup_in_flight: false,
            homeserver_retry_ms: FIRST_RETRY_MS,
            lookup_retry_ms: FIRST_RETRY_MS,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The earliest time (ms) the job wants a [`Input::Tick`], `None` when finished.
    pub fn next_wakeup(&self) -> Option<u64> {
        if matches!(self.state, State::Finished(_)) {
            return None;
        }
        let lookup = self.next_lookup.filter(|_| !self.lookup_in_flight);
        let homeserver = self
            .next_homeserver
            .filter(|_| self.homeserver_in_flight.is_none());
        let deadline = match self.state {
            State::WaitingForInitialConnect => Some(self.deadline),
            _ => None,
        };
        [lookup, homeserver, deadline].into_iter().flatten().min()
    }

    /// Feeds one input at `now` (ms) and returns the callouts to make now.
    pub fn step(&mut self, input: Input, now: u64) -> Vec<Action> {
        if matches!(self.state, State::Finished(_)) {
            return Vec::new();
        }
        match input {
            Input::Tick => {}
            Input::Replaced => self.finish(Outcome::Replaced),
            Input::Participant(signal) => self.on_participant(signal, now),
            Input::Lookup(found) => self.on_lookup(found, now),
            Input::Homeserver {
                status,
                retry_after_ms,
            } => self.on_homeserver(status, retry_after_ms, now),
        }
        self.due_actions(now)
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Finished(outcome);
        self.next_homeserver = None;
        self.next_lookup = None;
    }

    fn connect(&mut self, now: u64) {
        self.state = State::Connected;
        // The event may have been scheduled long before the delegation: restart at once.
        self.deadline = now.saturating_add(self.delay_timeout_ms);
        self.next_homeserver = Some(now);
        self.homeserver_retry_ms = FIRST_RETRY_MS;
        self.next_lookup =
            (self.sanity_interval_ms > 0).then(|| now.saturating_add(self.sanity_interval_ms));
    }

    fn start_sending(&mut self, now: u64) {
        self.state = State::Sending;
        // Keep trying until the delayed event would have fired anyway, at least 1 s, at most
        // the sticky-event timeout.
        let window = self
            .deadline
            .saturating_sub(now)
            .clamp(FIRST_RETRY_MS, MAX_WAIT_MS);
        self.deadline = now.saturating_add(window);
        self.next_homeserver = Some(now);
        self.homeserver_retry_ms = FIRST_RETRY_MS;
        self.next_lookup = None;
    }

    fn on_participant(&mut self, signal: ParticipantSignal, now: u64) {
        match (self.state, signal) {
            (State::WaitingForInitialConnect, ParticipantSignal::Joined) => self.connect(now),
            (
                State::WaitingForInitialConnect | State::Connected,
                ParticipantSignal::Left | ParticipantSignal::ConnectionAborted,
            ) => self.start_sending(now),
            _ => {}
        }
    }

    fn on_lookup(&mut self, found: Option<bool>, now: u64) {
        self.lookup_in_flight = false;
        match (self.state, found) {
            (State::WaitingForInitialConnect, Some(true)) => self.connect(now),
            (State::WaitingForInitialConnect, _) => {
                self.lookup_retry_ms = next_retry(self.lookup_retry_ms);
                self.next_lookup = Some(now.saturating_add(self.lookup_retry_ms));
            }
            // The sanity check: gone without a webhook.
            (State::Connected, Some(false)) => self.start_sending(now),
            (State::Connected, _) => {
                self.next_lookup = Some(now.saturating_add(self.sanity_interval_ms));
            }
            _ => {}
        }
    }

    fn on_homeserver(&mut self, status: Option<u16>, retry_after_ms: Option<u64>, now: u64) {
        let Some(action) = self.homeserver_in_flight.take() else {
            return;
        };
        let retry_at = |job: &mut Self| {
            let wait = match (status, retry_after_ms) {
                (Some(429), Some(ms)) => ms.clamp(MIN_INTERVAL_MS, MAX_RETRY_MS),
                _ => {
                    let wait = job.homeserver_retry_ms;
                    job.homeserver_retry_ms = next_retry(wait);
                    wait
                }
            };
            now.saturating_add(wait)
        };
        match (self.state, action, status) {
            (State::Connected, HomeserverAction::Restart, Some(200..=299)) => {
                self.deadline = now.saturating_add(self.delay_timeout_ms);
                self.homeserver_retry_ms = FIRST_RETRY_MS;
                // Restart at 80 % of the timeout, never more often than MIN_INTERVAL_MS.
                let interval = (self.delay_timeout_ms.saturating_mul(4) / 5).max(MIN_INTERVAL_MS);
                self.next_homeserver = Some(now.saturating_add(interval));
            }
            (State::Connected, HomeserverAction::Restart, Some(404)) => self.finish(Outcome::Gone),
            (State::Connected, HomeserverAction::Restart, _) => {
                let at = retry_at(self);
                if at >= self.deadline {
                    // The event expires before another try could land: it fires by itself.
                    self.start_sending(now);
                } else {
                    self.next_homeserver = Some(at);
                }
            }
            (State::Sending, HomeserverAction::Send, Some(200..=299)) => {
                self.finish(Outcome::Sent);
            }
            (State::Sending, HomeserverAction::Send, Some(404)) => {
                self.finish(Outcome::AlreadySent);
            }
            (State::Sending, HomeserverAction::Send, Some(s @ 400..=499)) if s != 429 => {
                self.finish(Outcome::Refused(s));
            }
            (State::Sending, HomeserverAction::Send, _) => {
                let at = retry_at(self);
                if at > self.deadline {
                    self.finish(Outcome::GaveUp);
                } else {
                    self.next_homeserver = Some(at);
                }
            }
            // An answer for a callout of a state the job has left (a restart answering after
            // the participant left): the new state's own callout follows.
            _ => {}
        }
    }

    fn due_actions(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state == State::WaitingForInitialConnect && now >= self.deadline {
            // Never connected within the wait: send.
            self.start_sending(now);
        }
        if self.homeserver_in_flight.is_none() && self.next_homeserver.is_some_and(|at| now >= at) {
            let action = match self.state {
                State::Connected => Some(HomeserverAction::Restart),
                State::Sending => Some(HomeserverAction::Send),
                _ => None,
            };
            if let Some(action) = action {
                self.next_homeserver = None;
                self.homeserver_in_flight = Some(action);
                actions.push(Action::Homeserver(action));
            }
        }
        if !self.lookup_in_flight
            && self.next_lookup.is_some_and(|at| now >= at)
            && matches!(
                self.state,
                State::WaitingForInitialConnect | State::Connected
            )
        {
            self.next_lookup = None;
            self.lookup_in_flight = true;
            actions.push(Action::LookupParticipant);
        }
        actions
    }
}

#[cfg(test)]
mod limits {
    use super::*;

    fn ok() -> Input {
        Input::Homeserver {
            status: Some(200),
            retry_after_ms: None,
        }
    }

    #[test]
    fn tiny_and_huge_timeouts_are_bounded() {
        // 1 ms: restarts every MIN_INTERVAL_MS, not in a loop.
        let mut job = Job::new(0, 1, 0);
        job.step(Input::Participant(ParticipantSignal::Joined), 0);
        assert_eq!(job.step(ok(), 1), vec![]);
        assert_eq!(job.next_wakeup(), Some(1 + MIN_INTERVAL_MS));
        // i64::MAX ms: no overflow (would panic in debug builds).
        let huge = u64::try_from(i64::MAX).unwrap();
        let mut job = Job::new(u64::MAX - 5, huge, 0);
        job.step(Input::Participant(ParticipantSignal::Joined), u64::MAX - 5);
        assert_eq!(job.step(ok(), u64::MAX - 4), vec![]);
        assert_eq!(job.next_wakeup(), Some(u64::MAX));
    }

    #[test]
    fn retry_after_zero_is_not_a_loop() {
        let mut job = Job::new(0, 10_000, 0);
        job.step(Input::Participant(ParticipantSignal::Left), 0);
        let zero = Input::Homeserver {
            status: Some(429),
            retry_after_ms: Some(0),
        };
        assert_eq!(job.step(zero, 10), vec![]);
        assert_eq!(job.next_wakeup(), Some(10 + MIN_INTERVAL_MS));
    }
}

fn next_retry(ms: u64) -> u64 {
    (ms.saturating_mul(3) / 2).min(MAX_RETRY_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 10_000; // delay_timeout_ms in these tests
    const OK: Input = Input::Homeserver {
        status: Some(200),
        retry_after_ms: None,
    };

    fn answer(status: Option<u16>) -> Input {
        Input::Homeserver {
            status,
            retry_after_ms: None,
        }
    }

    fn restart() -> Vec<Action> {
        vec![Action::Homeserver(HomeserverAction::Restart)]
    }

    fn send() -> Vec<Action> {
        vec![Action::Homeserver(HomeserverAction::Send)]
    }

    #[test]
    fn path_escapes_the_delay_id_as_one_segment() {
        assert_eq!(
            action_path("syd_abc/../x y?#", HomeserverAction::Restart),
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd_abc%2F..%2Fx%20y%3F%23/restart"
        );
        assert!(action_path("d:1@h", HomeserverAction::Send).ends_with("/d:1@h/send"));
    }

    #[test]
    fn never_connected_sends_after_the_wait() {
        let mut job = Job::new(0, T, 0);
        assert_eq!(job.next_wakeup(), Some(FIRST_RETRY_MS));
        assert_eq!(
            job.step(Input::Tick, 1_000),
            vec![Action::LookupParticipant]
        );
        assert_eq!(job.step(Input::Lookup(Some(false)), 1_100), vec![]);
        assert_eq!(job.next_wakeup(), Some(1_100 + 1_500), "backoff ×1.5");
        assert_eq!(job.step(Input::Tick, T), send());
        assert_eq!(job.state(), State::Sending);
        job.step(OK, T + 5);
        assert_eq!(job.state(), State::Finished(Outcome::Sent));
        assert_eq!(job.next_wakeup(), None);
    }

    #[test]
    fn connected_restarts_at_eighty_percent_then_sends_on_leave() {
        let mut job = Job::new(0, T, 0);
        assert_eq!(
            job.step(Input::Participant(ParticipantSignal::Joined), 500),
            restart()
        );
        assert_eq!(job.step(OK, 600), vec![]);
        assert_eq!(job.next_wakeup(), Some(600 + 8_000));
        for round in 1..=3u64 {
            let at = 600 + round * 8_000 + (round - 1) * 10;
            assert_eq!(job.step(Input::Tick, at), restart(), "restart {round}");
            assert_eq!(job.step(OK, at + 10), vec![]);
        }
        assert_eq!(
            job.step(Input::Participant(ParticipantSignal::Left), 30_000),
            send()
        );
        job.step(answer(Some(200)), 30_010);
        assert_eq!(job.state(), State::Finished(Outcome::Sent));
    }

    #[test]
    fn aborted_connection_sends_in_either_state() {
        for joined in [false, true] {
            let mut job = Job::new(0, T, 0);
            if joined {
                job.step(Input::Participant(ParticipantSignal::Joined), 100);
                job.step(OK, 110);
            }
            let actions = job.step(
                Input::Participant(ParticipantSignal::ConnectionAborted),
                200,
            );
            assert_eq!(actions, send(), "joined: {joined}");
        }
    }

    #[test]
    fn lookup_connects_and_the_sanity_check_catches_a_silent_departure() {
        let mut job = Job::new(0, T, 5_000);
        job.step(Input::Tick, 1_000);
        assert_eq!(job.step(Input::Lookup(Some(true)), 1_050), restart());
        job.step(OK, 1_060);
        assert_eq!(
            job.next_wakeup(),
            Some(6_050),
            "sanity check due before the restart"
        );
        assert_eq!(
            job.step(Input::Tick, 6_050),
            vec![Action::LookupParticipant]
        );
        assert_eq!(
            job.step(Input::Lookup(None), 6_060),
            vec![],
            "a failed lookup is not an absence"
        );
        // The restart due at 9_060 and the next sanity check are both due at 11_060.
        assert_eq!(
            job.step(Input::Tick, 11_060),
            vec![
                Action::Homeserver(HomeserverAction::Restart),
                Action::LookupParticipant
            ]
        );
        assert_eq!(
            job.step(Input::Lookup(Some(false)), 11_070),
            vec![],
            "the send waits for the restart in flight"
        );
        assert_eq!(job.step(OK, 11_080), send());
    }

    #[test]
    fn not_found_on_restart_ends_without_send_and_on_send_is_success() {
        let mut job = Job::new(0, T, 0);
        job.step(Input::Participant(ParticipantSignal::Joined), 0);
        assert_eq!(job.step(answer(Some(404)), 10), vec![]);
        assert_eq!(job.state(), State::Finished(Outcome::Gone));
        let mut job = Job::new(0, T, 0);
        job.step(Input::Participant(ParticipantSignal::Left), 0);
        job.step(answer(Some(404)), 10);
        assert_eq!(job.state(), State::Finished(Outcome::AlreadySent));
    }

    #[test]
    fn retry_after_is_honoured_and_server_errors_back_off() {
        let mut job = Job::new(0, T, 0);
        job.step(Input::Participant(ParticipantSignal::Left), 0);
        let limited = Input::Homeserver {
            status: Some(429),
            retry_after_ms: Some(2_500),
        };
        assert_eq!(job.step(limited, 10), vec![]);
        assert_eq!(job.next_wakeup(), Some(2_510));
        assert_eq!(job.step(Input::Tick, 2_510), send());
        job.step(answer(Some(502)), 2_520);
        assert_eq!(job.next_wakeup(), Some(3_520));
        job.step(Input::Tick, 3_520);
        job.step(answer(None), 3_530);
        assert_eq!(job.next_wakeup(), Some(3_530 + 1_500));
        job.step(Input::Tick, 5_030);
        job.step(answer(Some(403)), 5_040);
        assert_eq!(job.state(), State::Finished(Outcome::Refused(403)));
    }

    #[test]
    fn failing_restarts_hand_over_to_send_before_the_event_expires() {
        let mut job = Job::new(0, T, 0);
        let mut actions = job.step(Input::Participant(ParticipantSignal::Joined), 0);
        let mut now = 0;
        // Every restart fails with 503; retries back off until the next one would land after
        // the delayed event expires.
        for _ in 0..100 {
            if job.state() != State::Connected {
                break;
            }
            if actions.is_empty() {
                now = job.next_wakeup().expect("a retry is scheduled");
                actions = job.step(Input::Tick, now);
            } else {
                assert_eq!(actions, restart());
                now += 5;
                actions = job.step(answer(Some(503)), now);
            }
        }
        assert_eq!(job.state(), State::Sending);
        assert_eq!(actions, send());
        assert!(
            now < T,
            "sent at {now}, before the delayed event fires at {T}"
        );
    }

    #[test]
    fn sending_gives_up_when_the_window_closes() {
        let mut job = Job::new(0, 3_000, 0);
        job.step(Input::Participant(ParticipantSignal::Left), 0);
        let mut now = 0;
        for _ in 0..100 {
            if job.state() != State::Sending {
                break;
            }
            now += 5;
            job.step(answer(Some(500)), now);
            if let Some(at) = job.next_wakeup() {
                now = at;
                job.step(Input::Tick, now);
            }
        }
        assert_eq!(job.state(), State::Finished(Outcome::GaveUp));
        assert!(now <= 3_000 + 5, "{now}");
    }

    #[test]
    fn replaced_jobs_stop_and_ignore_late_answers() {
        let mut job = Job::new(0, T, 0);
        job.step(Input::Participant(ParticipantSignal::Joined), 0);
        job.step(Input::Replaced, 5);
        assert_eq!(job.state(), State::Finished(Outcome::Replaced));
        assert_eq!(job.step(OK, 10), vec![]);
        assert_eq!(job.step(Input::Tick, 100_000), vec![]);
        assert_eq!(job.next_wakeup(), None);
    }

    #[test]
    fn a_late_restart_answer_after_leaving_does_not_cancel_the_send() {
        let mut job = Job::new(0, T, 0);
        job.step(Input::Participant(ParticipantSignal::Joined), 0); // restart in flight
        let actions = job.step(Input::Participant(ParticipantSignal::Left), 5);
        assert_eq!(
            actions,
            vec![],
            "the send waits for the pending restart's answer"
        );
        assert_eq!(job.step(OK, 10), send());
        job.step(OK, 20);
        assert_eq!(job.state(), State::Finished(Outcome::Sent));
    }
}
