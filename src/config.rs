//! Plugin configuration: the JSON object an operator writes (Envoy `configuration`, Istio
//! `pluginConfig`, Traefik middleware options), parsed strictly and validated once into an
//! immutable [`Settings`] value that every request shares.
//!
//! Contract: `SPEC.md` section 2. Unknown keys, wrong types and inconsistent values are
//! refused with a [`ConfigError`] that names the key; the filter never runs on defaults
//! it guessed. Secrets are held in [`Secret`], whose `Debug` output is redacted.

use std::collections::BTreeMap;
use std::fmt;

use crate::discovery::HomeserverPolicy;
use crate::matrix::ServerName;
use crate::path::Prefix;

/// Default timeout of each callout (userinfo, CreateRoom), in milliseconds.
pub const DEFAULT_CALLOUT_TIMEOUT_MS: u64 = 5_000;
/// Largest accepted `calloutTimeoutMs`, in milliseconds.
pub const MAX_CALLOUT_TIMEOUT_MS: u64 = 60_000;
/// Default name of the Envoy cluster (dynamic forward proxy, TLS) that carries `https` callouts.
pub const DEFAULT_ENVOY_TLS_CLUSTER: &str = "matrixrtc_callout_tls";
/// Default name of the Envoy cluster (dynamic forward proxy, plain HTTP) that carries `http` callouts.
pub const DEFAULT_ENVOY_PLAIN_CLUSTER: &str = "matrixrtc_callout_plain";
/// Default name of the Envoy cluster for `https` homeserver callouts when `insecureSkipVerify`
/// is set (a test-only cluster that does not verify certificates).
pub const DEFAULT_ENVOY_INSECURE_TLS_CLUSTER: &str = "matrixrtc_callout_tls_insecure";
/// Default name of the Envoy cluster that reaches the LiveKit server API (CreateRoom).
pub const DEFAULT_ENVOY_LIVEKIT_CLUSTER: &str = "matrixrtc_livekit";
/// Default lifetime of a LiveKit access token, in seconds (lk-jwt-service: one hour).
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 3_600;

/// Default `sanityCheckIntervalSecs`: how often a connected delayed-leave participant is
/// looked up on the SFU, in case its `participant_left` webhook never arrives.
pub const DEFAULT_SANITY_CHECK_INTERVAL_SECS: u64 = 30;

/// The plugin configuration exactly as written by the operator (wire names in camelCase).
///
/// Every key is optional at this level; [`Settings::from_json`] decides what is required.
/// Read key by key from the JSON object (see [`parse_raw`]) so every error names its key.
#[derive(Debug, Default)]
struct RawConfig {
    strip_prefixes: Option<Vec<String>>,
    log_level: Option<String>,
    livekit_url: Option<String>,
    livekit_key: Option<String>,
    livekit_key_env: Option<String>,
    livekit_secret: Option<String>,
    livekit_secret_env: Option<String>,
    full_access_homeservers: Option<Vec<String>>,
    livekit_api_url: Option<String>,
    homeservers: Option<BTreeMap<String, String>>,
    callout_timeout_ms: Option<u64>,
    token_lifetime_secs: Option<u64>,
    envoy_tls_cluster: Option<String>,
    envoy_plain_cluster: Option<String>,
    envoy_livekit_cluster: Option<String>,
    allowed_homeservers: Option<Vec<String>>,
    allow_private_addresses: Option<bool>,
    insecure_skip_verify: Option<bool>,
    envoy_insecure_tls_cluster: Option<String>,
    ca_file: Option<String>,
    dns_server: Option<String>,
    cs_api_urls: Option<BTreeMap<String, String>>,
    sanity_check_interval_secs: Option<u64>,
}

/// Why a plugin configuration was refused: the key at fault and the reason.
///
/// Rendered as `invalid plugin configuration: <key>: <reason>`; never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration key at fault (`.` separates nested keys), or `(json)` when the
    /// document itself is not a JSON object.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// An error for `key` (the configuration key at fault) with a `reason`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid plugin configuration: {}: {}",
            self.key, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// A secret string (the LiveKit API secret). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret bytes, for signing only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An HTTP(S) base URL a callout goes to, split the way a proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upstream {
    /// `true` for `https` (and `wss`), `false` for `http` (and `ws`).
    pub tls: bool,
    /// `host:port` with an explicit port (IPv6 hosts in brackets): Envoy's callout `:authority`.
    pub authority: String,
    /// Path to prepend to every callout path, without trailing slash (`""` for the root).
    pub base_path: String,
}

impl Upstream {
    /// Parses an absolute `http`/`https` (and, when `allow_ws`, `ws`/`wss`) URL.
    ///
    /// Takes e.g. `https://sfu.example.org/livekit/sfu` and returns `{tls: true, authority:
    /// "sfu.example.org:443", base_path: "/livekit/sfu"}`. The default port of the scheme is made
    /// explicit. Errors (as a reason string) when the URL has no host, another scheme, user
    /// info, a query or a fragment.
    pub fn parse(raw_url: &str, allow_ws: bool) -> Result<Self, String> {
        // Error messages show the URL without any user info (it may hold credentials).
        let url = &redact_user_info(raw_url);
        let uri: http::Uri = raw_url
            .parse()
            .map_err(|e| format!("`{url}` is not an absolute URL ({e})"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some("wss") if allow_ws => true,
            Some("ws") if allow_ws => false,
            _ => {
                let allowed = if allow_ws {
                    "ws, wss, http or https"
                } else {
                    "http or https"
                };
                return Err(format!("`{url}` must use the scheme {allowed}"));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{url}` must not contain user info"));
        }
        if authority.host().is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        if uri.query().is_some() || url.contains('#') {
            return Err(format!("`{url}` must not have a query or fragment"));
        }
        // The port, if written, must be 1-65535: never replaced by a guessed default.
        let written = authority.as_str();
        let port_text = if written.ends_with(']') {
            None // an IPv6 literal without port
        } else {
            match written.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') || host.ends_with(']') => Some(port),
                Some(_) => return Err(format!("`{url}` has an invalid authority")),
                None => None,
            }
        };
        let port = match port_text {
            None if tls => 443,
            None => 80,
            Some(digits) => match digits.parse::<u16>() {
                Ok(p) if p > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => p,
                _ => return Err(format!("`{url}` has an invalid port")),
            },
        };
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            tls,
            authority: format!("{}:{port}", authority.host()),
            base_path,
        })
    }
}

/// `scheme://user:pass@host/…` → `scheme://***@host/…`, for messages. Everything up to the
/// last `@` goes, so a password containing `/` or `?` cannot leak either.
fn redact_user_info(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***{}", rest.get(at..).unwrap_or_default()),
        None => url.to_owned(),
    }
}

/// Which users get `canPublish` (lk-jwt-service `LIVEKIT_FULL_ACCESS_HOMESERVERS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullAccess {
    /// `["*"]`: every homeserver is a full-access homeserver.
    Everyone,
    /// Exact (byte for byte) server names. A `*` among other entries is an ordinary entry that
    /// matches nothing, as in lk-jwt-service.
    Only(Vec<String>),
}

impl FullAccess {
    /// `true` when users of the server name `matrix_server_name` (exactly as the client sent it)
    /// are full-access users.
    pub fn allows(&self, matrix_server_name: &str) -> bool {
        match self {
            FullAccess::Everyone => true,
            FullAccess::Only(list) => list.iter().any(|s| s == matrix_server_name),
        }
    }
}

/// The inline token service, present when `livekitUrl` is configured.
#[derive(Debug, Clone)]
pub struct TokenService {
    /// `livekitUrl`, returned to clients verbatim.
    pub livekit_url: String,
    /// Where the LiveKit server API (Twirp `RoomService`) is reached.
    pub livekit_api: Upstream,
    /// LiveKit API key (`iss` of every LiveKit access token).
    pub api_key: String,
    /// LiveKit API secret (HS256 key).
    pub api_secret: Secret,
    /// Full-access homeservers.
    pub full_access: FullAccess,
    /// Per server name base URL overrides for the OpenID userinfo callout.
    pub homeservers: BTreeMap<String, Upstream>,
    /// Timeout of each callout, in milliseconds.
    pub callout_timeout_ms: u64,
    /// Lifetime of a client LiveKit access token, in seconds.
    pub token_lifetime_secs: u64,
    /// Envoy cluster for `https` callouts.
    pub envoy_tls_cluster: String,
    /// Envoy cluster for `http` callouts.
    pub envoy_plain_cluster: String,
    /// Envoy cluster for LiveKit server API callouts. A regular (static or DNS) cluster, not a
    /// dynamic forward proxy: Envoy 1.40 refuses a callout with a body while a dynamic
    /// forward proxy looks up a new host ("buffer limit … exceeded due to async host
    /// selection"), so the first CreateRoom to a new host would always fail.
    pub envoy_livekit_cluster: String,
    /// Which homeservers a client-supplied server name may make the proxy call.
    pub homeserver_policy: HomeserverPolicy,
    /// `insecureSkipVerify`: TEST ONLY. Homeserver certificates are not verified (Envoy: the
    /// `https` callouts go to `envoy_insecure_tls_cluster`). Logged as a warning at load.
    pub insecure_skip_verify: bool,
    /// Envoy cluster for `https` homeserver callouts when `insecure_skip_verify` is set.
    pub envoy_insecure_tls_cluster: String,
    /// `caFile` (Traefik build only): absolute path, inside the plugin's sandbox (Traefik
    /// `settings.mounts`), of a PEM bundle whose certificates are trusted for `https` callouts
    /// in addition to the bundled Mozilla roots. The Envoy build refuses it: there, the
    /// clusters' `validation_context` decides.
    pub ca_file: Option<String>,
    /// `dnsServer` (Traefik build only): a DNS server (`IPv4:port`, queried over TCP) that
    /// resolves the names callouts go to, instead of Traefik's resolver. The Envoy build
    /// refuses it: there, the dynamic forward proxy clusters' `dns_resolvers` decide.
    pub dns_server: Option<std::net::SocketAddrV4>,
    /// `csApiUrls`: per server name base URL of the Client-Server API, used by delayed-leave
    /// delegation instead of `.well-known/matrix/client` discovery (lk-jwt-service's CS API
    /// URL overrides).
    pub cs_api_urls: BTreeMap<String, Upstream>,
    /// `sanityCheckIntervalSecs`: period of the SFU participant lookup while a delayed-leave
    /// job's participant is connected, in milliseconds here (0: no periodic lookup).
    pub sanity_check_interval_ms: u64,
}

/// The validated plugin configuration shared by every request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Prefixes to strip, longest first so the most specific one wins.
    pub strip_prefixes: Vec<Prefix>,
    /// The inline token service, or `None` when only strip-prefix is on.
    pub token_service: Option<TokenService>,
    /// `logLevel`: the most verbose level the filter logs at (default `info`). The proxy's
    /// own log level applies on top (Envoy: `--component-log-level wasm:debug`).
    pub log_level: log::LevelFilter,
}

impl Settings {
    /// Parses and validates a plugin configuration.
    ///
    /// `json` is the configuration bytes (an empty document counts as `{}`); `env` looks up an
    /// environment variable by name (used for `livekitKeyEnv` / `livekitSecretEnv`).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first key at fault: not JSON, unknown key, wrong type, an
    /// invalid prefix, URL or server name, a missing required key, or an environment variable
    /// that is unset or empty.
    pub fn from_json(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw = parse_raw(json)?;
        let log_level = match raw.log_level.as_deref() {
            None | Some("info") => log::LevelFilter::Info,
            Some("error") => log::LevelFilter::Error,
            Some("warn") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            Some("trace") => log::LevelFilter::Trace,
            Some(other) => {
                return Err(ConfigError::new(
                    "logLevel",
                    format!(
                        "`{}` is not one of error, warn, info, debug, trace",
                        other.escape_debug()
                    ),
                ))
            }
        };
        let strip_prefixes = parse_prefixes(raw.strip_prefixes.as_deref().unwrap_or_default())?;
        let token_service = match raw.livekit_url.clone() {
            None => {
                refuse_token_keys_without_url(json)?;
                None
            }
            Some(url) => Some(parse_token_service(url, raw, env)?),
        };
        if strip_prefixes.is_empty() && token_service.is_none() {
            return Err(ConfigError::new(
                "stripPrefixes",
                "nothing to do: set stripPrefixes, livekitUrl, or both",
            ));
        }
        Ok(Self {
            strip_prefixes,
            token_service,
            log_level,
        })
    }
}

/// The keys of the plugin configuration, as written by operators.
const KEYS: [&str; 23] = [
    "stripPrefixes",
    "logLevel",
    "livekitUrl",
    "livekitKey",
    "livekitKeyEnv",
    "livekitSecret",
    "livekitSecretEnv",
    "fullAccessHomeservers",
    "livekitApiUrl",
    "homeservers",
    "calloutTimeoutMs",
    "tokenLifetimeSecs",
    "envoyTlsCluster",
    "envoyPlainCluster",
    "envoyLivekitCluster",
    "allowedHomeservers",
    "allowPrivateAddresses",
    "insecureSkipVerify",
    "envoyInsecureTlsCluster",
    "caFile",
    "dnsServer",
    "csApiUrls",
    "sanityCheckIntervalSecs",
];

/// serde_json's message without its "at line L column C" suffix.
fn reason_of(e: &serde_json::Error) -> String {
    let text = e.to_string();
    text.split(" at line ")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `"true"`/`"false"` as a JSON boolean, a string of decimal digits as a JSON number.
fn scalar_from_text(text: &str) -> Option<serde_json::Value> {
    match text {
        "true" => Some(true.into()),
        "false" => Some(false.into()),
        _ if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            text.parse::<u64>().ok().map(serde_json::Value::from)
        }
        _ => None,
    }
}

/// Takes `key` out of the object and deserializes it (`null` counts as absent).
fn field<T: serde::de::DeserializeOwned>(
    map: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<T>, ConfigError> {
    match map.remove(key) {
        None => Ok(None),
        Some(value) => {
            // Traefik's providers (file, Docker labels, Kubernetes CRDs) hand every scalar
            // option to the plugin as a string: "1500" for 1500, "true" for true. Where the
            // key expects a number or a boolean, a string that is exactly one is taken as it.
            let coerced = match &value {
                serde_json::Value::String(text) => scalar_from_text(text),
                _ => None,
            };
            serde_json::from_value::<Option<T>>(value).or_else(|e| match coerced {
                Some(v) => serde_json::from_value::<Option<T>>(v).map_err(|_| e),
                None => Err(e),
            })
        }
        .map_err(|e| {
            // serde quotes the offending value; never echo a secret.
            let reason = if key == "livekitSecret" {
                "must be a non-empty string (value not shown)".to_owned()
            } else {
                reason_of(&e)
            };
            ConfigError::new(key, reason)
        }),
    }
}

fn parse_raw(json: &[u8]) -> Result<RawConfig, ConfigError> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(RawConfig::default());
    }
    let mut map: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(json) {
        Ok(map) => map,
        Err(e) if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') => {
            let _ = e;
            return Err(ConfigError::new(
                "(json)",
                "the plugin configuration must be a JSON object",
            ));
        }
        Err(e) => return Err(ConfigError::new("(json)", reason_of(&e))),
    };
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        let key = if unknown.is_empty() {
            "(empty key)"
        } else {
            unknown
        };
        return Err(ConfigError::new(
            key,
            format!(
                "unknown field `{unknown}`, expected one of {}",
                KEYS.join(", ")
            ),
        ));
    }
    Ok(RawConfig {
        strip_prefixes: field(&mut map, "stripPrefixes")?,
        log_level: field(&mut map, "logLevel")?,
        livekit_url: field(&mut map, "livekitUrl")?,
        livekit_key: field(&mut map, "livekitKey")?,
        livekit_key_env: field(&mut map, "livekitKeyEnv")?,
        livekit_secret: field(&mut map, "livekitSecret")?,
        livekit_secret_env: field(&mut map, "livekitSecretEnv")?,
        full_access_homeservers: field(&mut map, "fullAccessHomeservers")?,
        livekit_api_url: field(&mut map, "livekitApiUrl")?,
        homeservers: field(&mut map, "homeservers")?,
        callout_timeout_ms: field(&mut map, "calloutTimeoutMs")?,
        token_lifetime_secs: field(&mut map, "tokenLifetimeSecs")?,
        envoy_tls_cluster: field(&mut map, "envoyTlsCluster")?,
        envoy_plain_cluster: field(&mut map, "envoyPlainCluster")?,
        envoy_livekit_cluster: field(&mut map, "envoyLivekitCluster")?,
        allowed_homeservers: field(&mut map, "allowedHomeservers")?,
        allow_private_addresses: field(&mut map, "allowPrivateAddresses")?,
        insecure_skip_verify: field(&mut map, "insecureSkipVerify")?,
        envoy_insecure_tls_cluster: field(&mut map, "envoyInsecureTlsCluster")?,
        ca_file: field(&mut map, "caFile")?,
        dns_server: field(&mut map, "dnsServer")?,
        cs_api_urls: field(&mut map, "csApiUrls")?,
        sanity_check_interval_secs: field(&mut map, "sanityCheckIntervalSecs")?,
    })
}

fn parse_prefixes(list: &[String]) -> Result<Vec<Prefix>, ConfigError> {
    let mut prefixes: Vec<Prefix> = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let key = format!("stripPrefixes[{i}]");
        let prefix = Prefix::parse(p).map_err(|reason| ConfigError::new(&key, reason))?;
        if prefixes.iter().any(|q| q.as_str() == prefix.as_str()) {
            return Err(ConfigError::new(key, format!("duplicate prefix `{p}`")));
        }
        prefixes.push(prefix);
    }
    prefixes.sort_by_key(|p| std::cmp::Reverse(p.as_str().len()));
    Ok(prefixes)
}

/// The proxy a plugin configuration is loaded by: a few keys only mean something to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// A proxy-wasm host (Envoy, Istio, Envoy Gateway): callouts go through Envoy clusters.
    Envoy,
    /// Traefik's http-wasm host: the plugin makes its own connections.
    Traefik,
}

/// Refuses keys that the given host would silently ignore: `caFile` in Envoy (the clusters'
/// `validation_context` decides what is trusted there) and the `envoy*Cluster` keys in Traefik
/// (there are no clusters). Takes the raw plugin configuration (a JSON object that
/// [`Settings::from_json`] accepted); the error names the key.
pub fn refuse_keys_of_other_host(json: &[u8], host: Host) -> Result<(), ConfigError> {
    let keys: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).unwrap_or_default();
    let foreign = keys.keys().find(|k| match host {
        Host::Envoy => matches!(k.as_str(), "caFile" | "dnsServer"),
        Host::Traefik => {
            k.starts_with("envoy") || matches!(k.as_str(), "csApiUrls" | "sanityCheckIntervalSecs")
        }
    });
    match (foreign, host) {
        (None, _) => Ok(()),
        (Some(key), Host::Envoy) if key == "caFile" => Err(ConfigError::new(
            key.as_str(),
            "only used by the Traefik plugin; in Envoy, put the CA into the callout cluster's \
             validation_context (trusted_ca)",
        )),
        (Some(key), Host::Envoy) => Err(ConfigError::new(
            key.as_str(),
            "only used by the Traefik plugin; in Envoy, set dns_resolvers on the dynamic \
             forward proxy clusters",
        )),
        (Some(key), Host::Traefik) if !key.starts_with("envoy") => Err(ConfigError::new(
            key.as_str(),
            "only used by delayed-leave delegation, which runs in the Envoy filter only: \
             Traefik's wasm host has no timers to keep a delayed event alive",
        )),
        (Some(key), Host::Traefik) => Err(ConfigError::new(
            key.as_str(),
            "only used by the Envoy filter; the Traefik plugin makes its own connections \
             (use caFile for a private CA)",
        )),
    }
}

/// Every key but `stripPrefixes` and `logLevel` belongs to the token service: refuse them without
/// `livekitUrl`, so a typo there cannot silently switch the token service off.
fn refuse_token_keys_without_url(json: &[u8]) -> Result<(), ConfigError> {
    let keys: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).unwrap_or_default();
    match keys
        .keys()
        .find(|k| !matches!(k.as_str(), "stripPrefixes" | "logLevel"))
    {
        Some(key) => Err(ConfigError::new(
            key.as_str(),
            "only meaningful for the token service, which is off because livekitUrl is not set",
        )),
        None => Ok(()),
    }
}

fn parse_token_service(
    livekit_url: String,
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TokenService, ConfigError> {
    let derived_api = Upstream::parse(&livekit_url, true)
        .map_err(|reason| ConfigError::new("livekitUrl", reason))?;
    let livekit_api = match &raw.livekit_api_url {
        Some(url) => Upstream::parse(url, false)
            .map_err(|reason| ConfigError::new("livekitApiUrl", reason))?,
        None => derived_api,
    };
    let api_key = inline_or_env(
        ("livekitKey", raw.livekit_key),
        ("livekitKeyEnv", raw.livekit_key_env),
        env,
    )?;
    let api_secret = Secret::new(inline_or_env(
        ("livekitSecret", raw.livekit_secret),
        ("livekitSecretEnv", raw.livekit_secret_env),
        env,
    )?);
    let full_access = parse_full_access(raw.full_access_homeservers)?;
    let homeservers = server_name_urls("homeservers", raw.homeservers)?;
    let cs_api_urls = server_name_urls("csApiUrls", raw.cs_api_urls)?;
    let sanity_check_interval_secs = raw
        .sanity_check_interval_secs
        .unwrap_or(DEFAULT_SANITY_CHECK_INTERVAL_SECS);
    if sanity_check_interval_secs > 3_600 {
        return Err(ConfigError::new(
            "sanityCheckIntervalSecs",
            "must be between 0 (off) and 3600 (seconds)",
        ));
    }
    let callout_timeout_ms = raw.callout_timeout_ms.unwrap_or(DEFAULT_CALLOUT_TIMEOUT_MS);
    if !(1..=MAX_CALLOUT_TIMEOUT_MS).contains(&callout_timeout_ms) {
        return Err(ConfigError::new(
            "calloutTimeoutMs",
            format!("must be between 1 and {MAX_CALLOUT_TIMEOUT_MS} (milliseconds)"),
        ));
    }
    let token_lifetime_secs = raw
        .token_lifetime_secs
        .unwrap_or(DEFAULT_TOKEN_LIFETIME_SECS);
    if !(60..=86_400).contains(&token_lifetime_secs) {
        return Err(ConfigError::new(
            "tokenLifetimeSecs",
            "must be between 60 and 86400 (seconds)",
        ));
    }
    let envoy_tls_cluster = cluster_name(
        "envoyTlsCluster",
        raw.envoy_tls_cluster,
        DEFAULT_ENVOY_TLS_CLUSTER,
    )?;
    let envoy_plain_cluster = cluster_name(
        "envoyPlainCluster",
        raw.envoy_plain_cluster,
        DEFAULT_ENVOY_PLAIN_CLUSTER,
    )?;
    let envoy_livekit_cluster = cluster_name(
        "envoyLivekitCluster",
        raw.envoy_livekit_cluster,
        DEFAULT_ENVOY_LIVEKIT_CLUSTER,
    )?;
    let homeserver_policy = HomeserverPolicy {
        allowed: parse_allowed(raw.allowed_homeservers)?,
        allow_private: raw.allow_private_addresses.unwrap_or(false),
    };
    let insecure_skip_verify = raw.insecure_skip_verify.unwrap_or(false);
    let envoy_insecure_tls_cluster = cluster_name(
        "envoyInsecureTlsCluster",
        raw.envoy_insecure_tls_cluster,
        DEFAULT_ENVOY_INSECURE_TLS_CLUSTER,
    )?;
    if let Some(path) = &raw.ca_file {
        if !path.starts_with('/') || path.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "caFile",
                "must be an absolute path (a file in a directory given to the plugin with \
                 Traefik's settings.mounts)",
            ));
        }
    }
    let dns_server = match &raw.dns_server {
        None => None,
        Some(text) => Some(text.parse::<std::net::SocketAddrV4>().map_err(|_| {
            ConfigError::new(
                "dnsServer",
                format!(
                    "`{}` is not an IPv4 address with a port",
                    text.escape_debug()
                ),
            )
        })?),
    };
    if insecure_skip_verify {
        log::warn!(
            "insecureSkipVerify is set: homeserver TLS certificates are NOT verified, so anyone \
             on the path can vouch for any Matrix user. Use this in tests only."
        );
    }
    Ok(TokenService {
        livekit_url,
        livekit_api,
        api_key,
        api_secret,
        full_access,
        homeservers,
        callout_timeout_ms,
        token_lifetime_secs,
        envoy_tls_cluster,
        envoy_plain_cluster,
        envoy_livekit_cluster,
        homeserver_policy,
        insecure_skip_verify,
        envoy_insecure_tls_cluster,
        ca_file: raw.ca_file,
        dns_server,
        cs_api_urls,
        sanity_check_interval_ms: sanity_check_interval_secs * 1_000,
    })
}

/// A `{server name: base URL}` map (`homeservers`, `csApiUrls`); errors name `key.<server>`.
fn server_name_urls(
    key: &str,
    map: Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, Upstream>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, url) in map.unwrap_or_default() {
        let key = format!("{key}.{name}");
        ServerName::parse(&name).map_err(|reason| {
            ConfigError::new(
                &key,
                format!("`{name}` is not a valid server name: {reason}"),
            )
        })?;
        let upstream = Upstream::parse(&url, false).map_err(|r| ConfigError::new(&key, r))?;
        out.insert(name, upstream);
    }
    Ok(out)
}

/// Exactly one of an inline value and the name of an environment variable holding it.
fn inline_or_env(
    (inline_key, inline): (&str, Option<String>),
    (env_key, var): (&str, Option<String>),
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    match (inline, var) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            inline_key,
            format!("set either {inline_key} or {env_key}, not both"),
        )),
        (None, None) => Err(ConfigError::new(
            inline_key,
            format!(
                "required when livekitUrl is set (or name an environment variable in {env_key})"
            ),
        )),
        (Some(v), None) if v.trim().is_empty() => {
            Err(ConfigError::new(inline_key, "must not be empty"))
        }
        (None, Some(name))
            if name.is_empty()
                || name.len() > 128
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            // Not echoed: an operator may have pasted the secret itself here.
            Err(ConfigError::new(
                env_key,
                "must be the name of an environment variable (letters, digits, `_`), not a value",
            ))
        }
        (Some(v), None) => Ok(v),
        (None, Some(name)) => match env(&name) {
            Some(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
            Some(_) => Err(ConfigError::new(
                env_key,
                format!("environment variable `{name}` is empty"),
            )),
            None => Err(ConfigError::new(
                env_key,
                format!(
                    "environment variable `{name}` is not set or not visible to the filter \
                     (Envoy: list it in vm_config.environment_variables.host_env_keys)"
                ),
            )),
        },
    }
}

fn parse_full_access(list: Option<Vec<String>>) -> Result<FullAccess, ConfigError> {
    const KEY: &str = "fullAccessHomeservers";
    let list = list.ok_or_else(|| {
        ConfigError::new(
            KEY,
            "required when livekitUrl is set (use [\"*\"] for everyone)",
        )
    })?;
    if list.is_empty() {
        return Err(ConfigError::new(
            KEY,
            "must not be empty (list server names, or [\"*\"] for everyone)",
        ));
    }
    if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
        return Err(ConfigError::new(format!("{KEY}[{i}]"), "must not be empty"));
    }
    if list.len() == 1 && list.first().is_some_and(|s| s == "*") {
        return Ok(FullAccess::Everyone);
    }
    if list.iter().any(|s| s == "*") {
        log::warn!(
            "{KEY}: \"*\" only means everyone as the sole entry; among other entries it matches nothing"
        );
    }
    Ok(FullAccess::Only(list))
}

/// `allowedHomeservers`: server names, or `*.` followed by a server name for its subdomains.
fn parse_allowed(list: Option<Vec<String>>) -> Result<Option<Vec<String>>, ConfigError> {
    const KEY: &str = "allowedHomeservers";
    let Some(list) = list else { return Ok(None) };
    if list.is_empty() {
        return Err(ConfigError::new(
            KEY,
            "must not be empty (leave it out to allow every public homeserver)",
        ));
    }
    for (i, entry) in list.iter().enumerate() {
        let name = entry.strip_prefix("*.").unwrap_or(entry);
        ServerName::parse(name).map_err(|reason| {
            ConfigError::new(
                format!("{KEY}[{i}]"),
                format!("`{entry}` is not a server name or `*.` pattern: {reason}"),
            )
        })?;
    }
    Ok(Some(list))
}

fn cluster_name(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    match value {
        None => Ok(default.to_owned()),
        Some(v) if v.trim().is_empty() => Err(ConfigError::new(key, "must not be empty")),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_of_the_other_host_are_refused_by_name() {
        let envoy_only = br#"{"stripPrefixes":["/p"],"envoyTlsCluster":"x"}"#;
        let traefik_only = br#"{"stripPrefixes":["/p"],"caFile":"/ca/ca.pem"}"#;
        assert_eq!(
            super::refuse_keys_of_other_host(envoy_only, super::Host::Envoy),
            Ok(())
        );
        assert_eq!(
            super::refuse_keys_of_other_host(traefik_only, super::Host::Traefik),
            Ok(())
        );
        let e = super::refuse_keys_of_other_host(envoy_only, super::Host::Traefik).unwrap_err();
        assert_eq!(e.key, "envoyTlsCluster");
        let e = super::refuse_keys_of_other_host(traefik_only, super::Host::Envoy).unwrap_err();
        assert_eq!(e.key, "caFile");
        assert!(e.reason.contains("trusted_ca"), "{}", e.reason);
        let dns = br#"{"stripPrefixes":["/p"],"dnsServer":"127.0.0.1:53"}"#;
        let e = super::refuse_keys_of_other_host(dns, super::Host::Envoy).unwrap_err();
        assert_eq!(e.key, "dnsServer");
        assert!(e.reason.contains("dns_resolvers"), "{}", e.reason);
        let jobs = br#"{"stripPrefixes":["/p"],"sanityCheckIntervalSecs":5}"#;
        let e = super::refuse_keys_of_other_host(jobs, super::Host::Traefik).unwrap_err();
        assert_eq!(e.key, "sanityCheckIntervalSecs");
        assert!(e.reason.contains("no timers"), "{}", e.reason);
        assert_eq!(
            super::refuse_keys_of_other_host(jobs, super::Host::Envoy),
            Ok(())
        );
    }

    #[test]
    fn dns_server_is_an_ipv4_socket_address() {
        let s = parse(&format!(r#"{{{TOKEN},"dnsServer":"127.0.0.1:5353"}}"#)).unwrap();
        assert_eq!(
            s.token_service.unwrap().dns_server,
            Some("127.0.0.1:5353".parse().unwrap())
        );
        for bad in ["127.0.0.1", "dns.example:53", "[::1]:53", ""] {
            refused(
                &format!(r#"{{{TOKEN},"dnsServer":"{bad}"}}"#),
                "dnsServer",
                "is not an IPv4 address with a port",
            );
        }
    }

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(json: &str) -> Result<Settings, ConfigError> {
        Settings::from_json(json.as_bytes(), &no_env)
    }

    #[track_caller]
    fn refused(json: &str, key: &str, reason_contains: &str) {
        let err = parse(json).expect_err("configuration must be refused");
        assert_eq!(err.key, key, "{err}");
        assert!(
            err.reason.contains(reason_contains),
            "reason `{}` lacks `{reason_contains}`",
            err.reason
        );
    }

    const TOKEN: &str = r#""livekitUrl":"wss://sfu.example.org/livekit/sfu","livekitKey":"devkey","livekitSecret":"s3cret","fullAccessHomeservers":["example.org"]"#;

    #[test]
    fn strip_only_configuration() {
        let s = parse(r#"{"stripPrefixes":["/livekit-jwt-service/"]}"#).unwrap();
        assert_eq!(s.strip_prefixes[0].as_str(), "/livekit-jwt-service");
        assert!(s.token_service.is_none());
    }

    #[test]
    fn log_level() {
        let s = parse(r#"{"stripPrefixes":["/a"],"logLevel":"debug"}"#).unwrap();
        assert_eq!(s.log_level, log::LevelFilter::Debug);
        assert_eq!(
            parse(r#"{"stripPrefixes":["/a"]}"#).unwrap().log_level,
            log::LevelFilter::Info
        );
        refused(
            r#"{"stripPrefixes":["/a"],"logLevel":"loud"}"#,
            "logLevel",
            "not one of",
        );
    }

    #[test]
    fn numbers_and_booleans_as_strings_as_traefik_sends_them() {
        let s = parse(&format!(
            r#"{{{TOKEN},"calloutTimeoutMs":"1500","allowPrivateAddresses":"true"}}"#
        ))
        .unwrap();
        let t = s.token_service.unwrap();
        assert_eq!(t.callout_timeout_ms, 1500);
        assert!(t.homeserver_policy.allow_private);
        for bad in [r#""1500 ""#, r#""15x""#, r#""null""#, r#""""#] {
            refused(
                &format!(r#"{{{TOKEN},"calloutTimeoutMs":{bad}}}"#),
                "calloutTimeoutMs",
                "expected u64",
            );
        }
        refused(
            &format!(r#"{{{TOKEN},"allowPrivateAddresses":"yes"}}"#),
            "allowPrivateAddresses",
            "expected a boolean",
        );
    }

    #[test]
    fn prefixes_sorted_longest_first() {
        let s = parse(r#"{"stripPrefixes":["/a","/a/b","/abc/d"]}"#).unwrap();
        let got: Vec<_> = s.strip_prefixes.iter().map(Prefix::as_str).collect();
        assert_eq!(got, ["/abc/d", "/a/b", "/a"]);
    }

    #[test]
    fn token_service_defaults() {
        let s = parse(&format!("{{{TOKEN}}}")).unwrap();
        let t = s.token_service.unwrap();
        assert_eq!(t.livekit_url, "wss://sfu.example.org/livekit/sfu");
        assert_eq!(
            t.livekit_api,
            Upstream {
                tls: true,
                authority: "sfu.example.org:443".into(),
                base_path: "/livekit/sfu".into()
            }
        );
        assert_eq!(t.callout_timeout_ms, 5000);
        assert_eq!(t.token_lifetime_secs, 3600);
        assert_eq!(t.envoy_tls_cluster, "matrixrtc_callout_tls");
        assert_eq!(t.envoy_livekit_cluster, "matrixrtc_livekit");
        assert!(!t.insecure_skip_verify);
        assert_eq!(
            t.envoy_insecure_tls_cluster,
            "matrixrtc_callout_tls_insecure"
        );
        assert_eq!(t.full_access, FullAccess::Only(vec!["example.org".into()]));
        assert_eq!(format!("{:?}", t.api_secret), "Secret(<redacted>)");
    }

    #[test]
    fn ws_url_derives_plain_http_api() {
        let s = parse(r#"{"livekitUrl":"ws://127.0.0.1:7880","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"]}"#).unwrap();
        let t = s.token_service.unwrap();
        assert_eq!(t.livekit_api.authority, "127.0.0.1:7880");
        assert!(!t.livekit_api.tls);
        assert_eq!(t.livekit_api.base_path, "");
        assert_eq!(t.full_access, FullAccess::Everyone);
    }

    #[test]
    fn api_url_override_and_homeservers() {
        let s = parse(&format!(
            r#"{{{TOKEN},"livekitApiUrl":"http://[::1]:7880/","homeservers":{{"example.org":"http://synapse:8008/base/"}}}}"#
        ))
        .unwrap();
        let t = s.token_service.unwrap();
        assert_eq!(t.livekit_api.authority, "[::1]:7880");
        assert_eq!(
            t.homeservers["example.org"],
            Upstream {
                tls: false,
                authority: "synapse:8008".into(),
                base_path: "/base".into()
            }
        );
    }

    #[test]
    fn delayed_leave_keys() {
        let s = parse(&format!(
            r#"{{{TOKEN},"csApiUrls":{{"example.org":"https://matrix.example.org/"}},"sanityCheckIntervalSecs":"5"}}"#
        ))
        .unwrap();
        let t = s.token_service.unwrap();
        assert_eq!(
            t.cs_api_urls["example.org"].authority,
            "matrix.example.org:443"
        );
        assert_eq!(t.sanity_check_interval_ms, 5_000);
        let t = parse(&format!("{{{TOKEN}}}"))
            .unwrap()
            .token_service
            .unwrap();
        assert_eq!(t.sanity_check_interval_ms, 30_000);
        assert!(t.cs_api_urls.is_empty());
        refused(
            &format!(r#"{{{TOKEN},"csApiUrls":{{"bad name!":"https://x"}}}}"#),
            "csApiUrls.bad name!",
            "not a valid server name",
        );
        refused(
            &format!(r#"{{{TOKEN},"csApiUrls":{{"example.org":"ftp://x"}}}}"#),
            "csApiUrls.example.org",
            "http",
        );
        refused(
            &format!(r#"{{{TOKEN},"sanityCheckIntervalSecs":3601}}"#),
            "sanityCheckIntervalSecs",
            "3600",
        );
    }

    #[test]
    fn secrets_from_environment() {
        let env = |name: &str| match name {
            "LIVEKIT_KEY" => Some("envkey".to_owned()),
            "LIVEKIT_SECRET" => Some("envsecret\n".to_owned()),
            _ => None,
        };
        let json = r#"{"livekitUrl":"wss://x","livekitKeyEnv":"LIVEKIT_KEY","livekitSecretEnv":"LIVEKIT_SECRET","fullAccessHomeservers":["*"]}"#;
        let t = Settings::from_json(json.as_bytes(), &env)
            .unwrap()
            .token_service
            .unwrap();
        assert_eq!(t.api_key, "envkey");
        assert_eq!(t.api_secret.expose(), b"envsecret");
    }

    #[test]
    fn empty_document_has_nothing_to_do() {
        refused("", "stripPrefixes", "nothing to do");
        refused("{}", "stripPrefixes", "nothing to do");
    }

    #[test]
    fn not_json_and_trailing_data() {
        refused("not json", "(json)", "must be a JSON object");
        refused("{not json", "(json)", "key must be a string");
        refused(r#"{"stripPrefixes":["/a"]} x"#, "(json)", "trailing");
        refused(r#"[["/a"]]"#, "(json)", "must be a JSON object");
    }

    #[test]
    fn fuzz_regression_empty_key_is_named() {
        // Found by scripts/fuzz.sh (plugin_config): an empty key followed by garbage gave an
        // error with an empty key name.
        let err = parse("{  \"\"   \u{5}\0\0\0\0\0 /\u{4}\n").unwrap_err();
        assert_eq!(err.key, "(json)");
        assert!(!err.reason.is_empty());
        let err = parse(r#"{"":1}"#).unwrap_err();
        assert!(
            !err.key.is_empty() && err.reason.contains("unknown field"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        refused(
            r#"{"stripPrefix":["/a"]}"#,
            "stripPrefix",
            "unknown field `stripPrefix`",
        );
    }

    #[test]
    fn wrong_type_is_named() {
        refused(
            &format!(r#"{{{TOKEN},"calloutTimeoutMs":"5s"}}"#),
            "calloutTimeoutMs",
            "invalid type: string",
        );
        refused(r#"{"stripPrefixes":"/a"}"#, "stripPrefixes", "invalid type");
        refused(r#"{"stripPrefixes":[1]}"#, "stripPrefixes", "invalid type");
        // `null` counts as absent.
        assert!(parse(r#"{"stripPrefixes":["/a"],"logLevel":null}"#).is_ok());
    }

    #[test]
    fn invalid_prefixes() {
        refused(
            r#"{"stripPrefixes":["/"]}"#,
            "stripPrefixes[0]",
            "`/` alone",
        );
        refused(
            r#"{"stripPrefixes":["//"]}"#,
            "stripPrefixes[0]",
            "`/` alone",
        );
        refused(
            r#"{"stripPrefixes":["a"]}"#,
            "stripPrefixes[0]",
            "must start with `/`",
        );
        refused(
            r#"{"stripPrefixes":["/a","/a/"]}"#,
            "stripPrefixes[1]",
            "duplicate",
        );
        refused(r#"{"stripPrefixes":["/a?b"]}"#, "stripPrefixes[0]", "`?`");
        refused(
            r#"{"stripPrefixes":["/a//b"]}"#,
            "stripPrefixes[0]",
            "empty segment",
        );
    }

    #[test]
    fn missing_secret_is_named() {
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","fullAccessHomeservers":["*"]}"#,
            "livekitSecret",
            "required",
        );
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecretEnv":"NOPE","fullAccessHomeservers":["*"]}"#,
            "livekitSecretEnv",
            "`NOPE` is not set",
        );
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"a","livekitSecretEnv":"B","fullAccessHomeservers":["*"]}"#,
            "livekitSecret",
            "not both",
        );
    }

    #[test]
    fn secret_value_never_in_error_messages() {
        let err = parse(r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":987654321987654,"fullAccessHomeservers":["*"]}"#).unwrap_err();
        assert_eq!(err.key, "livekitSecret");
        assert!(!err.to_string().contains("987654321987654"), "{err}");
        let err = parse(&format!(
            r#"{{{TOKEN},"homeservers":{{"example.org":"https://u:p4ss@h/x"}}}}"#
        ))
        .unwrap_err();
        assert!(!err.to_string().contains("p4ss"), "{err}");
        assert!(err.to_string().contains("https://***@h/x"), "{err}");
        let err = parse(r#"{"livekitUrl":"ftp://u:p4ss@h","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"]}"#).unwrap_err();
        assert!(!err.to_string().contains("p4ss"), "{err}");
    }

    #[test]
    fn attack_review_config_findings() {
        // Ports are validated, never replaced by a default.
        for bad in [
            "https://h:78x0",
            "https://h:abc",
            "https://h:99999",
            "https://h:",
            "https://h:0",
        ] {
            let err = parse(&format!(r#"{{{TOKEN},"livekitApiUrl":"{bad}"}}"#)).unwrap_err();
            assert_eq!(err.key, "livekitApiUrl", "{bad}");
        }
        // A password with `/` is refused and not echoed.
        let err = parse(&format!(
            r#"{{{TOKEN},"livekitApiUrl":"https://user:pw/x@h.example"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.key, "livekitApiUrl");
        assert!(!err.to_string().contains("pw"), "{err}");
        // A secret pasted as an environment variable name is not echoed.
        let err = parse(r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecretEnv":"s3cr3t-v@lue!","fullAccessHomeservers":["*"]}"#).unwrap_err();
        assert_eq!(err.key, "livekitSecretEnv");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        // Whitespace is no secret.
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"  ","fullAccessHomeservers":["*"]}"#,
            "livekitSecret",
            "must not be empty",
        );
        // No raw newline in a message.
        let err = parse("{\"stripPrefixes\":[\"/a\"],\"logLevel\":\"x\\ny\"}").unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
        // Valid ports and IPv6 still work.
        assert!(parse(&format!(
            r#"{{{TOKEN},"livekitApiUrl":"http://[::1]:7880/x"}}"#
        ))
        .is_ok());
        assert!(parse(&format!(
            r#"{{{TOKEN},"livekitApiUrl":"https://h.example"}}"#
        ))
        .is_ok());
        let t = parse(&format!(r#"{{{TOKEN},"livekitApiUrl":"http://[::1]/x"}}"#)).unwrap();
        assert_eq!(t.token_service.unwrap().livekit_api.authority, "[::1]:80");
    }

    #[test]
    fn secret_value_never_in_error() {
        let err = parse(r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"hunter2","livekitSecretEnv":"B","fullAccessHomeservers":["*"]}"#).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn full_access_rules() {
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"s"}"#,
            "fullAccessHomeservers",
            "required",
        );
        refused(
            r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":[]}"#,
            "fullAccessHomeservers",
            "must not be empty",
        );
        let s = parse(r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*","example.org"]}"#).unwrap();
        let fa = s.token_service.unwrap().full_access;
        assert!(fa.allows("example.org"));
        assert!(!fa.allows("other.example"));
        assert!(!fa.allows("Example.org"));
        assert!(!fa.allows("example.org:8448"));
    }

    #[test]
    fn invalid_urls() {
        refused(
            r#"{"livekitUrl":"sfu.example.org","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"]}"#,
            "livekitUrl",
            "scheme",
        );
        refused(
            &format!(r#"{{{TOKEN},"livekitApiUrl":"wss://x"}}"#),
            "livekitApiUrl",
            "http or https",
        );
        refused(
            &format!(r#"{{{TOKEN},"homeservers":{{"example.org":"http://h:1/?q"}}}}"#),
            "homeservers.example.org",
            "query",
        );
        refused(
            &format!(r#"{{{TOKEN},"homeservers":{{"bad name!":"http://h:1"}}}}"#),
            "homeservers.bad name!",
            "not a valid server name",
        );
    }

    #[test]
    fn bounds() {
        refused(
            &format!(r#"{{{TOKEN},"calloutTimeoutMs":0}}"#),
            "calloutTimeoutMs",
            "between",
        );
        refused(
            &format!(r#"{{{TOKEN},"calloutTimeoutMs":-1}}"#),
            "calloutTimeoutMs",
            "invalid value",
        );
        refused(
            &format!(r#"{{{TOKEN},"tokenLifetimeSecs":5}}"#),
            "tokenLifetimeSecs",
            "between",
        );
        refused(
            &format!(r#"{{{TOKEN},"envoyTlsCluster":""}}"#),
            "envoyTlsCluster",
            "empty",
        );
    }

    #[test]
    fn homeserver_policy() {
        let t = parse(&format!("{{{TOKEN}}}"))
            .unwrap()
            .token_service
            .unwrap();
        assert_eq!(t.homeserver_policy, HomeserverPolicy::default());
        let t = parse(&format!(
            r#"{{{TOKEN},"allowedHomeservers":["example.org","*.example.net"],"allowPrivateAddresses":true}}"#
        ))
        .unwrap()
        .token_service
        .unwrap();
        assert!(t.homeserver_policy.allow_private);
        assert_eq!(t.homeserver_policy.allowed.unwrap().len(), 2);
        refused(
            &format!(r#"{{{TOKEN},"allowedHomeservers":[]}}"#),
            "allowedHomeservers",
            "must not be empty",
        );
        refused(
            &format!(r#"{{{TOKEN},"allowedHomeservers":["ok.org","*"]}}"#),
            "allowedHomeservers[1]",
            "not a server name",
        );
        refused(
            &format!(r#"{{{TOKEN},"allowPrivateAddresses":"yes"}}"#),
            "allowPrivateAddresses",
            "invalid type",
        );
    }

    #[test]
    fn test_only_keys_without_url_refused() {
        refused(
            r#"{"stripPrefixes":["/p"],"insecureSkipVerify":true}"#,
            "insecureSkipVerify",
            "livekitUrl is not set",
        );
        refused(
            r#"{"stripPrefixes":["/p"],"envoyInsecureTlsCluster":"x"}"#,
            "envoyInsecureTlsCluster",
            "livekitUrl is not set",
        );
    }

    #[test]
    fn token_keys_without_url_refused() {
        refused(
            r#"{"stripPrefixes":["/a"],"livekitSecret":"s"}"#,
            "livekitSecret",
            "livekitUrl is not set",
        );
    }
}
