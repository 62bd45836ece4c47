//! The http-wasm adapter (Traefik middleware plugin): one handler per plugin instance that
//! turns the core's decisions into http-wasm host calls.
//!
//! Status: strip-prefix is complete. The token service is refused at load for now (see
//! [`register`]); the exchange below is wired to the core and to a callout client stub
//! ([`client`]) so the next step is the transport (WasmEdge sockets, non-blocking with poll for
//! timeouts, rustls with the RustCrypto provider) and a fix for the body-read trap.
//!
//! Differences from the proxy-wasm build, all from the host: an instance handles one request at
//! a time and blocks while it waits for a callout (Traefik keeps a pool of instances); there is
//! no data shared between instances, so the `.well-known` cache is per instance.

mod client;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http_wasm_guest::host::{admin, Request, Response};
use http_wasm_guest::Guest;

use crate::config::Settings;
use crate::discovery::{CachedDelegation, DiscoveryCache};
use crate::exchange::{self, CalloutResult, Decision, Step, TokenExchange, MAX_REQUEST_BODY_BYTES};
use crate::matrix::MatrixError;
use crate::requests::TokenEndpoint;
use crate::response::LocalResponse;

/// Reads and validates the plugin configuration (the middleware's options), then registers
/// the handler. An invalid configuration is logged with the key and the module exits with a
/// failure, so Traefik refuses the middleware instead of running it on defaults.
pub fn register() {
    let _ = http_wasm_guest::HostLogger::init_with_level(log::Level::Info);
    let config = admin::config();
    let parsed = Settings::from_json(&config, &|name| std::env::var(name).ok()).and_then(|s| {
        if s.token_service.is_some() {
            // Reading request bodies of 2 KiB or more traps the guest on Traefik 3.7.15 and
            // callouts are not built yet: refuse rather than answer every token request 401.
            return Err(crate::config::ConfigError {
                key: "livekitUrl".to_owned(),
                reason: "the inline token service is not available in the Traefik plugin yet; \
                         use stripPrefixes only and keep lk-jwt-service behind the prefix"
                    .to_owned(),
            });
        }
        Ok(s)
    });
    match parsed {
        Ok(settings) => {
            let prefixes: Vec<&str> = settings.strip_prefixes.iter().map(|p| p.as_str()).collect();
            log::info!(
                "configured: stripPrefixes {prefixes:?}; token service {}",
                if settings.token_service.is_some() {
                    "on"
                } else {
                    "off"
                }
            );
            http_wasm_guest::register(Plugin {
                settings,
                cache: InstanceCache::default(),
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
    cache: InstanceCache,
}

/// The `.well-known` cache of one plugin instance, bounded to [`INSTANCE_CACHE_ENTRIES`].
#[derive(Default)]
struct InstanceCache(RefCell<HashMap<String, CachedDelegation>>);

const INSTANCE_CACHE_ENTRIES: usize = 1024;

impl DiscoveryCache for InstanceCache {
    fn get(&self, server_name: &str) -> Option<CachedDelegation> {
        self.0.borrow().get(server_name).cloned()
    }

    fn put(&self, server_name: &str, entry: &CachedDelegation) {
        let mut map = self.0.borrow_mut();
        if map.len() >= INSTANCE_CACHE_ENTRIES && !map.contains_key(server_name) {
            let now = now_secs();
            map.retain(|_, e| e.expires_at > now);
            if map.len() >= INSTANCE_CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(server_name.to_owned(), entry.clone());
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

impl Plugin {
    fn token_request(
        &self,
        endpoint: TokenEndpoint,
        request: &Request,
        response: &Response,
    ) -> (bool, i32) {
        let Some(service) = self.settings.token_service.as_ref() else {
            return (true, 0);
        };
        let declared = request
            .header
            .get(b"content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES) {
            return respond(response, &LocalResponse::error(MatrixError::TOO_LARGE));
        }
        let mut body = Vec::new();
        for chunk in request.body.read_iter() {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_REQUEST_BODY_BYTES {
                return respond(response, &LocalResponse::error(MatrixError::TOO_LARGE));
            }
        }
        let (mut exchange, mut step) =
            TokenExchange::start(service, endpoint, &body, &self.cache, now_secs());
        loop {
            match step {
                Step::Respond(r) => return respond(response, &r),
                Step::Callout(c) => {
                    let outcome = client::call(&c, service, exchange.max_callout_body());
                    let result = CalloutResult {
                        status: outcome.status,
                        body: &outcome.body,
                        cache_control: outcome.cache_control.as_deref(),
                        detail: &outcome.detail,
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
                // The body is consumed here and never forwarded: no BufferRequest needed.
                self.token_request(endpoint, request, response)
            }
        }
    }
}
