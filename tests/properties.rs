//! Property tests of the core's input-facing entry points (issue: reliability). Each property is
//! checked on generated inputs, including adversarial ones: path rewriting, token request
//! decoding, userinfo and `.well-known` parsing, plugin configuration parsing. None may panic;
//! the rewriting properties are those of SPEC section 3.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use matrixrtc_livekit_auth::config::Settings;
use matrixrtc_livekit_auth::discovery::{self, HomeserverPolicy};
use matrixrtc_livekit_auth::matrix::{self, MatrixError};
use matrixrtc_livekit_auth::path::{self, Prefix};
use matrixrtc_livekit_auth::requests::{TokenEndpoint, TokenRequest};
use proptest::prelude::*;

/// Path-ish strings: segments of path characters, percent-escapes and slashes.
fn path_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("/".to_owned()),
            Just("//".to_owned()),
            Just("%2F".to_owned()),
            Just("%2f".to_owned()),
            Just("\\".to_owned()),
            Just("livekit-jwt-service".to_owned()),
            Just("get_token".to_owned()),
            "[a-zA-Z0-9._~!$&'()*+,;=:@-]{1,8}",
        ],
        0..10,
    )
    .prop_map(|parts| parts.concat())
}

fn query_strategy() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[ -~]{0,24}")
}

fn prefix_strategy() -> impl Strategy<Value = Prefix> {
    "(/[a-z0-9-]{1,12}){1,3}/?".prop_map(|p| Prefix::parse(&p).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn stripped_path_starts_with_exactly_one_slash(prefix in prefix_strategy(), tail in path_strategy(), q in query_strategy()) {
        let target = match &q { Some(q) => format!("{}{tail}?{q}", prefix.as_str()), None => format!("{}{tail}", prefix.as_str()) };
        if let Some(s) = path::strip(std::slice::from_ref(&prefix), &target) {
            prop_assert!(s.path.starts_with('/'));
            prop_assert!(!s.path.starts_with("//"));
            // Origin-form: never `//host…` (network-path) nor `scheme:…`.
            prop_assert!(s.target.starts_with('/') && !s.target.starts_with("//"));
            prop_assert!(!s.target.starts_with("/\\"));
            prop_assert!(s.target.starts_with(&s.path));
        }
    }

    #[test]
    fn query_is_kept_byte_for_byte(prefix in prefix_strategy(), tail in path_strategy(), q in "[ -~]{0,32}") {
        let target = format!("{}{tail}?{q}", prefix.as_str());
        if let Some(s) = path::strip(std::slice::from_ref(&prefix), &target) {
            let (_, got) = s.target.split_once('?').unwrap();
            prop_assert_eq!(got, q.as_str());
        }
    }

    #[test]
    fn matches_only_at_segment_boundary(prefix in prefix_strategy(), tail in path_strategy()) {
        let target = format!("{}{tail}", prefix.as_str());
        let matched = path::strip(std::slice::from_ref(&prefix), &target).is_some();
        prop_assert_eq!(matched, tail.is_empty() || tail.starts_with('/'));
    }

    #[test]
    fn percent_encodings_untouched(prefix in prefix_strategy(), tail in path_strategy()) {
        let target = format!("{}/{tail}", prefix.as_str());
        let s = path::strip(std::slice::from_ref(&prefix), &target).unwrap();
        prop_assert_eq!(s.path.matches('%').count(), tail.matches('%').count());
        prop_assert_eq!(s.path.trim_start_matches(['/', '\\']), tail.trim_start_matches(['/', '\\']));
    }

    #[test]
    fn idempotent_on_already_stripped_paths(prefix in prefix_strategy(), tail in path_strategy(), q in query_strategy()) {
        let target = match &q { Some(q) => format!("{}{tail}?{q}", prefix.as_str()), None => format!("{}{tail}", prefix.as_str()) };
        if let Some(once) = path::strip(std::slice::from_ref(&prefix), &target) {
            // Stripping again only changes anything if the rest itself starts with the prefix.
            match path::strip(std::slice::from_ref(&prefix), &once.target) {
                None => {}
                Some(twice) => prop_assert!(once.path == prefix.as_str() || once.path.starts_with(&format!("{}/", prefix.as_str())), "{:?}", twice),
            }
        }
    }

    #[test]
    fn unrelated_paths_pass_untouched(prefix in prefix_strategy(), other in "/[A-Z][a-z0-9/]{0,20}") {
        prop_assert!(path::strip(std::slice::from_ref(&prefix), &other).is_none());
    }

    #[test]
    fn decoding_never_panics_and_classifies(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        for endpoint in [TokenEndpoint::GetToken, TokenEndpoint::SfuGet] {
            if let Err(e) = TokenRequest::decode(endpoint, &body) {
                prop_assert!(e == MatrixError::NOT_JSON || e.errcode == "M_BAD_JSON");
                prop_assert_eq!(e.status, 400);
            }
        }
    }

    #[test]
    fn decoding_structured_json(room in "\\PC{0,12}", token in "\\PC{0,12}", server in "\\PC{0,12}", extra in proptest::option::of("[a-z_]{1,8}")) {
        let mut v = serde_json::json!({
            "room_id": room, "slot_id": "m.call#ROOM",
            "openid_token": {"access_token": token, "matrix_server_name": server},
            "member": {"id": "m", "claimed_user_id": "@a:b", "claimed_device_id": "D"},
        });
        if let Some(k) = &extra {
            v[k.as_str()] = serde_json::json!(1);
        }
        let known = ["room_id", "slot_id", "openid_token", "member", "delay_id", "delay_timeout", "delay_cs_api_url"];
        match TokenRequest::decode(TokenEndpoint::GetToken, v.to_string().as_bytes()) {
            Ok(r) => {
                prop_assert!(extra.as_deref().is_none_or(|k| known.contains(&k)));
                prop_assert_eq!(r.access_token, token);
            }
            Err(e) if extra.as_deref().is_some_and(|k| !known.contains(&k)) => prop_assert_eq!(e, MatrixError::NOT_JSON),
            Err(e) => prop_assert_eq!(e.errcode, "M_BAD_JSON"),
        }
    }

    #[test]
    fn userinfo_only_accepts_users_of_the_server(status in proptest::option::of(100u16..600), sub in "\\PC{0,24}", server in "[a-z.:0-9]{1,16}") {
        let body = serde_json::json!({"sub": sub}).to_string();
        if let Ok(user) = matrix::verify_userinfo(status, body.as_bytes(), &server) {
            prop_assert!((200..300).contains(&status.unwrap()));
            prop_assert!(user.starts_with('@'));
            prop_assert_eq!(user.split_once(':').unwrap().1, server.as_str());
        }
    }

    #[test]
    fn userinfo_never_panics(status in proptest::option::of(any::<u16>()), body in proptest::collection::vec(any::<u8>(), 0..256), server in "\\PC{0,16}") {
        let _ = matrix::verify_userinfo(status, &body, &server);
    }

    #[test]
    fn well_known_never_panics_and_never_targets_internal(body in "\\PC{0,64}", cc in proptest::option::of("\\PC{0,24}"), now in any::<u64>()) {
        let body = format!(r#"{{"m.server":{}}}"#, serde_json::json!(body));
        if let Ok(d) = discovery::discovered("example.org", Some(200), cc.as_deref(), body.as_bytes(), &HomeserverPolicy::default(), now) {
            let host = d.upstream.authority.rsplit_once(':').unwrap().0;
            let parsed = matrix::ServerName::parse(host).unwrap();
            prop_assert!(!discovery::is_internal(&parsed.host));
        }
    }

    #[test]
    fn configuration_parsing_never_panics(json in "\\PC{0,200}") {
        let _ = Settings::from_json(json.as_bytes(), &|_| None);
    }

    #[test]
    fn configuration_structured(prefixes in proptest::collection::vec("\\PC{0,10}", 0..4), timeout in any::<i64>()) {
        let json = serde_json::json!({
            "stripPrefixes": prefixes, "livekitUrl": "wss://sfu.example.org", "livekitKey": "k",
            "livekitSecret": "s", "fullAccessHomeservers": ["*"], "calloutTimeoutMs": timeout,
        });
        match Settings::from_json(json.to_string().as_bytes(), &|_| None) {
            Ok(s) => {
                prop_assert!((1..=60_000).contains(&timeout));
                for p in &s.strip_prefixes {
                    prop_assert!(p.as_str().starts_with('/') && !p.as_str().ends_with('/'));
                }
            }
            Err(e) => prop_assert!(!e.key.is_empty() && !e.reason.is_empty()),
        }
    }
}

/// A server answer handed out `step` bytes per read; writes are discarded.
struct Peer {
    answer: Vec<u8>,
    at: usize,
    step: usize,
}

impl std::io::Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.answer[self.at..];
        let n = rest.len().min(buf.len()).min(self.step);
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl std::io::Write for Peer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn http1_answer(raw: Vec<u8>, step: usize, max_body: usize) -> Result<Vec<u8>, String> {
    let mut peer = Peer {
        answer: raw,
        at: 0,
        step,
    };
    matrixrtc_livekit_auth::http1::exchange(&mut peer, b"GET / HTTP/1.1\r\n\r\n", max_body)
        .map(|a| a.body)
}

proptest! {
    /// The Traefik plugin's HTTP/1.1 reader: any chunking of any body, read in any pieces,
    /// decodes to the body (truncated to the limit); arbitrary bytes never panic.
    #[test]
    fn http1_chunked_round_trip(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        size in 1usize..70,
        step in 1usize..40,
        max_body in 1usize..700,
        extension in "(;[a-z]{0,8}(=[a-z0-9]{0,8})?)?",
    ) {
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for part in body.chunks(size) {
            raw.extend_from_slice(format!("{:x}{extension}\r\n", part.len()).as_bytes());
            raw.extend_from_slice(part);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let decoded = http1_answer(raw, step, max_body).unwrap();
        prop_assert_eq!(&decoded[..], &body[..body.len().min(max_body)]);
    }

    #[test]
    fn http1_arbitrary_answers_never_panic(
        raw in proptest::collection::vec(any::<u8>(), 0..400),
        step in 1usize..64,
        max_body in 0usize..100,
    ) {
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        answer.extend_from_slice(&raw);
        let _ = http1_answer(answer, step, max_body);
        let _ = http1_answer(raw, step, max_body);
    }
}

proptest! {
    /// LiveKit webhook verification never panics and never accepts an unsigned or tampered
    /// body: arbitrary headers and bodies are refused (none of them carry a valid signature).
    #[test]
    fn webhook_verification_refuses_arbitrary_input(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        header in proptest::option::of("(Bearer )?[A-Za-z0-9._-]{0,200}"),
        now in any::<u64>(),
    ) {
        let result = matrixrtc_livekit_auth::webhook::verify(
            &body, header.as_deref(), "devkey", b"secret", now);
        prop_assert!(result.is_err());
    }
}

fn job_input() -> impl Strategy<Value = matrixrtc_livekit_auth::delayed_leave::Input> {
    use matrixrtc_livekit_auth::delayed_leave::Input;
    use matrixrtc_livekit_auth::webhook::ParticipantSignal;
    prop_oneof![
        Just(Input::Tick),
        Just(Input::Replaced),
        prop_oneof![
            Just(ParticipantSignal::Joined),
            Just(ParticipantSignal::Left),
            Just(ParticipantSignal::ConnectionAborted)
        ]
        .prop_map(Input::Participant),
        proptest::option::of(any::<bool>()).prop_map(Input::Lookup),
        (
            proptest::option::of(prop_oneof![
                Just(200u16),
                Just(404),
                Just(429),
                Just(500),
                100u16..600
            ]),
            proptest::option::of(0u64..100_000)
        )
            .prop_map(|(status, retry_after_ms)| Input::Homeserver {
                status,
                retry_after_ms
            }),
    ]
}

proptest! {
    /// Delayed-leave jobs under any sequence of inputs: one homeserver callout and one lookup
    /// in flight at most, answers only for callouts asked for, a finished job stays finished
    /// and asks for nothing, and a wakeup is never in the past.
    #[test]
    fn delayed_leave_job_invariants(
        steps in proptest::collection::vec((job_input(), 0u64..20_000), 1..60),
        delay in 1u64..200_000,
        sanity in prop_oneof![Just(0u64), 1u64..50_000],
    ) {
        use matrixrtc_livekit_auth::delayed_leave::{Action, Input, Job, State};
        let mut job = Job::new(0, delay, sanity);
        let (mut now, mut homeserver, mut lookup) = (0u64, false, false);
        for (input, advance) in steps {
            now += advance;
            // Feed an answer only for a callout in flight, as a host would.
            let input = match input {
                Input::Homeserver { .. } if !homeserver => Input::Tick,
                Input::Lookup(_) if !lookup => Input::Tick,
                other => other,
            };
            match input {
                Input::Homeserver { .. } => homeserver = false,
                Input::Lookup(_) => lookup = false,
                _ => {}
            }
            let finished_before = matches!(job.state(), State::Finished(_));
            let actions = job.step(input, now);
            for action in &actions {
                match action {
                    Action::Homeserver(_) => { prop_assert!(!homeserver); homeserver = true; }
                    Action::LookupParticipant => { prop_assert!(!lookup); lookup = true; }
                }
            }
            if finished_before {
                prop_assert!(actions.is_empty());
                prop_assert!(matches!(job.state(), State::Finished(_)));
            }
            // Whatever was due has been asked for: the next wakeup lies in the future.
            if let Some(at) = job.next_wakeup() {
                prop_assert!(at > now, "wakeup {} at now {}", at, now);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum ServiceOp {
    Handover {
        user: u8,
        room: u8,
        ident: u8,
        timeout: u64,
    },
    Signal {
        room: u8,
        ident: u8,
        signal: u8,
        age_secs: Option<u64>,
    },
    Answer {
        pick: usize,
        status: Option<u16>,
        retry_after: Option<u8>,
    },
    Tick,
}

fn service_op() -> impl Strategy<Value = ServiceOp> {
    prop_oneof![
        (
            0u8..3,
            0u8..2,
            0u8..3,
            prop_oneof![Just(1u64), 500u64..20_000, Just(u64::MAX / 2)]
        )
            .prop_map(|(user, room, ident, timeout)| ServiceOp::Handover {
                user,
                room,
                ident,
                timeout
            }),
        (0u8..2, 0u8..3, 0u8..3, proptest::option::of(0u64..120)).prop_map(
            |(room, ident, signal, age_secs)| ServiceOp::Signal {
                room,
                ident,
                signal,
                age_secs
            }
        ),
        (
            any::<usize>(),
            proptest::option::of(prop_oneof![
                Just(200u16),
                Just(404),
                Just(429),
                Just(503),
                100u16..600
            ]),
            proptest::option::of(0u8..5)
        )
            .prop_map(|(pick, status, retry_after)| ServiceOp::Answer {
                pick,
                status,
                retry_after
            }),
        Just(ServiceOp::Tick),
    ]
}

proptest! {
    /// The job service under any sequence of handovers, webhook signals, callout answers and
    /// ticks: it never asks for a second homeserver callout or lookup of a job while one is
    /// in flight, every callout names a job's own escaped delay_id, and after a tick nothing
    /// due is left waiting.
    #[test]
    fn job_service_invariants(
        ops in proptest::collection::vec((service_op(), 0u64..5_000), 1..80),
        sanity in prop_oneof![Just(0u64), Just(1u64)],
    ) {
        use matrixrtc_livekit_auth::config::Settings;
        use matrixrtc_livekit_auth::job_service::{Answer, Handover, JobCallout, JobService, Message, Pending};
        use matrixrtc_livekit_auth::webhook::ParticipantSignal;
        let json = format!(r#"{{"livekitUrl":"ws://127.0.0.1:7880","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"],"sanityCheckIntervalSecs":{sanity}}}"#);
        let settings = Settings::from_json(json.as_bytes(), &|_| None).unwrap();
        let svc = settings.token_service.as_ref().unwrap();
        let mut jobs = JobService::new();
        let mut in_flight: Vec<JobCallout> = Vec::new();
        let mut now = 1_800_000_000_000u64;
        let check = |out: Vec<JobCallout>, in_flight: &mut Vec<JobCallout>| -> Result<(), TestCaseError> {
            for c in out {
                let same_kind = |o: &JobCallout| o.job == c.job
                    && matches!((o.pending, c.pending), (Pending::Lookup, Pending::Lookup)
                        | (Pending::Homeserver(_), Pending::Homeserver(_)));
                prop_assert!(!in_flight.iter().any(same_kind), "second {:?} for job {}", c.pending, c.job);
                if let Pending::Homeserver(_) = c.pending {
                    prop_assert!(c.callout.path.contains("/delayed_events/d-"), "{}", c.callout.path);
                }
                in_flight.push(c);
            }
            Ok(())
        };
        for (op, advance) in ops {
            now += advance;
            let out = match op {
                ServiceOp::Handover { user, room, ident, timeout } => jobs.receive(svc, Message::Handover(Handover {
                    room: format!("room{room}"),
                    identity: format!("id{ident}"),
                    user_id: format!("@u{user}:x"),
                    delay_id: format!("d-{user}/{room}/{ident}"),
                    delay_timeout_ms: timeout,
                    cs_api: matrixrtc_livekit_auth::config::Upstream::parse("http://127.0.0.1:8008", false).unwrap(),
                }), now),
                ServiceOp::Signal { room, ident, signal, age_secs } => jobs.receive(svc, Message::Participant {
                    room: format!("room{room}"),
                    identity: format!("id{ident}"),
                    signal: [ParticipantSignal::Joined, ParticipantSignal::Left, ParticipantSignal::ConnectionAborted][usize::from(signal)],
                    created_at: age_secs.map(|a| now / 1_000 - a),
                }, now),
                ServiceOp::Answer { pick, status, retry_after } => {
                    if in_flight.is_empty() { continue; }
                    let c = in_flight.swap_remove(pick % in_flight.len());
                    let header = retry_after.map(|s| s.to_string());
                    jobs.answer(svc, c.job, c.pending, Answer { status, retry_after: header.as_deref(), body: b"{}" }, now)
                }
                ServiceOp::Tick => {
                    let out = jobs.tick(svc, now);
                    check(out, &mut in_flight)?;
                    // Nothing due is left behind (a wakeup may only be at or after now when
                    // its job waits for an answer in flight).
                    if let Some(at) = jobs.next_wakeup() {
                        prop_assert!(at > now || !in_flight.is_empty(), "wakeup {} at now {}", at, now);
                    }
                    continue;
                }
            };
            check(out, &mut in_flight)?;
            // One job per (room, identity): 2 rooms x 3 identities.
            prop_assert!(jobs.len() <= 6, "{} jobs", jobs.len());
        }
    }
}
