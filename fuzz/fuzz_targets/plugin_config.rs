//! Fuzzes plugin configuration parsing: any bytes give settings or a named error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrixrtc_livekit_auth::config::Settings;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = Settings::from_json(data, &|name| (name == "SECRET").then(|| "s".to_owned())) {
        assert!(!e.key.is_empty() && !e.reason.is_empty());
    }
});
