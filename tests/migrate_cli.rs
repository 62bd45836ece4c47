//! `lk-jwt-migrate` end to end: the binary with a given environment, its output and exit code.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lk-jwt-migrate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn plugin_json(stdout: &str) -> serde_json::Value {
    let start = stdout.find('{').unwrap();
    let end = stdout.find("\n}\n").unwrap() + 2;
    serde_json::from_str(&stdout[start..end]).unwrap()
}

#[test]
fn migrates_a_typical_environment() {
    let (code, out, err) = run(
        &[
            ("LIVEKIT_URL", "wss://sfu.example.org"),
            ("LIVEKIT_KEY", "devkey"),
            ("LIVEKIT_SECRET", "s3cret-value"),
            (
                "LIVEKIT_FULL_ACCESS_HOMESERVERS",
                "example.org, matrix.example.net other.example",
            ),
            ("LIVEKIT_JWT_PORT", "8080"),
            ("LIVEKIT_LOG_LEVEL", "WARNING"),
        ],
        &["--prefix", "/livekit-jwt-service"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        plugin_json(&out),
        serde_json::json!({
            "livekitUrl": "wss://sfu.example.org", "livekitKeyEnv": "LIVEKIT_KEY",
            "livekitSecretEnv": "LIVEKIT_SECRET",
            "fullAccessHomeservers": ["example.org", "matrix.example.net", "other.example"],
            "stripPrefixes": ["/livekit-jwt-service"],
            "logLevel": "warn",
        })
    );
    assert!(out.contains("host_env_keys: [LIVEKIT_KEY, LIVEKIT_SECRET]"));
    // Traefik: the same options under the plugin middleware, behind the required lock.
    let traefik = &out[out.find("# Traefik").unwrap()..];
    assert!(
        traefik.contains("requestHeaderName: X-Matrixrtc-Lock"),
        "{traefik}"
    );
    assert!(traefik.contains("X-Matrixrtc-Lock: \"1\""), "{traefik}");
    assert!(
        traefik.contains("          \"stripPrefixes\": ["),
        "{traefik}"
    );
    assert!(traefik.contains(
        "[matrixrtc-buffer, matrixrtc-lock-key, matrixrtc-one-at-a-time, matrixrtc-token]"
    ));
    assert!(
        !out.contains("s3cret-value") && !err.contains("s3cret-value"),
        "never print the secret"
    );
    assert!(err.contains("LIVEKIT_JWT_PORT: not carried over"));
}

#[test]
fn reads_secret_files() {
    let dir = std::env::temp_dir().join(format!("lkmig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keyfile = dir.join("keys");
    std::fs::write(&keyfile, "devkey: file-secret\n").unwrap();
    let (code, out, err) = run(
        &[
            ("LIVEKIT_URL", "ws://127.0.0.1:7880"),
            ("LIVEKIT_KEY_FILE", keyfile.to_str().unwrap()),
            ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "*"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        plugin_json(&out)["fullAccessHomeservers"],
        serde_json::json!(["*"])
    );
    assert!(!out.contains("file-secret"));
    let secret = dir.join("secret");
    std::fs::write(&secret, "  from-file  \n").unwrap();
    let (code, _, err) = run(
        &[
            ("LIVEKIT_URL", "wss://x"),
            ("LIVEKIT_KEY", "k"),
            ("LIVEKIT_SECRET_FROM_FILE", secret.to_str().unwrap()),
            ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "example.org"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_invalid_input_with_a_clear_message() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "LIVEKIT_URL is required"),
        (
            &[
                ("LIVEKIT_URL", "wss://x"),
                ("LIVEKIT_SECRET", "s"),
                ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
            ],
            "LIVEKIT_KEY",
        ),
        (
            &[
                ("LIVEKIT_URL", "wss://x"),
                ("LIVEKIT_KEY", "k"),
                ("LIVEKIT_SECRET", "s"),
            ],
            "LIVEKIT_FULL_ACCESS_HOMESERVERS is required",
        ),
        (
            &[
                ("LIVEKIT_URL", "sfu.example.org"),
                ("LIVEKIT_KEY", "k"),
                ("LIVEKIT_SECRET", "s"),
                ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
            ],
            "invalid plugin configuration: livekitUrl",
        ),
        (
            &[
                ("LIVEKIT_URL", "wss://x"),
                ("LIVEKIT_KEY", "k"),
                ("LIVEKIT_SECRET", "s"),
                ("LIVEKIT_SECRET_FROM_FILE", "/nope"),
                ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
            ],
            "set either LIVEKIT_SECRET or LIVEKIT_SECRET_FROM_FILE",
        ),
        (
            &[
                ("LIVEKIT_URL", "wss://x"),
                ("LIVEKIT_KEY", "k"),
                ("LIVEKIT_SECRET_FROM_FILE", "/nonexistent/secret"),
                ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
            ],
            "LIVEKIT_SECRET_FROM_FILE: cannot read /nonexistent/secret",
        ),
    ];
    for (env, message) in cases {
        let (code, out, err) = run(env, &[]);
        assert_eq!(code, 2, "{env:?}: {out}{err}");
        assert!(err.contains(message), "{env:?}: `{err}` lacks `{message}`");
        assert!(out.is_empty());
    }
    let dir = std::env::temp_dir().join(format!("lkmig-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keyfile = dir.join("keys");
    std::fs::write(&keyfile, "k:s:extra").unwrap();
    let env = [
        ("LIVEKIT_URL", "wss://x"),
        ("LIVEKIT_KEY_FILE", keyfile.to_str().unwrap()),
        ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
    ];
    let (code, _, err) = run(&env, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not in the `APIkey: secret` format"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let env = [
        ("LIVEKIT_URL", "wss://x"),
        ("LIVEKIT_KEY", "k"),
        ("LIVEKIT_SECRET", "s"),
        ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "a"),
        ("LIVEKIT_LOG_LEVEL", "loud"),
    ];
    let (code, _, err) = run(&env, &[]);
    assert_eq!(
        (code, err.contains("LIVEKIT_LOG_LEVEL must be one of")),
        (2, true),
        "{err}"
    );
    let (code, _, err) = run(&[], &["--bogus"]);
    assert_eq!((code, err.contains("usage")), (2, true));
}

#[test]
fn internal_full_access_homeserver_gets_a_note() {
    let (code, _out, err) = run(
        &[
            ("LIVEKIT_URL", "ws://127.0.0.1:7880"),
            ("LIVEKIT_KEY", "devkey"),
            ("LIVEKIT_SECRET", "s3cret-value"),
            (
                "LIVEKIT_FULL_ACCESS_HOMESERVERS",
                "matrix.localhost example.org",
            ),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("note: matrix.localhost: an internal name or address"),
        "{err}"
    );
    assert!(!err.contains("note: example.org"), "{err}");
}

#[test]
fn delegation_settings_go_to_envoy_only() {
    let env = [
        ("LIVEKIT_URL", "wss://sfu.example.org"),
        ("LIVEKIT_KEY", "devkey"),
        ("LIVEKIT_SECRET", "s3cret-value"),
        ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "example.org"),
        (
            "LIVEKIT_CS_API_URL_OVERRIDES",
            "example.org=http://synapse:8008, other.example=https://matrix.other.example",
        ),
        ("LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS", "15"),
        ("LIVEKIT_REDIS_URL", "redis://localhost:6379"),
    ];
    let (code, out, err) = run(&env, &[]);
    assert_eq!(code, 0, "{err}");
    let envoy = plugin_json(&out);
    assert_eq!(envoy["sanityCheckIntervalSecs"], 15);
    assert_eq!(
        envoy["csApiUrls"],
        serde_json::json!({"example.org": "http://synapse:8008",
            "other.example": "https://matrix.other.example"})
    );
    assert!(out.contains("bootstrap_extensions"), "{out}");
    let traefik = &out[out.find("# Traefik").unwrap()..];
    assert!(!traefik.contains("csApiUrls") && !traefik.contains("sanityCheck"));
    assert!(
        err.contains("Traefik cannot run delayed-leave jobs"),
        "{err}"
    );
    assert!(err.contains("LIVEKIT_REDIS_URL: not carried over"), "{err}");
    for (name, value, message) in [
        (
            "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS",
            "-1",
            "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer",
        ),
        (
            "LIVEKIT_CS_API_URL_OVERRIDES",
            "example.org",
            "LIVEKIT_CS_API_URL_OVERRIDES: `example.org` is not",
        ),
        (
            "LIVEKIT_CS_API_URL_OVERRIDES",
            "example.org=matrix-client.example.org",
            "needs its scheme, e.g. example.org=https://matrix-client.example.org",
        ),
        (
            "LIVEKIT_CS_API_URL_OVERRIDES",
            "example.org=ftp://synapse:8008",
            "csApiUrls.example.org",
        ),
    ] {
        let mut bad = env.to_vec();
        bad.retain(|(k, _)| *k != name);
        bad.push((name, value));
        let (code, _, err) = run(&bad, &[]);
        assert_eq!(code, 2, "{name}={value}");
        assert!(err.contains(message), "{err}");
    }
}
