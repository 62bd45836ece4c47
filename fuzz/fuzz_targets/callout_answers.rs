//! Fuzzes the exchange with arbitrary callout answers (status, Cache-Control, body) for
//! `.well-known`, userinfo, `.well-known/matrix/client` and CreateRoom, with and without
//! delayed-leave delegation: never a panic, never a token or a job without a valid `sub`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::discovery::NoCache;
use matrixrtc_livekit_auth::exchange::{CalloutResult, Step, TokenExchange};
use matrixrtc_livekit_auth::requests::TokenEndpoint;
#[path = "common.rs"]
mod common;

const BODY: &[u8] = br#"{"room_id":"!r:example.org","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","matrix_server_name":"example.org"},"member":{"id":"m","claimed_user_id":"@a:example.org","claimed_device_id":"D"}}"#;

const DELAYED: &[u8] = br#"{"room_id":"!r:example.org","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","matrix_server_name":"example.org"},"member":{"id":"m","claimed_user_id":"@a:example.org","claimed_device_id":"D"},"delay_id":"d","delay_timeout":5000}"#;

fuzz_target!(|data: &[u8]| {
    let service = common::service();
    let (flag, data) = data.split_first().unwrap_or((&0, data));
    let body = if flag & 1 == 1 { DELAYED } else { BODY };
    let (mut ex, mut step) = TokenExchange::start(service, TokenEndpoint::GetToken, body, &NoCache, 1_800_000_000, || true);
    let mut answers = data.split(|b| *b == 0xff);
    let mut saw_sub = false;
    for _ in 0..4 {
        let Step::Callout(c) = &step else { break };
        let answer = answers.next().unwrap_or_default();
        let (head, body) = answer.split_at(answer.len().min(3));
        let status = head.first().map(|b| 100 + u16::from(*b) * 2);
        let cache_control = std::str::from_utf8(head.get(1..).unwrap_or_default()).ok();
        if c.path.contains("userinfo") {
            saw_sub = status.is_some_and(|s| (200..300).contains(&s))
                && std::str::from_utf8(body).is_ok_and(|b| b.contains("@a:example.org"));
        }
        let result = CalloutResult { status, body, cache_control, detail: "" };
        step = ex.on_callout_response(service, result, &NoCache, 1_800_000_000);
    }
    match step {
        Step::Respond(r) if r.status == 200 => assert!(saw_sub, "a token without a verified sub"),
        Step::Handover { .. } => assert!(saw_sub, "a job without a verified sub"),
        _ => {}
    }
});
