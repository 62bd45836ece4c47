//! Shared by the fuzz targets: one token-service configuration, parsed once.
use matrixrtc_livekit_auth::config::{Settings, TokenService};
use std::sync::OnceLock;

/// The token service of a fixed, valid plugin configuration.
pub fn service() -> &'static TokenService {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let json = br#"{"livekitUrl":"wss://sfu.example.org","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["example.org"]}"#;
        Settings::from_json(json, &|_| None).expect("valid")
    })
    .token_service
    .as_ref()
    .expect("token service on")
}
