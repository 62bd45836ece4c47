//! MatrixRTC LiveKit authorization inside the reverse proxy.
//!
//! One host-agnostic core and thin host adapters:
//!
//! - [`config`]: the plugin configuration (`SPEC.md` section 2) into immutable [`config::Settings`];
//! - [`path`]: strip-prefix rules (section 3);
//! - [`matrix`]: server names, the OpenID userinfo callout, Matrix-style errors;
//! - [`discovery`]: where a server name's userinfo callout goes (`.well-known`, policy);
//! - [`livekit`]: room alias / identity derivation, LiveKit access token claims, CreateRoom;
//! - [`requests`]: token request bodies and their validation;
//! - [`response`]: local replies with lk-jwt-service's CORS headers;
//! - [`exchange`]: routing and the token exchange state machine (section 4);
//! - [`metrics`]: metric names and labels;
//! - [`logging`]: log lines prefixed with the request id;
//! - [`http1`]: HTTP/1.1 request encoding and answer parsing (the Traefik plugin's callouts);
//! - [`webhook`], [`delayed_leave`], [`job_service`], [`client_discovery`]: MSC4140
//!   delayed-leave delegation: LiveKit webhook verification, one job's state machine, the
//!   service that runs all jobs, Client-Server API discovery (run by the Envoy filter);
//! - `proxy_wasm_filter` (wasm32 only): the proxy-wasm adapter loaded by Envoy and Istio;
//! - `http_wasm_plugin` (wasm32, feature `traefik`): the http-wasm adapter loaded by Traefik.
//!
//! The core never panics on input: clippy denies `unwrap`, `expect`, `panic!` and slice
//! indexing outside tests (see `Cargo.toml`), because a panic in a host callback kills the
//! proxy's wasm VM and fails every later request.

pub mod client_discovery;
pub mod config;
pub mod delayed_leave;
pub mod discovery;
pub mod exchange;
pub mod hs256;
pub mod http1;
pub mod job_service;
pub mod livekit;
pub mod logging;
pub mod matrix;
pub mod metrics;
pub mod path;
pub mod requests;
pub mod response;
pub mod webhook;

#[cfg(all(target_arch = "wasm32", feature = "envoy"))]
mod proxy_wasm_filter;

#[cfg(all(target_arch = "wasm32", feature = "traefik"))]
pub mod http_wasm_plugin;

/// `User-Agent` of every callout.
pub const USER_AGENT: &str = concat!("matrixrtc-livekit-auth/", env!("CARGO_PKG_VERSION"));
