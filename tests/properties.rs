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
