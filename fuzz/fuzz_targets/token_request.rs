//! Fuzzes token request decoding and the first step of the exchange with arbitrary bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::config::Settings;
use matrixrtc_livekit_auth::discovery::NoCache;
use matrixrtc_livekit_auth::exchange::{Step, TokenExchange};
use matrixrtc_livekit_auth::requests::TokenEndpoint;
use std::sync::OnceLock;

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let json = br#"{"livekitUrl":"wss://sfu.example.org","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["example.org"]}"#;
        Settings::from_json(json, &|_| None).expect("valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(service) = settings().token_service.as_ref() else { return };
    for endpoint in [TokenEndpoint::GetToken, TokenEndpoint::SfuGet] {
        let (_, step) = TokenExchange::start(service, endpoint, data, &NoCache, 1_800_000_000);
        if let Step::Respond(r) = step {
            assert!(matches!(r.status, 400 | 401), "{}", r.status);
        }
    }
});
