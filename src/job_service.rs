//! The delayed-leave job service (MSC4140 delegation, issue #8): every [`Job`] of one proxy,
//! keyed by (LiveKit room alias, LiveKit identity), and the callouts they ask for. It follows
//! lk-jwt-service's `Handler.loop` (one owner of the jobs map; a new job for the same key
//! replaces the old one; webhook events are routed by key).
//!
//! Host-agnostic and single-threaded: the host delivers [`Message`]s (job handovers from
//! token and `/delegate_delayed_leave` requests, verified webhook events), calls
//! [`JobService::tick`] at [`JobService::next_wakeup`], makes each returned [`JobCallout`] and
//! feeds its answer to [`JobService::answer`]. Times are milliseconds since the Unix epoch.
//!
//! Jobs live in memory only. When the proxy restarts they are lost; the homeserver then sends
//! each delayed leave event by itself when its `delay_timeout` runs out (MSC4140's own
//! safety net), so a participant who is still connected may be shown as left until their
//! client re-delegates. lk-jwt-service can persist jobs in Redis; this product does not.

use serde::{Deserialize, Serialize};

use crate::config::{TokenService, Upstream};
use crate::delayed_leave::{action_path, Action, HomeserverAction, Input, Job, Outcome, State};
use crate::exchange::{Callout, CalloutTarget};
use crate::livekit::{self, Claims};
use crate::webhook::ParticipantSignal;

/// Most jobs one proxy keeps. A handover beyond it is dropped with an error log; its delayed
/// event then fires by itself at its timeout.
pub const MAX_JOBS: usize = 10_000;

/// Most jobs of one Matrix user; a new one beyond it ends that user's oldest job, so no single
/// account can fill [`MAX_JOBS`] for everyone.
pub const MAX_JOBS_PER_USER: usize = 20;

/// A webhook event made this long before its job started is about an earlier session (or a
/// replay) and is ignored, milliseconds. Allows for clock skew between LiveKit and the proxy.
pub const STALE_EVENT_MS: u64 = 5_000;

/// Most jobs of the users of one homeserver (server name of the user ID): one server
/// (e.g. with open registration, under `fullAccessHomeservers: ["*"]`) cannot fill
/// [`MAX_JOBS`]; a new job beyond it ends that server's oldest, never-connected ones first.
pub const MAX_JOBS_PER_SERVER: usize = MAX_JOBS / 4;

/// The server name of a Matrix user ID (after the first `:`).
fn server_of(user_id: &str) -> &str {
    user_id
        .split_once(':')
        .map_or(user_id, |(_, server)| server)
}

/// Largest answer body the service reads from a job callout, in bytes (`retry_after_ms`,
/// Twirp error codes).
pub const MAX_ANSWER_BYTES: usize = 4 * 1024;

/// A job handed over by a token or `/delegate_delayed_leave` request after the OpenID check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The LiveKit room alias.
    pub room: String,
    /// The participant's LiveKit identity.
    pub identity: String,
    /// The verified Matrix user ID (for logs).
    pub user_id: String,
    /// MSC4140 `delay_id`. A capability for the delayed event: never logged.
    pub delay_id: String,
    /// MSC4140 `delay_timeout`, milliseconds.
    pub delay_timeout_ms: u64,
    /// The user's Client-Server API (`csApiUrls` or `.well-known/matrix/client`).
    pub cs_api: Upstream,
}

/// What the job service receives from request handlers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Start (or replace) the job for `(room, identity)`.
    Handover(Handover),
    /// A verified LiveKit webhook about a participant.
    Participant {
        /// `room.name`.
        room: String,
        /// `participant.identity`.
        identity: String,
        /// What happened.
        signal: ParticipantSignal,
        /// When LiveKit made the event (`createdAt`), Unix seconds.
        #[serde(default)]
        created_at: Option<u64>,
    },
}

impl Message {
    /// The message as bytes (JSON), e.g. for an Envoy shared queue.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A message from [`Message::encode`]'s bytes; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Which answer a job callout waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// A delayed-event restart or send on the homeserver.
    Homeserver(HomeserverAction),
    /// A LiveKit GetParticipant lookup.
    Lookup,
}

/// The answer to a [`JobCallout`], as the host saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer<'a> {
    /// HTTP status, `None` when there was no answer (connect failure, timeout, reset, not
    /// dispatched).
    pub status: Option<u16>,
    /// The `Retry-After` header.
    pub retry_after: Option<&'a str>,
    /// The body (at most [`MAX_ANSWER_BYTES`] are read).
    pub body: &'a [u8],
}

/// A callout a job needs now: make `callout`, then call [`JobService::answer`] with `job` and
/// `pending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCallout {
    /// The job's id (a replaced job's late answers are ignored by id).
    pub job: u64,
    /// What the answer is for.
    pub pending: Pending,
    /// The request.
    pub callout: Callout,
}

struct Entry {
    id: u64,
    job: Job,
    handover: Handover,
    /// When the job started, ms.
    started: u64,
}

/// All delayed-leave jobs of one proxy. A plain list: at most [`MAX_JOBS`] entries, searched
/// linearly (a map's code would double the filter's size for no measurable gain).
#[derive(Default)]
pub struct JobService {
    jobs: Vec<Entry>,
    next_id: u64,
    finished: Vec<Outcome>,
}

impl JobService {
    /// An empty service.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many jobs are running.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// `true` when no job runs.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// `true` when a handover for a new (room, identity) would be dropped: [`MAX_JOBS`] are
    /// running and every one of them has a connected participant (a job still waiting for its
    /// first connection would make room).
    pub fn is_full(&self) -> bool {
        self.jobs.len() >= MAX_JOBS && self.oldest_waiting().is_none()
    }

    /// The index of the oldest job still waiting for its participant's first connection.
    fn oldest_waiting(&self) -> Option<usize> {
        self.jobs
            .iter()
            .enumerate()
            .filter(|(_, e)| e.job.state() == State::WaitingForInitialConnect)
            .min_by_key(|(_, e)| e.id)
            .map(|(at, _)| at)
    }

    /// Ends the job at `at` for a newer one, with `why` in the log.
    fn make_room(&mut self, at: usize, now: u64, why: &str) {
        let mut old = self.jobs.swap_remove(at);
        old.job.step(Input::Replaced, now);
        self.finished.push(Outcome::Replaced);
        log::info!(
            "delayed leave: job {} for {} in room {} ends: {why}",
            old.id,
            shown(&old.handover.user_id),
            old.handover.room
        );
    }

    /// How the jobs that ended since the last call ended (for metrics).
    pub fn take_finished(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.finished)
    }

    /// The earliest time (ms) a job wants [`JobService::tick`], `None` without jobs waiting.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.jobs.iter().filter_map(|e| e.job.next_wakeup()).min()
    }

    /// The index of `user_id`'s oldest job when they already have [`MAX_JOBS_PER_USER`].
    fn oldest_if_over_user_cap(&self, user_id: &str) -> Option<usize> {
        self.oldest_if_over(MAX_JOBS_PER_USER, |h| h.user_id == user_id)
    }

    /// The index of the oldest job of `user_id`'s homeserver when that server already has
    /// [`MAX_JOBS_PER_SERVER`] (its never-connected jobs first).
    fn oldest_if_over_server_cap(&self, user_id: &str) -> Option<usize> {
        let server = server_of(user_id);
        self.oldest_if_over(MAX_JOBS_PER_SERVER, |h| server_of(&h.user_id) == server)
    }

    /// The oldest job matching `mine` (one still waiting for its participant, if any) when at
    /// least `cap` jobs match.
    fn oldest_if_over(&self, cap: usize, mine: impl Fn(&Handover) -> bool) -> Option<usize> {
        let matching = || {
            self.jobs
                .iter()
                .enumerate()
                .filter(|(_, e)| mine(&e.handover))
        };
        if matching().count() < cap {
            return None;
        }
        let waiting = matching()
            .filter(|(_, e)| e.job.state() == State::WaitingForInitialConnect)
            .min_by_key(|(_, e)| e.id);
        waiting
            .or_else(|| matching().min_by_key(|(_, e)| e.id))
            .map(|(at, _)| at)
    }

    fn position(&self, room: &str, identity: &str) -> Option<usize> {
        self.jobs
            .iter()
            .position(|e| e.handover.room == room && e.handover.identity == identity)
    }

    /// Takes a message at `now` (ms): a handover starts a job (replacing the one for the same
    /// room and identity), a participant signal goes to its job (ignored without one).
    /// Returns the callouts to make now.
    pub fn receive(
        &mut self,
        service: &TokenService,
        message: Message,
        now: u64,
    ) -> Vec<JobCallout> {
        match message {
            Message::Handover(handover) => self.start(service, handover, now),
            Message::Participant {
                room,
                identity,
                signal,
                created_at,
            } => {
                log::debug!(
                    "delayed leave: {signal:?} for {} in room {}",
                    shown(&identity),
                    shown(&room)
                );
                let Some(at) = self.position(&room, &identity) else {
                    return Vec::new();
                };
                let made = created_at.map(|secs| secs.saturating_mul(1_000));
                if let (Some(made), Some(entry)) = (made, self.jobs.get(at)) {
                    if made.saturating_add(STALE_EVENT_MS) < entry.started {
                        log::info!(
                            "delayed leave: {signal:?} webhook made before job {} started: ignored",
                            entry.id
                        );
                        return Vec::new();
                    }
                }
                self.step(service, at, Input::Participant(signal), now)
            }
        }
    }

    fn start(&mut self, service: &TokenService, handover: Handover, now: u64) -> Vec<JobCallout> {
        if let Some(at) = self.position(&handover.room, &handover.identity) {
            self.make_room(at, now, "replaced by a newer one");
        } else if let Some(at) = self.oldest_if_over_user_cap(&handover.user_id) {
            self.make_room(at, now, "its user has the most jobs one user may have");
        } else if let Some(at) = self.oldest_if_over_server_cap(&handover.user_id) {
            self.make_room(
                at,
                now,
                "its homeserver has the most jobs one server may have",
            );
        } else if self.jobs.len() >= MAX_JOBS {
            // Full: the oldest job whose participant never connected goes first.
            let Some(at) = self.oldest_waiting() else {
                log::error!(
                    "delayed leave: {MAX_JOBS} jobs with connected participants running; the \
                     delayed leave event of {} in room {} is left to its homeserver timeout",
                    shown(&handover.user_id),
                    handover.room
                );
                return Vec::new();
            };
            self.make_room(
                at,
                now,
                "the service is full and it never saw its participant",
            );
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        log::info!(
            "delayed leave: job {id} started for {} in room {} (timeout {} ms, Client-Server API {})",
            shown(&handover.user_id),
            handover.room,
            handover.delay_timeout_ms,
            handover.cs_api.authority
        );
        let job = Job::new(
            now,
            handover.delay_timeout_ms,
            service.sanity_check_interval_ms,
        );
        self.jobs.push(Entry {
            id,
            job,
            handover,
            started: now,
        });
        self.step(service, self.jobs.len() - 1, Input::Tick, now)
    }

    /// Wakes every job that is due at `now` (ms); returns the callouts to make. One pass over
    /// the list, from the end: a finished job is swap-removed, which only moves an entry that
    /// was already visited.
    pub fn tick(&mut self, service: &TokenService, now: u64) -> Vec<JobCallout> {
        let mut callouts = Vec::new();
        for at in (0..self.jobs.len()).rev() {
            let due = self
                .jobs
                .get(at)
                .and_then(|e| e.job.next_wakeup())
                .is_some_and(|wake| wake <= now);
            if due {
                callouts.extend(self.step(service, at, Input::Tick, now));
            }
        }
        callouts
    }

    /// Feeds the [`Answer`] of a [`JobCallout`] made for job `job` at `now` (ms). Answers for
    /// a job that was replaced or finished are ignored. Returns the next callouts.
    pub fn answer(
        &mut self,
        service: &TokenService,
        job: u64,
        pending: Pending,
        answer: Answer<'_>,
        now: u64,
    ) -> Vec<JobCallout> {
        let Answer {
            status,
            retry_after,
            body,
        } = answer;
        let Some(at) = self.jobs.iter().position(|e| e.id == job) else {
            return Vec::new();
        };
        let body = body.get(..body.len().min(MAX_ANSWER_BYTES)).unwrap_or(body);
        let input = match pending {
            Pending::Homeserver(action) => {
                log::debug!(
                    "delayed leave: job {job} {action:?} answered {}",
                    status.map_or("nothing".to_owned(), |s| s.to_string())
                );
                Input::Homeserver {
                    status,
                    retry_after_ms: retry_after_ms(retry_after, body),
                }
            }
            Pending::Lookup => Input::Lookup(livekit::participant_present(status, body)),
        };
        self.step(service, at, input, now)
    }

    /// Steps the job at index `at`, logs and removes it when it finished, and builds the
    /// callouts it asked for.
    fn step(
        &mut self,
        service: &TokenService,
        at: usize,
        input: Input,
        now: u64,
    ) -> Vec<JobCallout> {
        let Some(entry) = self.jobs.get_mut(at) else {
            return Vec::new();
        };
        let actions = entry.job.step(input, now);
        let callouts = actions
            .into_iter()
            .map(|action| job_callout(service, entry, action, now))
            .collect();
        if let State::Finished(outcome) = entry.job.state() {
            log::info!(
                "delayed leave: job {} for {} in room {} ended: {outcome:?}",
                entry.id,
                shown(&entry.handover.user_id),
                entry.handover.room
            );
            self.finished.push(outcome);
            self.jobs.swap_remove(at);
        }
        callouts
    }
}

/// A published status older than this means the job service is not running, milliseconds.
pub const STATUS_STALE_MS: u64 = 3_000;

/// The status a job service publishes for request handlers (Envoy: in shared data, every
/// tick): `"<now ms> <full 0|1>"`.
pub fn status(now: u64, full: bool) -> Vec<u8> {
    format!("{now} {}", u8::from(full)).into_bytes()
}

/// Why a request handler must not hand a message over, read from the published `status` at
/// `now` (ms): the service has not reported for [`STATUS_STALE_MS`] (not running, or its VM
/// crashed) or, for a `handover`, it is full. `None`: go ahead.
pub fn unavailable(status: Option<&[u8]>, now: u64, handover: bool) -> Option<String> {
    let text = status
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or_default();
    let mut parts = text.split(' ');
    let at = parts
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let full = parts.next() == Some("1");
    let age = now.saturating_sub(at);
    if age > STATUS_STALE_MS {
        Some(format!("it has not reported for {age} ms (not running?)"))
    } else if handover && full {
        Some(format!("it runs {MAX_JOBS} jobs already"))
    } else {
        None
    }
}

/// A client- or server-supplied string made safe for one log line (control characters
/// escaped).
fn shown(text: &str) -> String {
    text.escape_debug().to_string()
}

fn job_callout(service: &TokenService, entry: &Entry, action: Action, now: u64) -> JobCallout {
    let h = &entry.handover;
    let (pending, callout) = match action {
        Action::Homeserver(verb) => (
            Pending::Homeserver(verb),
            Callout {
                target: CalloutTarget::DelayedEvents,
                upstream: h.cs_api.clone(),
                method: "POST",
                path: format!("{}{}", h.cs_api.base_path, action_path(&h.delay_id, verb)),
                headers: vec![("content-type", "application/json".to_owned())],
                body: b"{}".to_vec(),
                timeout_ms: service.callout_timeout_ms,
            },
        ),
        Action::LookupParticipant => {
            let token = Claims::room_admin(&service.api_key, &h.room, now / 1_000)
                .sign(service.api_secret.expose())
                .unwrap_or_default();
            (
                Pending::Lookup,
                Callout {
                    target: CalloutTarget::LiveKit,
                    upstream: service.livekit_api.clone(),
                    method: "POST",
                    path: format!(
                        "{}{}",
                        service.livekit_api.base_path,
                        livekit::GET_PARTICIPANT_PATH
                    ),
                    headers: vec![
                        ("content-type", "application/protobuf".to_owned()),
                        ("authorization", format!("Bearer {token}")),
                    ],
                    body: livekit::get_participant_body(&h.room, &h.identity),
                    timeout_ms: service.callout_timeout_ms,
                },
            )
        }
    };
    JobCallout {
        job: entry.id,
        pending,
        callout,
    }
}

/// The retry delay of a 429 in milliseconds: `Retry-After` in seconds (RFC 9110), else the
/// body's `retry_after_ms` (Matrix `M_LIMIT_EXCEEDED`). HTTP-date values are not read.
pub fn retry_after_ms(header: Option<&str>, body: &[u8]) -> Option<u64> {
    header
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| secs.saturating_mul(1_000))
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()?
                .get("retry_after_ms")?
                .as_u64()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::delayed_leave::{Outcome, FIRST_RETRY_MS};

    fn service(sanity_secs: u64) -> TokenService {
        let json = format!(
            r#"{{"livekitUrl":"ws://127.0.0.1:7880","livekitKey":"devkey","livekitSecret":"secret","fullAccessHomeservers":["example.org"],"sanityCheckIntervalSecs":{sanity_secs}}}"#
        );
        Settings::from_json(json.as_bytes(), &|_| None)
            .unwrap()
            .token_service
            .unwrap()
    }

    fn handover(room: &str, identity: &str, delay_id: &str) -> Message {
        handover_of("@alice:example.org", room, identity, delay_id)
    }

    fn handover_of(user: &str, room: &str, identity: &str, delay_id: &str) -> Message {
        Message::Handover(Handover {
            room: room.into(),
            identity: identity.into(),
            user_id: user.into(),
            delay_id: delay_id.into(),
            delay_timeout_ms: 10_000,
            cs_api: Upstream::parse("http://127.0.0.1:8008/cs", false).unwrap(),
        })
    }

    fn status(status: u16) -> Answer<'static> {
        Answer {
            status: Some(status),
            ..Answer::default()
        }
    }

    fn joined(room: &str, identity: &str) -> Message {
        Message::Participant {
            room: room.into(),
            identity: identity.into(),
            signal: ParticipantSignal::Joined,
            created_at: None,
        }
    }

    #[test]
    fn messages_round_trip() {
        for m in [handover("r", "i", "d"), joined("r", "i")] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode(br#"{"other":{}}"#), None);
    }

    #[test]
    fn connected_job_restarts_on_the_cs_api() {
        let svc = service(0);
        let mut jobs = JobService::new();
        assert!(jobs
            .receive(&svc, handover("r", "i", "syd/1"), 0)
            .is_empty());
        assert_eq!(jobs.next_wakeup(), Some(FIRST_RETRY_MS));
        let out = jobs.receive(&svc, joined("r", "i"), 100);
        assert_eq!(out.len(), 1);
        let c = &out[0];
        assert_eq!(c.pending, Pending::Homeserver(HomeserverAction::Restart));
        assert_eq!(c.callout.method, "POST");
        assert_eq!(c.callout.upstream.authority, "127.0.0.1:8008");
        assert_eq!(
            c.callout.path,
            "/cs/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd%2F1/restart"
        );
        assert_eq!(c.callout.body, b"{}");
        let next = jobs.answer(&svc, c.job, c.pending, status(200), 150);
        assert!(next.is_empty());
        assert_eq!(jobs.next_wakeup(), Some(150 + 8_000));
        let again = jobs.tick(&svc, 8_150);
        assert_eq!(
            again[0].pending,
            Pending::Homeserver(HomeserverAction::Restart)
        );
    }

    #[test]
    fn lookup_is_a_signed_get_participant() {
        let svc = service(0);
        let mut jobs = JobService::new();
        jobs.receive(&svc, handover("room1", "ident", "d"), 0);
        let out = jobs.tick(&svc, FIRST_RETRY_MS);
        assert_eq!(out.len(), 1);
        let c = &out[0].callout;
        assert_eq!(c.target, CalloutTarget::LiveKit);
        assert_eq!(c.path, livekit::GET_PARTICIPANT_PATH);
        assert_eq!(c.body, livekit::get_participant_body("room1", "ident"));
        let bearer = &c.headers[1].1;
        assert!(bearer.starts_with("Bearer ey"), "{bearer}");
        // Present: connected, restart at once.
        let next = jobs.answer(&svc, out[0].job, Pending::Lookup, status(200), 1_100);
        assert_eq!(
            next[0].pending,
            Pending::Homeserver(HomeserverAction::Restart)
        );
    }

    #[test]
    fn replacement_ignores_the_old_jobs_answers() {
        let svc = service(0);
        let mut jobs = JobService::new();
        jobs.receive(&svc, handover("r", "i", "old"), 0);
        let old = jobs.receive(&svc, joined("r", "i"), 10);
        jobs.receive(&svc, handover("r", "i", "new"), 20);
        assert_eq!(jobs.len(), 1);
        // The old restart's 404 must not end the new job.
        let late = jobs.answer(&svc, old[0].job, old[0].pending, status(404), 30);
        assert!(late.is_empty());
        assert_eq!(jobs.len(), 1);
        let out = jobs.receive(&svc, joined("r", "i"), 40);
        assert!(out[0].callout.path.contains("/new/restart"));
        // Another identity is another job.
        jobs.receive(&svc, handover("r", "j", "other"), 50);
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn finished_jobs_are_removed() {
        let svc = service(0);
        let mut jobs = JobService::new();
        jobs.receive(&svc, handover("r", "i", "d"), 0);
        let out = jobs.receive(&svc, joined("r", "i"), 10);
        jobs.answer(&svc, out[0].job, out[0].pending, status(200), 20);
        let left = jobs.receive(
            &svc,
            Message::Participant {
                room: "r".into(),
                identity: "i".into(),
                signal: ParticipantSignal::Left,
                created_at: None,
            },
            30,
        );
        assert_eq!(left[0].pending, Pending::Homeserver(HomeserverAction::Send));
        assert!(left[0].callout.path.ends_with("/d/send"));
        jobs.answer(&svc, left[0].job, left[0].pending, status(404), 40);
        assert!(jobs.is_empty(), "404 on send counts as sent");
        assert_eq!(jobs.take_finished(), vec![Outcome::AlreadySent]);
        assert!(jobs.take_finished().is_empty());
        assert_eq!(jobs.next_wakeup(), None);
    }

    #[test]
    fn webhooks_made_before_the_job_are_ignored() {
        let svc = service(0);
        let mut jobs = JobService::new();
        let start = 1_800_000_000_000; // ms
        jobs.receive(&svc, handover("r", "i", "d"), start);
        let left = |secs| Message::Participant {
            room: "r".into(),
            identity: "i".into(),
            signal: ParticipantSignal::Left,
            created_at: Some(secs),
        };
        // A replayed (or late) participant_left from a minute before: ignored.
        assert!(jobs
            .receive(&svc, left(start / 1_000 - 60), start + 10)
            .is_empty());
        // Within the clock-skew allowance, or after the start: acted on.
        let out = jobs.receive(&svc, left(start / 1_000 - 2), start + 20);
        assert_eq!(out[0].pending, Pending::Homeserver(HomeserverAction::Send));
    }

    #[test]
    fn published_status() {
        let now = 1_800_000_000_000;
        assert_eq!(
            unavailable(Some(&super::status(now, false)), now + 100, true),
            None
        );
        assert!(unavailable(
            Some(&super::status(now, false)),
            now + STATUS_STALE_MS + 1,
            false
        )
        .is_some_and(|why| why.contains("not reported")));
        assert!(unavailable(None, now, false).is_some(), "never published");
        assert!(unavailable(Some(b"garbage"), now, false).is_some());
        let full = super::status(now, true);
        assert!(unavailable(Some(&full), now, true).is_some_and(|why| why.contains("jobs already")));
        assert_eq!(
            unavailable(Some(&full), now, false),
            None,
            "webhooks still go through"
        );
    }

    #[test]
    fn retry_after_sources() {
        assert_eq!(retry_after_ms(Some(" 3 "), b""), Some(3_000));
        assert_eq!(
            retry_after_ms(
                None,
                br#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500}"#
            ),
            Some(1_500)
        );
        assert_eq!(
            retry_after_ms(Some("Wed, 21 Oct 2015 07:28:00 GMT"), b""),
            None
        );
    }

    #[test]
    fn capacity_is_bounded() {
        let svc = service(0);
        let mut jobs = JobService::new();
        for i in 0..MAX_JOBS {
            jobs.receive(
                &svc,
                handover_of(&format!("@u{i}:s{}.x", i % 5), "r", &i.to_string(), "d"),
                0,
            );
        }
        // Full, but every job still waits for its participant: a newcomer ends the oldest.
        assert!(!jobs.is_full());
        jobs.receive(&svc, handover_of("@new:new.x", "r", "one more", "d"), 0);
        assert_eq!(jobs.len(), MAX_JOBS);
        assert_eq!(
            jobs.position("r", "0"),
            None,
            "the oldest waiting job made room"
        );
        assert!(jobs.position("r", "one more").is_some());
        // Replacing an existing job still works when full.
        jobs.receive(&svc, handover_of("@u1:s1.x", "r", "1", "d2"), 0);
        assert_eq!(jobs.len(), MAX_JOBS);
        // Every participant connected: nothing to make room with, a new job is dropped.
        for i in 1..MAX_JOBS {
            jobs.receive(&svc, joined("r", &i.to_string()), 1);
        }
        jobs.receive(&svc, joined("r", "one more"), 1);
        assert!(jobs.is_full());
        jobs.receive(&svc, handover_of("@late:late.x", "r", "late", "d"), 2);
        assert_eq!(jobs.position("r", "late"), None);
        assert_eq!(jobs.len(), MAX_JOBS);
    }

    #[test]
    fn one_homeserver_cannot_fill_the_service() {
        let svc = service(0);
        let mut jobs = JobService::new();
        // Many users of one server: its quarter fills, the oldest of them make room.
        for i in 0..MAX_JOBS_PER_SERVER + 3 {
            jobs.receive(
                &svc,
                handover_of(&format!("@u{i}:open.example"), "r", &i.to_string(), "d"),
                0,
            );
        }
        assert_eq!(jobs.len(), MAX_JOBS_PER_SERVER);
        assert_eq!(jobs.position("r", "0"), None);
        // Another server is not affected.
        jobs.receive(
            &svc,
            handover_of("@alice:example.org", "r", "alice", "d"),
            0,
        );
        assert_eq!(jobs.len(), MAX_JOBS_PER_SERVER + 1);
        // Connected participants of the busy server are kept over waiting ones.
        jobs.receive(&svc, joined("r", "5"), 1);
        jobs.receive(&svc, handover_of("@more:open.example", "r", "more", "d"), 2);
        assert!(
            jobs.position("r", "5").is_some(),
            "the connected job was evicted"
        );
        assert_eq!(server_of("@a:b.example:8448"), "b.example:8448");
    }

    #[test]
    fn one_user_cannot_fill_the_service() {
        let svc = service(0);
        let mut jobs = JobService::new();
        for i in 0..MAX_JOBS_PER_USER + 5 {
            jobs.receive(&svc, handover("r", &i.to_string(), &format!("d{i}")), 0);
        }
        assert_eq!(jobs.len(), MAX_JOBS_PER_USER);
        // The oldest ones made room: identities 0..5 are gone, the newest stay.
        assert_eq!(jobs.position("r", "0"), None);
        assert!(jobs
            .position("r", &(MAX_JOBS_PER_USER + 4).to_string())
            .is_some());
        jobs.receive(&svc, handover_of("@bob:x", "r", "bob", "d"), 0);
        assert_eq!(jobs.len(), MAX_JOBS_PER_USER + 1);
    }
}
