//! The http-wasm adapter (Traefik middleware plugin): one handler per plugin instance that
//! turns the core's routing decisions into http-wasm host calls.
//!
//! Status: strip-prefix is complete. The token service is refused at load (see [`register`]):
//! on Traefik 3.7.15 a guest cannot read request bodies of 2 KiB or more (README "Traefik"),
//! and the callout transport (WasmEdge sockets, non-blocking with poll for timeouts, rustls
//! with the RustCrypto provider) is not built yet. When it is, a token request runs the same
//! [`crate::exchange::TokenExchange`] as the Envoy build, with blocking callouts.

use http_wasm_guest::host::{admin, Request, Response};
use http_wasm_guest::Guest;

use crate::config::{ConfigError, Settings};
use crate::exchange::{self, Decision};
use crate::response::LocalResponse;

/// Reads and validates the plugin configuration (the middleware's options), then registers
/// the handler. An invalid configuration is logged with the key and the module exits with a
/// failure, so Traefik refuses the middleware instead of running it on defaults.
pub fn register() {
    let _ = http_wasm_guest::HostLogger::init_with_level(log::Level::Info);
    let config = admin::config();
    let parsed = Settings::from_json(&config, &|name| std::env::var(name).ok()).and_then(|s| {
        if s.token_service.is_some() {
            return Err(ConfigError {
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
            log::set_max_level(settings.log_level);
            let prefixes: Vec<&str> = settings.strip_prefixes.iter().map(|p| p.as_str()).collect();
            log::info!("configured: stripPrefixes {prefixes:?}; token service off");
            http_wasm_guest::register(Plugin { settings });
        }
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    }
}

struct Plugin {
    settings: Settings,
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
            // Only with the token service, which `register` refuses for now.
            Decision::ReadBody(_) => (true, 0),
        }
    }
}
