//! Fuzzes token request decoding and the first step of the exchange with arbitrary bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::discovery::NoCache;
use matrixrtc_livekit_auth::exchange::{Step, TokenExchange};
use matrixrtc_livekit_auth::requests::TokenEndpoint;
#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let service = common::service();
    for endpoint in [
        TokenEndpoint::GetToken,
        TokenEndpoint::SfuGet,
        TokenEndpoint::DelegateDelayedLeave,
    ] {
        let (_, step) =
            TokenExchange::start(service, endpoint, data, &NoCache, 1_800_000_000, || true);
        if let Step::Respond(r) = step {
            assert!(matches!(r.status, 400 | 401), "{}", r.status);
        }
    }
});
