//! Fuzzes `/sfu_webhook` (LiveKit webhook verification, src/webhook.rs), which anyone can
//! reach: arbitrary `Authorization` values and bodies never panic, and nothing unsigned is
//! ever accepted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::exchange::sfu_webhook;
#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let service = common::service();
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (authorization, body) = data.split_at(split);
    let authorization = std::str::from_utf8(authorization).ok();
    let (answer, message) = sfu_webhook(service, authorization, body, 1_800_000_000);
    assert_eq!(answer.status, 401, "an unsigned webhook was accepted");
    assert!(message.is_none());
});
