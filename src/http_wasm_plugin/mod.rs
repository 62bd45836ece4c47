//! The http-wasm adapter (Traefik middleware plugin): one handler per plugin instance that
//! turns the core's decisions into http-wasm host calls, and runs the token exchange with
//! blocking callouts made by [`transport`].
//!
//! The same [`crate::exchange`] rules as the Envoy build: strip-prefix, local answers, and the
//! token endpoints (request body read in the guest, `.well-known` discovery, OpenID userinfo,
//! LiveKit CreateRoom, LiveKit access token). Differences, all forced by the host: callouts
//! block the instance that makes them (Traefik keeps a pool of instances); the `.well-known`
//! cache is per instance; there are no metrics (http-wasm has no metrics ABI).

pub mod transport;

use std::time::{SystemTime, UNIX_EPOCH};

use http_wasm_guest::host::{admin, Request, Response};
use http_wasm_guest::Guest;

use crate::config::{self, Host, Settings};
use crate::discovery::MemoryCache;
use crate::exchange::{self, CalloutResult, Decision, Step, TokenExchange, MAX_REQUEST_BODY_BYTES};
use crate::logging::{self, loggable_request_id, set_request_id};
use crate::matrix::MatrixError;
use crate::requests::TokenEndpoint;
use crate::response::LocalResponse;
use transport::Transport;

/// Most `.well-known` results one plugin instance keeps; when full, the cache starts over.
const CACHE_ENTRIES: usize = 1024;

/// http-wasm log levels (`log` host function).
const LEVEL_DEBUG: i32 = -1;
const LEVEL_INFO: i32 = 0;
const LEVEL_WARN: i32 = 1;
const LEVEL_ERROR: i32 = 2;

/// Logs through the host ([`crate::logging::line`]: prefixed with the request id).
static LOGGER: logging::HostLog = logging::HostLog(|level, text| {
    let level = match level {
        log::Level::Error => LEVEL_ERROR,
        log::Level::Warn => LEVEL_WARN,
        log::Level::Info => LEVEL_INFO,
        log::Level::Debug | log::Level::Trace => LEVEL_DEBUG,
    };
    http_wasm_guest::host::log::write(level, text.as_bytes());
});

/// Reads and validates the plugin configuration (the middleware's options) and, with the token
/// service on, the TLS trust (`caFile`), then registers the handler. An invalid configuration
/// is logged with the key and the module exits with a failure, so Traefik refuses the
/// middleware instead of running it on defaults.
pub fn register() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| {
        http_wasm_guest::host::log::write(LEVEL_ERROR, format!("panic: {info}").as_bytes());
    }));
    let config = admin::config();
    let parsed = Settings::from_json(&config, &|name| std::env::var(name).ok())
        .and_then(|s| config::refuse_keys_of_other_host(&config, Host::Traefik).map(|()| s))
        .and_then(|settings| {
            let transport = match &settings.token_service {
                Some(service) => Some(Transport::new(service, &|path| std::fs::read(path))?),
                None => None,
            };
            Ok((settings, transport))
        });
    match parsed {
        Ok((settings, transport)) => {
            log::set_max_level(settings.log_level);
            let prefixes: Vec<&str> = settings.strip_prefixes.iter().map(|p| p.as_str()).collect();
            match &settings.token_service {
                Some(t) => log::info!(
                    "configured: stripPrefixes {prefixes:?}; token service on, LiveKit API {}://{}{}",
                    if t.livekit_api.tls { "https" } else { "http" },
                    t.livekit_api.authority,
                    t.livekit_api.base_path,
                ),
                None => log::info!("configured: stripPrefixes {prefixes:?}; token service off"),
            }
            http_wasm_guest::register(Plugin {
                settings,
                transport,
                cache: MemoryCache::new(CACHE_ENTRIES),
            });
        }
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    }
}

struct Plugin {
    settings: Settings,
    transport: Option<Transport>,
    /// `.well-known` results of this instance (http-wasm has no shared data).
    cache: MemoryCache,
}

fn respond(response: &Response, r: &LocalResponse) -> (bool, i32) {
    // Traefik drops headers set after the status (measured on 3.7.15): headers first.
    for (name, value) in &r.headers {
        response.header.set(name.as_bytes(), value.as_bytes());
    }
    response.set_status(i32::from(r.status));
    if !r.body.is_empty() {
        response.body.write(&r.body);
    }
    (false, 0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The whole request body, or `None` when it is larger than [`MAX_REQUEST_BODY_BYTES`]
/// (declared or read).
fn read_body(request: &Request) -> Option<Vec<u8>> {
    let declared = request
        .header
        .get(b"content-length")
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES) {
        return None;
    }
    let mut body = Vec::new();
    for chunk in request.body.read_iter() {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_REQUEST_BODY_BYTES {
            return None;
        }
    }
    Some(body)
}

impl Plugin {
    /// Runs a token exchange to its answer: reads the body, then makes each callout the state
    /// machine asks for, blocking, until it answers.
    ///
    /// Delayed-leave delegation needs timers, which http-wasm guests do not get: the
    /// delegation endpoints answer 404 `M_UNRECOGNIZED` and delay parameters 400
    /// `M_BAD_JSON`, both saying delegation is not available here (README "Delayed leave
    /// delegation").
    fn token_request(&self, endpoint: TokenEndpoint, request: &Request) -> LocalResponse {
        let (Some(service), Some(transport)) = (&self.settings.token_service, &self.transport)
        else {
            return LocalResponse::error(MatrixError::UNRECOGNIZED);
        };
        if exchange::needs_job_service(endpoint) {
            log::warn!(
                "{endpoint:?} asked: delayed-leave delegation needs timers, which Traefik's \
                 wasm host does not give plugins; run it in Envoy or lk-jwt-service"
            );
            return LocalResponse::error(MatrixError::DELEGATION_ENDPOINT_UNAVAILABLE);
        }
        let Some(body) = read_body(request) else {
            log::info!("token request refused: body larger than {MAX_REQUEST_BODY_BYTES} bytes");
            return LocalResponse::error(MatrixError::TOO_LARGE);
        };
        let (mut exchange, mut step) =
            TokenExchange::start(service, endpoint, &body, &self.cache, now_secs(), || false);
        loop {
            match step {
                Step::Respond(r) => return r,
                // Not reached: this exchange never delegates.
                Step::Handover { .. } => {
                    return LocalResponse::error(MatrixError::DELEGATION_FAILED)
                }
                Step::Callout(c) => {
                    let answer = transport.fetch(&c, exchange.max_callout_body());
                    let result = match &answer {
                        Ok(a) => CalloutResult {
                            status: Some(a.status),
                            body: &a.body,
                            cache_control: a.cache_control.as_deref(),
                            detail: "",
                        },
                        Err(detail) => CalloutResult {
                            status: None,
                            body: &[],
                            cache_control: None,
                            detail,
                        },
                    };
                    step = exchange.on_callout_response(service, result, &self.cache, now_secs());
                }
            }
        }
    }
}

impl Guest for Plugin {
    fn handle_request(&self, request: &Request, response: &Response) -> (bool, i32) {
        let uri = request.uri();
        let Ok(uri) = std::str::from_utf8(&uri) else {
            return (true, 0);
        };
        // The method is read only for the token endpoints: one host call less per request.
        let method = || String::from_utf8(request.method().to_vec()).ok();
        match exchange::route_lazy(&self.settings, uri, method) {
            Decision::PassThrough => (true, 0),
            Decision::Forward { prefix, target } => {
                request.set_uri(target.as_bytes());
                request
                    .header
                    .set(b"X-Forwarded-Prefix", prefix.as_str().as_bytes());
                (true, 0)
            }
            Decision::Respond(r) => respond(response, &r),
            Decision::ReadBody(endpoint) => {
                let id = request
                    .header
                    .get(b"x-request-id")
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                set_request_id(loggable_request_id(id));
                log::debug!("token request to {endpoint:?}: reading the body");
                let answer = self.token_request(endpoint, request);
                set_request_id(None);
                respond(response, &answer)
            }
        }
    }
}
