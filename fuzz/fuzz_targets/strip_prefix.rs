//! Fuzzes routing and strip-prefix with arbitrary methods and request targets.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::config::Settings;
use matrixrtc_livekit_auth::exchange::{route, Decision};
use std::sync::OnceLock;

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let json = br#"{"stripPrefixes":["/livekit-jwt-service","/a/b"],"livekitUrl":"wss://sfu.example.org","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"]}"#;
        Settings::from_json(json, &|_| None).expect("valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (method, target) = text.split_once(' ').unwrap_or(("GET", text));
    if let Decision::Forward { target: new, .. } = route(settings(), method, target) {
        assert!(new.starts_with('/') && !new.starts_with("//"), "{new:?}");
        let q_old = target.split_once('?').map(|(_, q)| q);
        let q_new = new.split_once('?').map(|(_, q)| q);
        assert_eq!(q_old, q_new);
    }
});
