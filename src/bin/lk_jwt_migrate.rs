//! `lk-jwt-migrate`: reads an lk-jwt-service environment (`LIVEKIT_*` variables) and prints the
//! equivalent plugin configuration plus the Envoy and Traefik snippets that use it.
//!
//! ```text
//! LIVEKIT_URL=wss://sfu.example.org LIVEKIT_KEY=devkey LIVEKIT_SECRET_FROM_FILE=/run/secret \
//! LIVEKIT_FULL_ACCESS_HOMESERVERS=example.org cargo run --bin lk-jwt-migrate -- --prefix /livekit-jwt-service
//! ```
//!
//! Secrets never appear in the output: the configuration names environment variables
//! (`livekitKeyEnv`, `livekitSecretEnv`) that Envoy passes to the filter. Exits 2 with a clear
//! message when the environment is incomplete or invalid, 0 otherwise.

use std::process::ExitCode;

use matrixrtc_livekit_auth::config::{self, Settings};

/// What lk-jwt-service reads from its environment, resolved (files read, formats checked).
struct Migration {
    livekit_url: String,
    log_level: Option<&'static str>,
    key: String,
    secret: String,
    full_access: Vec<String>,
    insecure: bool,
    /// `LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS` (Envoy only: delayed-leave jobs).
    sanity_check_secs: Option<u64>,
    /// `LIVEKIT_CS_API_URL_OVERRIDES` as (server name, URL) pairs (Envoy only).
    cs_api_urls: Vec<(String, String)>,
    notes: Vec<String>,
}

/// Which proxy a printed configuration is for (Traefik refuses the delayed-leave keys).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Envoy,
    Traefik,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A value given inline (`NAME`) or as a file path (`NAME_FROM_FILE`), exactly one of the two.
fn inline_or_file(name: &str) -> Result<Option<String>, String> {
    let file_var = format!("{name}_FROM_FILE");
    match (var(name), var(&file_var)) {
        (Some(_), Some(_)) => Err(format!("set either {name} or {file_var}, not both")),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| format!("{file_var}: cannot read {path}: {e}"))
            .and_then(|s| {
                let v = s.trim().to_owned();
                if v.is_empty() {
                    Err(format!("{file_var}: {path} is empty"))
                } else {
                    Ok(Some(v))
                }
            }),
        (None, None) => Ok(None),
    }
}

fn read_environment() -> Result<Migration, String> {
    let mut notes = Vec::new();
    let livekit_url = var("LIVEKIT_URL").ok_or("LIVEKIT_URL is required")?;
    let key = inline_or_file("LIVEKIT_KEY")?;
    let secret = inline_or_file("LIVEKIT_SECRET")?;
    let (key, secret) = match (key, secret, var("LIVEKIT_KEY_FILE")) {
        (Some(k), Some(s), None) => (k, s),
        (None, None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("LIVEKIT_KEY_FILE: cannot read {path}: {e}"))?;
            let format_error =
                format!("LIVEKIT_KEY_FILE: {path} is not in the `APIkey: secret` format");
            let (k, s) = text.trim().split_once(':').ok_or(format_error.clone())?;
            if s.contains(':') {
                return Err(format_error);
            }
            (k.trim().to_owned(), s.trim().to_owned())
        }
        (_, _, Some(_)) => {
            return Err(
                "LIVEKIT_KEY_FILE is mutually exclusive with LIVEKIT_KEY/LIVEKIT_SECRET".into(),
            )
        }
        (None, _, None) => {
            return Err(
                "LIVEKIT_KEY (or LIVEKIT_KEY_FROM_FILE or LIVEKIT_KEY_FILE) is required".into(),
            )
        }
        (_, None, None) => {
            return Err(
                "LIVEKIT_SECRET (or LIVEKIT_SECRET_FROM_FILE or LIVEKIT_KEY_FILE) is required"
                    .into(),
            )
        }
    };
    if key.is_empty() || secret.is_empty() {
        return Err("the LiveKit API key and secret must not be empty".into());
    }
    let full_access: Vec<String> = var("LIVEKIT_FULL_ACCESS_HOMESERVERS")
        .ok_or("LIVEKIT_FULL_ACCESS_HOMESERVERS is required (a comma-separated list, or *)")?
        // lk-jwt-service splits on commas and whitespace.
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    for name in &full_access {
        let internal = matrixrtc_livekit_auth::matrix::ServerName::parse(name)
            .is_ok_and(|server| matrixrtc_livekit_auth::discovery::is_internal(&server.host));
        if internal {
            notes.push(format!(
                "{name}: an internal name or address; the plugin refuses to call it unless you add \
                 allowPrivateAddresses: true or a homeservers override for it (README \"Which \
                 homeservers may be called\")"
            ));
        }
    }
    let insecure = match var("LIVEKIT_INSECURE_SKIP_VERIFY_TLS").as_deref() {
        Some("YES_I_KNOW_WHAT_I_AM_DOING") => {
            notes.push("LIVEKIT_INSECURE_SKIP_VERIFY_TLS: mapped to insecureSkipVerify (TEST ONLY; needs the insecure Envoy cluster, see README)".into());
            true
        }
        Some(_) => {
            notes.push("LIVEKIT_INSECURE_SKIP_VERIFY_TLS: ignored (lk-jwt-service only honours YES_I_KNOW_WHAT_I_AM_DOING)".into());
            false
        }
        None => false,
    };
    let log_level = match var("LIVEKIT_LOG_LEVEL")
        .map(|l| l.to_ascii_lowercase())
        .as_deref()
    {
        None => None,
        Some("debug") => Some("debug"),
        Some("info") => Some("info"),
        Some("warn" | "warning") => Some("warn"),
        Some("error") => Some("error"),
        Some(_) => {
            return Err("LIVEKIT_LOG_LEVEL must be one of debug, info, warn, warning, error".into())
        }
    };
    for (name, what) in [
        ("LIVEKIT_JWT_BIND", "the proxy's listener replaces it"),
        ("LIVEKIT_JWT_PORT", "the proxy's listener replaces it"),
        (
            "LIVEKIT_CAN_UPDATE_OWN_METADATA",
            "the filter always grants canUpdateOwnMetadata (product contract)",
        ),
        (
            "LIVEKIT_REDIS_URL",
            "delayed-leave jobs live in Envoy's memory; README \"Delayed leave delegation\" says \
             what a restart does",
        ),
        (
            "LIVEKIT_REDIS_PASSWORD",
            "delayed-leave jobs are not persisted",
        ),
        (
            "LIVEKIT_AS_TOKEN",
            "application-service mode is not supported",
        ),
        (
            "LIVEKIT_HS_TOKEN",
            "application-service mode is not supported",
        ),
        (
            "LIVEKIT_AS_REGISTRATION_FILE",
            "application-service mode is not supported",
        ),
        (
            "LIVEKIT_HS_SERVER_NAME",
            "application-service mode is not supported",
        ),
    ] {
        if var(name).is_some() {
            notes.push(format!("{name}: not carried over ({what})"));
        }
    }
    let sanity_check_secs = match var("LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS") {
        None => None,
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
            format!(
                "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, got {s:?}"
            )
        })?),
    };
    let mut cs_api_urls = Vec::new();
    for entry in var("LIVEKIT_CS_API_URL_OVERRIDES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (name, url) = entry.split_once('=').ok_or_else(|| {
            format!("LIVEKIT_CS_API_URL_OVERRIDES: `{entry}` is not `server.name=https://url`")
        })?;
        if !url.contains("://") {
            return Err(format!(
                "LIVEKIT_CS_API_URL_OVERRIDES: `{entry}`: the URL needs its scheme, e.g. \
                 {}=https://{} (lk-jwt-service cannot use it without one either)",
                name.trim(),
                url.trim()
            ));
        }
        cs_api_urls.push((name.trim().to_owned(), url.trim().to_owned()));
    }
    if sanity_check_secs.is_some() || !cs_api_urls.is_empty() {
        notes.push(
            "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS / LIVEKIT_CS_API_URL_OVERRIDES: carried over \
             for Envoy (sanityCheckIntervalSecs / csApiUrls); Traefik cannot run delayed-leave \
             jobs"
                .into(),
        );
    }
    Ok(Migration {
        livekit_url,
        log_level,
        key,
        secret,
        full_access,
        insecure,
        sanity_check_secs,
        cs_api_urls,
        notes,
    })
}

fn plugin_configuration(m: &Migration, prefix: Option<&str>, proxy: Proxy) -> serde_json::Value {
    let mut cfg = serde_json::Map::new();
    if let Some(p) = prefix {
        cfg.insert("stripPrefixes".into(), serde_json::json!([p]));
    }
    cfg.insert("livekitUrl".into(), serde_json::json!(m.livekit_url));
    cfg.insert("livekitKeyEnv".into(), serde_json::json!("LIVEKIT_KEY"));
    cfg.insert(
        "livekitSecretEnv".into(),
        serde_json::json!("LIVEKIT_SECRET"),
    );
    cfg.insert(
        "fullAccessHomeservers".into(),
        serde_json::json!(m.full_access),
    );
    if m.insecure {
        cfg.insert("insecureSkipVerify".into(), serde_json::json!(true));
    }
    if let Some(level) = m.log_level {
        cfg.insert("logLevel".into(), serde_json::json!(level));
    }
    if proxy == Proxy::Envoy {
        if let Some(secs) = m.sanity_check_secs {
            cfg.insert("sanityCheckIntervalSecs".into(), serde_json::json!(secs));
        }
        if !m.cs_api_urls.is_empty() {
            let urls: serde_json::Map<String, serde_json::Value> = m
                .cs_api_urls
                .iter()
                .map(|(name, url)| (name.clone(), serde_json::json!(url)))
                .collect();
            cfg.insert("csApiUrls".into(), serde_json::Value::Object(urls));
        }
    }
    serde_json::Value::Object(cfg)
}

/// The plugin configuration for `proxy` as pretty JSON, validated exactly as the plugin will
/// (with the real key and secret, and the host's own key checks).
fn validated_json(m: &Migration, prefix: Option<&str>, proxy: Proxy) -> Result<String, String> {
    let cfg = plugin_configuration(m, prefix, proxy);
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
    let (key, secret) = (m.key.clone(), m.secret.clone());
    Settings::from_json(json.as_bytes(), &move |name| match name {
        "LIVEKIT_KEY" => Some(key.clone()),
        "LIVEKIT_SECRET" => Some(secret.clone()),
        _ => None,
    })
    .and_then(|_| {
        config::refuse_keys_of_other_host(
            json.as_bytes(),
            match proxy {
                Proxy::Envoy => config::Host::Envoy,
                Proxy::Traefik => config::Host::Traefik,
            },
        )
    })
    .map_err(|e| format!("the resulting {e}"))?;
    Ok(json)
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prefix = match args.as_slice() {
        [] => None,
        [flag, p] if flag == "--prefix" => Some(p.as_str()),
        _ => return Err("usage: lk-jwt-migrate [--prefix /livekit-jwt-service]".into()),
    };
    let m = read_environment()?;
    let json = validated_json(&m, prefix, Proxy::Envoy)?;
    let traefik_json = validated_json(&m, prefix, Proxy::Traefik)?;

    println!("# Plugin configuration (JSON)\n{json}\n");
    println!(
        "# Envoy: the wasm filter's config (see envoy/envoy.yaml for the clusters it needs).\n\
         # Start Envoy with LIVEKIT_KEY and LIVEKIT_SECRET in its environment{}.",
        if var("LIVEKIT_SECRET_FROM_FILE").is_some() || var("LIVEKIT_KEY_FILE").is_some() {
            " (read them from your secret file, e.g. systemd EnvironmentFile=)"
        } else {
            ""
        }
    );
    println!(
        "configuration:\n  \"@type\": type.googleapis.com/google.protobuf.StringValue\n  value: |\n{}vm_config:\n  environment_variables:\n    host_env_keys: [LIVEKIT_KEY, LIVEKIT_SECRET]\n",
        indent(&json, 4)
    );
    println!(
        "# Envoy: delayed-leave delegation (/delegate_delayed_leave, delay_id, /sfu_webhook) runs in\n\
         # the singleton job service: add envoy/envoy.yaml's bootstrap_extensions block with the same\n\
         # configuration and vm_config as the filter, and point LiveKit's webhook at\n\
         # <prefix>/sfu_webhook (README \"Delayed leave delegation\").\n"
    );
    println!(
        "# Traefik (dynamic configuration): the same options for the plugin middleware (JSON is\n\
         # valid YAML), behind the three middlewares README \"Traefik\" requires (one token\n\
         # request at a time). Put LIVEKIT_KEY and LIVEKIT_SECRET in Traefik's environment and list them\n\
         # in the plugin's settings.envs; see traefik/dynamic-token-service.yml for the router.\n\
         # Traefik runs one token request at a time: also set allowedHomeservers (the servers\n\
         # you serve) and a short calloutTimeoutMs (1000-2000) in the options below.\n\
         http:\n  middlewares:\n    matrixrtc-buffer:\n      buffering:\n        maxRequestBodyBytes: 1048576\n    matrixrtc-lock-key:\n      headers:\n        customRequestHeaders:\n          X-Matrixrtc-Lock: \"1\"\n    matrixrtc-one-at-a-time:\n      inFlightReq:\n        amount: 1\n        sourceCriterion:\n          requestHeaderName: X-Matrixrtc-Lock\n    matrixrtc-token:\n      plugin:\n        matrixrtc:\n{}  # router: middlewares: [matrixrtc-buffer, matrixrtc-lock-key, matrixrtc-one-at-a-time, matrixrtc-token]",
        indent(&traefik_json, 10)
    );
    for note in &m.notes {
        eprintln!("note: {note}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lk-jwt-migrate: {e}");
            ExitCode::from(2)
        }
    }
}
