//! The host-agnostic request flow: routing a request ([`route`]) and the token exchange as an
//! explicit state machine ([`TokenExchange`]).
//!
//! A host adapter (proxy-wasm, http-wasm) turns each [`Decision`] and [`Step`] into host calls:
//! forward upstream (possibly rewritten), answer locally, or make a callout and feed its
//! response back. The flow of a token request (lk-jwt-service, MSC4195):
//!
//! ```text
//! body ─decode─▶ userinfo callout ─verify sub / claimed user─▶ CreateRoom callout ─2xx─▶ 200 {url, jwt}
//!   │400               │401                                       │500
//! ```
//!
//! Time is passed in (`now`, seconds since the Unix epoch) so the flow is deterministic in tests.

use crate::client_discovery::{self, ClientPlan};
use crate::config::{Settings, TokenService, Upstream};
use crate::discovery::{self, DiscoveryCache, Plan};
use crate::job_service::{Handover, Message};
use crate::livekit::{self, Claims};
use crate::matrix::{self, MatrixError};
use crate::path::{self, Prefix};
use crate::requests::{TokenEndpoint, TokenRequest};
use crate::response::LocalResponse;
use crate::webhook;

/// Largest token request body the filter reads, in bytes; larger ones get 413 `M_TOO_LARGE`.
/// Real Element Call bodies are under 1 KiB.
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// Largest CreateRoom answer body that is read, in bytes (only its status matters).
pub const MAX_CREATE_ROOM_BODY_BYTES: usize = 4 * 1024;

/// What to do with a request, decided from its method and `:path` alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'s> {
    /// Not for this filter: forward unchanged.
    PassThrough,
    /// Forward upstream with `:path` set to `target` and `X-Forwarded-Prefix: prefix`
    /// (replacing any value the client sent).
    Forward {
        /// The prefix that was stripped.
        prefix: &'s Prefix,
        /// The new request target (path and query).
        target: String,
    },
    /// Answer now with this response; nothing goes upstream.
    Respond(LocalResponse),
    /// A token request: read the whole body (at most [`MAX_REQUEST_BODY_BYTES`]), then call
    /// [`TokenExchange::start`]; nothing goes upstream.
    ReadBody(TokenEndpoint),
}

/// Routes a request by `method` and request target `target` (`:path`, with query).
///
/// Token endpoints (when the token service is on) are `P/sfu/get`, `P/get_token`,
/// `P/healthz`, `P/delegate_delayed_leave` and `P/sfu_webhook` for each strip prefix P, or the root paths
/// (after collapsing a leading `//`) when there is no prefix. Everything else under a prefix
/// is forwarded with the prefix stripped; everything else passes through.
pub fn route<'s>(settings: &'s Settings, method: &str, target: &str) -> Decision<'s> {
    route_lazy(settings, target, || Some(method.to_owned()))
}

/// [`route`] for hosts where reading the method costs a host call: `method` is called only
/// for the token endpoints (a `None` method passes the request through).
pub fn route_lazy<'s>(
    settings: &'s Settings,
    target: &str,
    method: impl FnOnce() -> Option<String>,
) -> Decision<'s> {
    let stripped = path::strip(&settings.strip_prefixes, target);
    if settings.token_service.is_some() {
        let local_path = match &stripped {
            Some(s) => Some(s.path.clone()),
            None if settings.strip_prefixes.is_empty() => {
                let (p, _) = path::split_target(target);
                p.starts_with('/')
                    .then(|| path::collapse_leading_slashes(p))
            }
            None => None,
        };
        if let Some(p) = local_path.filter(|p| is_token_path(p)) {
            return match method().and_then(|m| token_route(&m, &p)) {
                Some(decision) => decision,
                None => Decision::PassThrough,
            };
        }
    }
    match stripped {
        Some(s) => Decision::Forward {
            prefix: s.prefix,
            target: s.target,
        },
        None => Decision::PassThrough,
    }
}

fn is_token_path(local_path: &str) -> bool {
    matches!(
        local_path,
        "/sfu/get" | "/get_token" | "/healthz" | "/delegate_delayed_leave" | "/sfu_webhook"
    )
}

fn token_route(method: &str, local_path: &str) -> Option<Decision<'static>> {
    let endpoint = match local_path {
        "/sfu/get" => TokenEndpoint::SfuGet,
        "/get_token" => TokenEndpoint::GetToken,
        "/healthz" => {
            return Some(Decision::Respond(match method {
                "GET" | "HEAD" => LocalResponse::healthy(),
                _ => LocalResponse::health_method_not_allowed(),
            }))
        }
        "/delegate_delayed_leave" => TokenEndpoint::DelegateDelayedLeave,
        "/sfu_webhook" => TokenEndpoint::SfuWebhook,
        _ => return None,
    };
    Some(match method {
        "POST" => Decision::ReadBody(endpoint),
        "OPTIONS" => Decision::Respond(LocalResponse::preflight()),
        _ => Decision::Respond(LocalResponse::error(MatrixError::METHOD_NOT_ALLOWED)),
    })
}

/// `true` for the endpoints that only a host running delayed-leave jobs serves
/// (`/delegate_delayed_leave`, `/sfu_webhook`); elsewhere answer them with
/// [`MatrixError::DELEGATION_ENDPOINT_UNAVAILABLE`] before reading the body.
pub fn needs_job_service(endpoint: TokenEndpoint) -> bool {
    matches!(
        endpoint,
        TokenEndpoint::DelegateDelayedLeave | TokenEndpoint::SfuWebhook
    )
}

/// Serves `POST /sfu_webhook`: verifies a LiveKit webhook (`body`, its `Authorization`
/// header, `now` in Unix seconds; [`webhook::verify`]) against the API key and secret.
///
/// Returns the answer (200 empty; 401 `M_UNAUTHORIZED` for an unsigned, tampered, stale or
/// foreign webhook, logged with the reason) and, for a participant event, the message for the
/// job service.
pub fn sfu_webhook(
    service: &TokenService,
    authorization: Option<&str>,
    body: &[u8],
    now: u64,
) -> (LocalResponse, Option<Message>) {
    match webhook::verify(
        body,
        authorization,
        &service.api_key,
        service.api_secret.expose(),
        now,
    ) {
        Ok(event) => {
            let created_at = event.created_at;
            let message = match (event.signal(), event.room, event.identity) {
                (Some(signal), Some(room), Some(identity)) => Some(Message::Participant {
                    room,
                    identity,
                    signal,
                    created_at,
                }),
                _ => None,
            };
            (LocalResponse::webhook_accepted(), message)
        }
        Err(reason) => {
            log::warn!("LiveKit webhook refused: {reason}");
            (LocalResponse::error(MatrixError::WEBHOOK_REFUSED), None)
        }
    }
}

/// Which dependency a callout goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutTarget {
    /// The user's homeserver (OpenID userinfo).
    Homeserver,
    /// The server name's `.well-known/matrix/server` (discovery, over TLS).
    WellKnown,
    /// The LiveKit server API (CreateRoom, GetParticipant).
    LiveKit,
    /// The server name's `.well-known/matrix/client` (Client-Server API discovery, TLS).
    ClientWellKnown,
    /// The user's Client-Server API (MSC4140 delayed-event restart / send).
    DelayedEvents,
}

/// An outbound HTTP request the host must make, then pass the result to
/// [`TokenExchange::on_callout_response`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Homeserver or LiveKit.
    pub target: CalloutTarget,
    /// Where to: TLS or not, `host:port`.
    pub upstream: Upstream,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// Extra headers (lower-case names), besides method, path, authority and scheme.
    pub headers: Vec<(&'static str, String)>,
    /// Request body (empty for none).
    pub body: Vec<u8>,
    /// Timeout, milliseconds.
    pub timeout_ms: u64,
}

/// The result of a callout as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalloutResult<'a> {
    /// HTTP status, `None` when the answer carried no status (reset after headers) or the
    /// callout could not be made at all.
    pub status: Option<u16>,
    /// The body (possibly truncated by the host to the size the state machine reads).
    pub body: &'a [u8],
    /// The answer's `Cache-Control` header, if any (used for `.well-known`).
    pub cache_control: Option<&'a str>,
    /// A short description of the failure from the host (e.g. Envoy's local reply text, or
    /// "dispatch failed: BadArgument"), for the log; never contains a token.
    pub detail: &'a str,
}

/// What the host does next in a token exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make this callout.
    Callout(Callout),
    /// Answer the client with this response; the exchange is over.
    Respond(LocalResponse),
    /// Hand this delayed-leave job to the job service, then answer with `response`; if the
    /// handover fails, answer [`MatrixError::DELEGATION_FAILED`] instead. The exchange is over.
    Handover {
        /// The job.
        handover: Handover,
        /// The answer once the job service has it.
        response: LocalResponse,
    },
}

#[derive(Debug)]
enum State {
    AwaitWellKnown(TokenRequest),
    AwaitUserinfo(TokenRequest),
    AwaitClientWellKnown {
        request: TokenRequest,
        user_id: String,
    },
    AwaitCreateRoom {
        identity: String,
        alias: String,
        full_access: bool,
        user_id: String,
        handover: Option<Handover>,
    },
    Done,
}

/// One token request in flight: the state machine from the request body to the answer.
#[derive(Debug)]
pub struct TokenExchange {
    state: State,
    issued_full_access: Option<bool>,
    /// Asks the host whether it runs delayed-leave jobs (called only for a request with
    /// delay parameters, so other requests cost the host nothing).
    delegation: fn() -> bool,
}

impl TokenExchange {
    /// Starts an exchange for a whole request `body` sent to `endpoint`; `cache` holds
    /// `.well-known` results, `now` is Unix seconds, `delegation` says whether the host runs
    /// delayed-leave jobs, asked only when the request carries delay parameters (without,
    /// they get 400 `M_BAD_JSON` after the OpenID check).
    ///
    /// Returns the exchange and its first step: a 400 (`M_NOT_JSON` / `M_BAD_JSON`) or 401 (a
    /// server name that is invalid, not allowed or internal) answer, the `.well-known`
    /// discovery callout, or the OpenID userinfo callout.
    pub fn start(
        service: &TokenService,
        endpoint: TokenEndpoint,
        body: &[u8],
        cache: &dyn DiscoveryCache,
        now: u64,
        delegation: fn() -> bool,
    ) -> (Self, Step) {
        let request = match TokenRequest::decode(endpoint, body) {
            Ok(r) => r,
            Err(e) => {
                log::info!("token request refused: {} {}", e.errcode, e.error);
                return Self::done(LocalResponse::error(e));
            }
        };
        let fresh = |state| Self {
            state,
            issued_full_access: None,
            delegation,
        };
        let server = &request.matrix_server_name;
        match discovery::plan(
            server,
            &service.homeservers,
            &service.homeserver_policy,
            cache,
            now,
        ) {
            Err(refusal) => {
                let shown: String = server.chars().take(100).collect();
                log::warn!("token request refused: server name {shown:?} is {refusal}");
                Self::done(LocalResponse::error(MatrixError::UNAUTHORIZED))
            }
            Ok(Plan::Direct(upstream)) => {
                let callout = userinfo_callout(service, &request, upstream);
                (fresh(State::AwaitUserinfo(request)), Step::Callout(callout))
            }
            Ok(Plan::WellKnown(upstream)) => {
                let callout = Callout {
                    target: CalloutTarget::WellKnown,
                    path: discovery::WELL_KNOWN_PATH.to_owned(),
                    upstream,
                    method: "GET",
                    headers: vec![("accept", "application/json".to_owned())],
                    body: Vec::new(),
                    timeout_ms: service.callout_timeout_ms,
                };
                (
                    fresh(State::AwaitWellKnown(request)),
                    Step::Callout(callout),
                )
            }
        }
    }

    fn done(response: LocalResponse) -> (Self, Step) {
        (
            Self {
                state: State::Done,
                issued_full_access: None,
                delegation: || false,
            },
            Step::Respond(response),
        )
    }

    /// `Some(full_access)` once a LiveKit access token was issued (for metrics).
    pub fn issued_full_access(&self) -> Option<bool> {
        self.issued_full_access
    }

    /// The largest callout answer body the current state reads, in bytes.
    pub fn max_callout_body(&self) -> usize {
        match self.state {
            State::AwaitWellKnown(_) => discovery::MAX_WELL_KNOWN_BODY_BYTES + 1,
            State::AwaitUserinfo(_) => matrix::MAX_USERINFO_BODY_BYTES + 1,
            State::AwaitClientWellKnown { .. } => client_discovery::MAX_CLIENT_WELL_KNOWN_BYTES + 1,
            _ => MAX_CREATE_ROOM_BODY_BYTES,
        }
    }

    /// Feeds the result of the pending callout; `cache` takes a `.well-known` result, `now`
    /// is the time in Unix seconds.
    ///
    /// Returns the next step: after `.well-known`, the userinfo callout (to the delegated
    /// host, or `<hostname>:8448` when discovery failed) or a 401 (delegation to an internal
    /// address); after userinfo, a 401 (verification failed, claimed user
    /// differs), a 400 (delayed-leave parameters, not served yet) or the CreateRoom callout;
    /// after CreateRoom, 500 (room creation failed) or 200 with the LiveKit access token. A
    /// result that arrives when no callout is pending gives a 500.
    pub fn on_callout_response(
        &mut self,
        service: &TokenService,
        result: CalloutResult<'_>,
        cache: &dyn DiscoveryCache,
        now: u64,
    ) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitWellKnown(request) => {
                let server = request.matrix_server_name.clone();
                match discovery::discovered(
                    &server,
                    result.status,
                    result.cache_control,
                    result.body,
                    &service.homeserver_policy,
                    now,
                ) {
                    Ok(found) => {
                        match &found.fallback_reason {
                            Some(reason) => log::info!(
                                "discovery for {server}: {reason}{}{}; using {}",
                                if result.detail.is_empty() { "" } else { " " },
                                result.detail,
                                found.upstream.authority
                            ),
                            None => log::debug!(
                                "discovery for {server}: delegated to {}",
                                found.upstream.authority
                            ),
                        }
                        cache.put(&server, &found.entry);
                        let callout = userinfo_callout(service, &request, found.upstream);
                        self.state = State::AwaitUserinfo(request);
                        Step::Callout(callout)
                    }
                    Err(refusal) => {
                        log::warn!("discovery for {server}: delegation target is {refusal}");
                        Step::Respond(LocalResponse::error(MatrixError::UNAUTHORIZED))
                    }
                }
            }
            State::AwaitUserinfo(request) => {
                self.after_userinfo(service, request, result, cache, now)
            }
            State::AwaitClientWellKnown { request, user_id } => {
                let server = &request.matrix_server_name;
                match client_discovery::discovered(
                    server,
                    result.status,
                    result.body,
                    &service.homeserver_policy,
                    cache,
                    now,
                ) {
                    Ok(cs_api) => self.with_cs_api(service, request, user_id, cs_api, now),
                    Err(reason) => {
                        log::warn!(
                            "Client-Server API of {server} not found: {reason}{}{}",
                            if result.detail.is_empty() { "" } else { " " },
                            result.detail
                        );
                        Step::Respond(LocalResponse::error(MatrixError::CS_API_UNRESOLVABLE))
                    }
                }
            }
            State::AwaitCreateRoom {
                identity,
                alias,
                full_access,
                user_id,
                handover,
            } => {
                if !result.status.is_some_and(|s| (200..300).contains(&s)) {
                    log::warn!(
                        "LiveKit CreateRoom for room {alias} failed: status {} {}",
                        result.status.map_or("none".to_owned(), |s| s.to_string()),
                        result.detail
                    );
                    return Step::Respond(LocalResponse::error(MatrixError::ROOM_CREATION_FAILED));
                }
                let claims = Claims::client(
                    &service.api_key,
                    &identity,
                    &alias,
                    full_access,
                    now,
                    service.token_lifetime_secs,
                );
                match claims.sign(service.api_secret.expose()) {
                    Ok(jwt) => {
                        self.issued_full_access = Some(full_access);
                        log::info!(
                            "LiveKit access token issued for {user_id} in room {alias} ({})",
                            if full_access {
                                "full access"
                            } else {
                                "restricted"
                            }
                        );
                        let response = LocalResponse::token(&service.livekit_url, &jwt);
                        match handover {
                            Some(handover) => Step::Handover { handover, response },
                            None => Step::Respond(response),
                        }
                    }
                    Err(e) => {
                        log::error!("signing the LiveKit access token failed: {e}");
                        Step::Respond(LocalResponse::error(MatrixError::TOKEN_MINTING_FAILED))
                    }
                }
            }
            State::Done => {
                log::error!("callout response without a pending callout");
                Step::Respond(LocalResponse::error(MatrixError::TOKEN_MINTING_FAILED))
            }
        }
    }

    fn after_userinfo(
        &mut self,
        service: &TokenService,
        request: TokenRequest,
        result: CalloutResult<'_>,
        cache: &dyn DiscoveryCache,
        now: u64,
    ) -> Step {
        let server = &request.matrix_server_name;
        let user_id = match matrix::verify_userinfo(result.status, result.body, server) {
            Ok(sub) => sub,
            Err(reason) => {
                log::warn!(
                    "OpenID token for server name {server} not accepted: {reason}{}{}",
                    if result.detail.is_empty() { "" } else { " " },
                    result.detail
                );
                return Step::Respond(LocalResponse::error(MatrixError::UNAUTHORIZED));
            }
        };
        if !request.claim_matches(&user_id) {
            log::warn!("claimed_user_id differs from the verified user {user_id}");
            return Step::Respond(LocalResponse::error(MatrixError::UNAUTHORIZED));
        }
        if request.delayed_leave.is_none() {
            return self.create_room(service, &request, user_id, None, now);
        }
        let delegate = request.endpoint == TokenEndpoint::DelegateDelayedLeave;
        if !service.full_access.allows(server) {
            log::info!("delayed leave delegation refused: {user_id} has no full access");
            return Step::Respond(LocalResponse::error(if delegate {
                MatrixError::DELEGATION_FORBIDDEN
            } else {
                MatrixError::DELEGATION_RESTRICTED
            }));
        }
        if !(self.delegation)() {
            log::warn!(
                "delayed leave delegation asked by {user_id}, but this proxy runs no \
                 delayed-leave jobs (README \"Delayed leave delegation\")"
            );
            return Step::Respond(LocalResponse::error(if delegate {
                MatrixError::DELEGATION_ENDPOINT_UNAVAILABLE
            } else {
                MatrixError::DELEGATION_UNAVAILABLE
            }));
        }
        match client_discovery::plan(
            server,
            &service.cs_api_urls,
            &service.homeserver_policy,
            cache,
            now,
        ) {
            Ok(ClientPlan::Known(cs_api)) => {
                self.with_cs_api(service, request, user_id, cs_api, now)
            }
            Ok(ClientPlan::WellKnown(upstream)) => {
                let callout = Callout {
                    target: CalloutTarget::ClientWellKnown,
                    path: client_discovery::CLIENT_WELL_KNOWN_PATH.to_owned(),
                    upstream,
                    method: "GET",
                    headers: vec![("accept", "application/json".to_owned())],
                    body: Vec::new(),
                    timeout_ms: service.callout_timeout_ms,
                };
                self.state = State::AwaitClientWellKnown { request, user_id };
                Step::Callout(callout)
            }
            Err(reason) => {
                log::warn!("Client-Server API of {server} not found: {reason}");
                Step::Respond(LocalResponse::error(MatrixError::CS_API_UNRESOLVABLE))
            }
        }
    }

    /// The Client-Server API is known: hand the job over (`/delegate_delayed_leave`) or create
    /// the room first (token endpoints).
    fn with_cs_api(
        &mut self,
        service: &TokenService,
        request: TokenRequest,
        user_id: String,
        cs_api: Upstream,
        now: u64,
    ) -> Step {
        let Some(delay) = request.delayed_leave.clone() else {
            return self.create_room(service, &request, user_id, None, now);
        };
        let handover = Handover {
            room: request.room_alias(),
            identity: request.identity(&user_id),
            user_id: user_id.clone(),
            delay_id: delay.delay_id,
            delay_timeout_ms: delay.delay_timeout_ms,
            cs_api,
        };
        if request.endpoint == TokenEndpoint::DelegateDelayedLeave {
            log::info!(
                "delayed leave of {user_id} in room {} delegated",
                handover.room
            );
            return Step::Handover {
                handover,
                response: LocalResponse::delegated(),
            };
        }
        self.create_room(service, &request, user_id, Some(handover), now)
    }

    /// The CreateRoom callout; the LiveKit access token follows its success.
    fn create_room(
        &mut self,
        service: &TokenService,
        request: &TokenRequest,
        user_id: String,
        handover: Option<Handover>,
        now: u64,
    ) -> Step {
        let server = &request.matrix_server_name;
        let alias = request.room_alias();
        let server_token =
            match Claims::room_create(&service.api_key, now).sign(service.api_secret.expose()) {
                Ok(t) => t,
                Err(e) => {
                    log::error!("signing the CreateRoom server token failed: {e}");
                    return Step::Respond(LocalResponse::error(MatrixError::TOKEN_MINTING_FAILED));
                }
            };
        let callout = Callout {
            target: CalloutTarget::LiveKit,
            upstream: service.livekit_api.clone(),
            method: "POST",
            path: livekit::create_room_path(service),
            headers: vec![
                ("content-type", "application/protobuf".to_owned()),
                ("authorization", format!("Bearer {server_token}")),
            ],
            body: livekit::create_room_body(&alias),
            timeout_ms: service.callout_timeout_ms,
        };
        self.state = State::AwaitCreateRoom {
            identity: request.identity(&user_id),
            full_access: service.full_access.allows(server),
            alias,
            user_id,
            handover,
        };
        Step::Callout(callout)
    }
}

fn userinfo_callout(service: &TokenService, request: &TokenRequest, upstream: Upstream) -> Callout {
    Callout {
        target: CalloutTarget::Homeserver,
        path: matrix::userinfo_path(&upstream.base_path, &request.access_token),
        upstream,
        method: "GET",
        headers: vec![("accept", "application/json".to_owned())],
        body: Vec::new(),
        timeout_ms: service.callout_timeout_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::NoCache;

    const NOW: u64 = 1_800_000_000;
    const HS_OVERRIDE: &str = r#","homeservers":{"example.org":"https://hs.example.org"}"#;

    fn settings(extra: &str) -> Settings {
        let json = format!(
            r#"{{"stripPrefixes":["/livekit-jwt-service"],"livekitUrl":"wss://sfu.example.org/livekit/sfu","livekitKey":"devkey","livekitSecret":"secret","fullAccessHomeservers":["example.org"]{extra}}}"#
        );
        Settings::from_json(json.as_bytes(), &|_| None).unwrap()
    }

    fn body(server: &str, claimed: &str) -> Vec<u8> {
        format!(
            r#"{{"room_id":"!r:example.org","slot_id":"m.call#ROOM","openid_token":{{"access_token":"tok en","token_type":"Bearer","matrix_server_name":"{server}","expires_in":3600}},"member":{{"id":"m1","claimed_user_id":"{claimed}","claimed_device_id":"DEV"}}}}"#
        )
        .into_bytes()
    }

    fn ok(status: u16, body: &str) -> CalloutResult<'_> {
        CalloutResult {
            status: Some(status),
            body: body.as_bytes(),
            cache_control: None,
            detail: "",
        }
    }

    #[track_caller]
    fn expect_callout(step: Step) -> Callout {
        match step {
            Step::Callout(c) => c,
            Step::Respond(r) | Step::Handover { response: r, .. } => panic!(
                "expected a callout, got {} {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    #[track_caller]
    fn expect_error(step: Step, status: u16, errcode: &str) {
        match step {
            Step::Respond(r) => {
                assert_eq!(r.status, status);
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(v["errcode"], errcode);
            }
            Step::Callout(c) => panic!("expected {status}, got a callout to {}", c.path),
            Step::Handover { .. } => panic!("expected {status}, got a handover"),
        }
    }

    fn decode_claims(jwt: &str) -> serde_json::Value {
        crate::hs256::install();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.validate_nbf = false;
        jsonwebtoken::decode::<serde_json::Value>(
            jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"secret").unwrap(),
            &v,
        )
        .unwrap()
        .claims
    }

    #[test]
    fn routing() {
        let s = settings("");
        assert_eq!(
            route(&s, "POST", "/livekit-jwt-service/get_token"),
            Decision::ReadBody(TokenEndpoint::GetToken)
        );
        assert_eq!(
            route(&s, "POST", "/livekit-jwt-service//sfu/get?x=1"),
            Decision::ReadBody(TokenEndpoint::SfuGet)
        );
        assert!(
            matches!(route(&s, "OPTIONS", "/livekit-jwt-service/sfu/get"), Decision::Respond(r) if r.status == 200)
        );
        assert!(
            matches!(route(&s, "GET", "/livekit-jwt-service/get_token"), Decision::Respond(r) if r.status == 405)
        );
        assert!(
            matches!(route(&s, "HEAD", "/livekit-jwt-service/healthz"), Decision::Respond(r) if r.status == 200 && r.body.is_empty())
        );
        assert!(
            matches!(route(&s, "DELETE", "/livekit-jwt-service/healthz"), Decision::Respond(r) if r.status == 405)
        );
        assert!(matches!(
            route(&s, "POST", "/livekit-jwt-service/delegate_delayed_leave"),
            Decision::ReadBody(TokenEndpoint::DelegateDelayedLeave)
        ));
        assert!(matches!(
            route(&s, "POST", "/livekit-jwt-service/sfu_webhook"),
            Decision::ReadBody(TokenEndpoint::SfuWebhook)
        ));
        assert!(
            matches!(route(&s, "GET", "/livekit-jwt-service/sfu_webhook"), Decision::Respond(r) if r.status == 405)
        );
        assert!(
            matches!(route(&s, "GET", "/livekit-jwt-service/other?a=1"), Decision::Forward { target, .. } if target == "/other?a=1")
        );
        assert_eq!(
            route(&s, "POST", "/get_token"),
            Decision::PassThrough,
            "root is not served when prefixes are set"
        );
        assert_eq!(
            route(&s, "POST", "/livekit-jwt-servicefoo/get_token"),
            Decision::PassThrough
        );
    }

    #[test]
    fn routing_without_prefixes() {
        let json = r#"{"livekitUrl":"wss://x","livekitKey":"k","livekitSecret":"s","fullAccessHomeservers":["*"]}"#;
        let s = Settings::from_json(json.as_bytes(), &|_| None).unwrap();
        assert_eq!(
            route(&s, "POST", "//get_token"),
            Decision::ReadBody(TokenEndpoint::GetToken)
        );
        assert_eq!(
            route(&s, "POST", "/get_token"),
            Decision::ReadBody(TokenEndpoint::GetToken)
        );
        assert_eq!(route(&s, "POST", "/other"), Decision::PassThrough);
        assert_eq!(route(&s, "OPTIONS", "*"), Decision::PassThrough);
    }

    #[test]
    fn strip_only_never_answers_locally() {
        let s = Settings::from_json(br#"{"stripPrefixes":["/p"]}"#, &|_| None).unwrap();
        assert!(
            matches!(route(&s, "POST", "/p/get_token"), Decision::Forward { target, .. } if target == "/get_token")
        );
    }

    #[test]
    fn full_access_exchange() {
        let s = settings("");
        let t = s.token_service.as_ref().unwrap();
        let (mut ex, step) = TokenExchange::start(
            t,
            TokenEndpoint::GetToken,
            &body("example.org", "@alice:example.org"),
            &NoCache,
            NOW,
            || true,
        );
        let well_known = expect_callout(step);
        assert_eq!(well_known.target, CalloutTarget::WellKnown);
        assert_eq!(well_known.upstream.authority, "example.org:443");
        assert_eq!(well_known.path, "/.well-known/matrix/server");
        let userinfo = expect_callout(ex.on_callout_response(
            t,
            ok(200, r#"{"m.server":"matrix.example.org:443"}"#),
            &NoCache,
            NOW,
        ));
        assert_eq!(userinfo.target, CalloutTarget::Homeserver);
        assert_eq!(userinfo.method, "GET");
        assert_eq!(userinfo.upstream.authority, "matrix.example.org:443");
        assert!(userinfo.upstream.tls);
        assert_eq!(
            userinfo.path,
            "/_matrix/federation/v1/openid/userinfo?access_token=tok+en"
        );
        assert!(userinfo.body.is_empty());

        let create = expect_callout(ex.on_callout_response(
            t,
            ok(200, r#"{"sub":"@alice:example.org"}"#),
            &NoCache,
            NOW,
        ));
        assert_eq!(create.target, CalloutTarget::LiveKit);
        assert_eq!(create.upstream.authority, "sfu.example.org:443");
        assert_eq!(
            create.path,
            "/livekit/sfu/twirp/livekit.RoomService/CreateRoom"
        );
        assert_eq!(
            create.body,
            livekit::create_room_body(&livekit::room_alias("!r:example.org", "m.call#ROOM"))
        );
        let bearer = create
            .headers
            .iter()
            .find(|(k, _)| *k == "authorization")
            .unwrap()
            .1
            .clone();
        let server = decode_claims(bearer.strip_prefix("Bearer ").unwrap());
        assert_eq!(server["video"], serde_json::json!({"roomCreate": true}));
        assert_eq!(
            server["exp"].as_u64().unwrap() - server["nbf"].as_u64().unwrap(),
            60
        );

        let Step::Respond(r) = ex.on_callout_response(t, ok(200, ""), &NoCache, NOW) else {
            panic!("expected an answer")
        };
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["url"], "wss://sfu.example.org/livekit/sfu");
        let claims = decode_claims(v["jwt"].as_str().unwrap());
        assert_eq!(claims["iss"], "devkey");
        assert_eq!(
            claims["sub"],
            livekit::identity("@alice:example.org", "DEV", "m1")
        );
        assert_eq!(claims["nbf"], NOW);
        assert_eq!(claims["exp"], NOW + 3600);
        assert_eq!(
            claims["video"],
            serde_json::json!({"room": livekit::room_alias("!r:example.org", "m.call#ROOM"), "roomJoin": true,
                "canPublish": true, "canSubscribe": true, "canUpdateOwnMetadata": true})
        );
    }

    #[test]
    fn restricted_user_cannot_publish() {
        let s = settings(r#","homeservers":{"other.example":"http://127.0.0.1:8008"}"#);
        let t = s.token_service.as_ref().unwrap();
        let (mut ex, step) = TokenExchange::start(
            t,
            TokenEndpoint::GetToken,
            &body("other.example", "@bob:other.example"),
            &NoCache,
            NOW,
            || true,
        );
        let c = expect_callout(step);
        assert_eq!(
            (c.upstream.tls, c.upstream.authority.as_str()),
            (false, "127.0.0.1:8008")
        );
        expect_callout(ex.on_callout_response(
            t,
            ok(200, r#"{"sub":"@bob:other.example"}"#),
            &NoCache,
            NOW,
        ));
        let Step::Respond(r) = ex.on_callout_response(t, ok(200, ""), &NoCache, NOW) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            decode_claims(v["jwt"].as_str().unwrap())["video"]["canPublish"],
            false
        );
    }

    #[test]
    fn verification_failures_are_401() {
        let s = settings(HS_OVERRIDE);
        let t = s.token_service.as_ref().unwrap();
        for (claimed, result) in [
            (
                "@alice:example.org",
                ok(200, r#"{"sub":"@mallory:other.example"}"#),
            ),
            (
                "@alice:example.org",
                ok(200, r#"{"sub":"@bob:example.org"}"#),
            ),
            (
                "@alice:example.org",
                ok(401, r#"{"errcode":"M_UNKNOWN_TOKEN"}"#),
            ),
            ("@alice:example.org", ok(503, "upstream connect error")),
            (
                "@alice:example.org",
                CalloutResult {
                    status: None,
                    body: b"",
                    cache_control: None,
                    detail: "reset",
                },
            ),
        ] {
            let (mut ex, step) = TokenExchange::start(
                t,
                TokenEndpoint::GetToken,
                &body("example.org", claimed),
                &NoCache,
                NOW,
                || true,
            );
            expect_callout(step);
            expect_error(
                ex.on_callout_response(t, result, &NoCache, NOW),
                401,
                "M_UNAUTHORIZED",
            );
        }
    }

    #[test]
    fn invalid_server_name_is_401_before_callout() {
        let s = settings("");
        let t = s.token_service.as_ref().unwrap();
        let (_, step) = TokenExchange::start(
            t,
            TokenEndpoint::GetToken,
            &body("evil/host", "@a:evil/host"),
            &NoCache,
            NOW,
            || true,
        );
        expect_error(step, 401, "M_UNAUTHORIZED");
    }

    fn with_delay(server: &str) -> Vec<u8> {
        let mut b = body(server, &format!("@alice:{server}"));
        b.pop();
        b.extend_from_slice(br#","delay_id":"d1","delay_timeout":10000}"#);
        b
    }

    const USERINFO_OK: &str = r#"{"sub":"@alice:example.org"}"#;

    #[test]
    fn delay_parameters_need_full_access_and_a_job_service() {
        let s = settings(
            r#","homeservers":{"example.org":"https://hs.example.org","other.org":"https://hs.other.org"}"#,
        );
        let t = s.token_service.as_ref().unwrap();
        for (endpoint, server, delegation, status, errcode, text) in [
            (
                TokenEndpoint::GetToken,
                "example.org",
                false,
                400,
                "M_BAD_JSON",
                "not available",
            ),
            (
                TokenEndpoint::DelegateDelayedLeave,
                "example.org",
                false,
                404,
                "M_UNRECOGNIZED",
                "not available",
            ),
            (
                TokenEndpoint::GetToken,
                "other.org",
                true,
                400,
                "M_BAD_JSON",
                "only supported for full access",
            ),
            (
                TokenEndpoint::DelegateDelayedLeave,
                "other.org",
                true,
                403,
                "M_FORBIDDEN",
                "only supported for full access",
            ),
        ] {
            let b = with_delay(server);
            let (mut ex, step) = TokenExchange::start(
                t,
                endpoint,
                &b,
                &NoCache,
                NOW,
                if delegation { || true } else { || false },
            );
            expect_callout(step);
            let sub = format!(r#"{{"sub":"@alice:{server}"}}"#);
            let step = ex.on_callout_response(t, ok(200, &sub), &NoCache, NOW);
            let Step::Respond(r) = step else {
                panic!("{step:?}")
            };
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                (r.status, v["errcode"].as_str().unwrap()),
                (status, errcode)
            );
            assert!(v["error"].as_str().unwrap().contains(text), "{v}");
        }
    }

    #[test]
    fn token_with_delay_discovers_the_cs_api_then_creates_the_room_then_hands_over() {
        let s = settings(HS_OVERRIDE);
        let t = s.token_service.as_ref().unwrap();
        let cache = crate::discovery::MemoryCache::new(8);
        let b = with_delay("example.org");
        let (mut ex, step) =
            TokenExchange::start(t, TokenEndpoint::GetToken, &b, &cache, NOW, || true);
        expect_callout(step);
        let wk = expect_callout(ex.on_callout_response(t, ok(200, USERINFO_OK), &cache, NOW));
        assert_eq!(wk.target, CalloutTarget::ClientWellKnown);
        assert_eq!(
            (wk.upstream.authority.as_str(), wk.path.as_str()),
            ("example.org:443", "/.well-known/matrix/client")
        );
        let create = expect_callout(ex.on_callout_response(
            t,
            ok(
                200,
                r#"{"m.homeserver":{"base_url":"https://matrix.example.org"}}"#,
            ),
            &cache,
            NOW,
        ));
        assert_eq!(create.target, CalloutTarget::LiveKit);
        let step = ex.on_callout_response(t, ok(200, ""), &cache, NOW);
        let Step::Handover { handover, response } = step else {
            panic!("{step:?}")
        };
        assert_eq!(response.status, 200);
        assert_eq!(handover.cs_api.authority, "matrix.example.org:443");
        assert_eq!(
            (handover.delay_id.as_str(), handover.delay_timeout_ms),
            ("d1", 10_000)
        );
        assert_eq!(handover.user_id, "@alice:example.org");
        let request = TokenRequest::decode(TokenEndpoint::GetToken, &b).unwrap();
        assert_eq!(handover.room, request.room_alias());
        assert_eq!(handover.identity, request.identity("@alice:example.org"));
        assert_eq!(ex.issued_full_access(), Some(true));
        // The second request finds the base URL in the cache: straight to CreateRoom.
        let (mut ex, step) =
            TokenExchange::start(t, TokenEndpoint::GetToken, &b, &cache, NOW + 1, || true);
        expect_callout(step);
        let create =
            expect_callout(ex.on_callout_response(t, ok(200, USERINFO_OK), &cache, NOW + 1));
        assert_eq!(create.target, CalloutTarget::LiveKit);
    }

    #[test]
    fn unresolvable_cs_api_is_400_before_the_room_is_created() {
        let s = settings(HS_OVERRIDE);
        let t = s.token_service.as_ref().unwrap();
        for endpoint in [TokenEndpoint::GetToken, TokenEndpoint::DelegateDelayedLeave] {
            let b = with_delay("example.org");
            let (mut ex, _) = TokenExchange::start(t, endpoint, &b, &NoCache, NOW, || true);
            expect_callout(ex.on_callout_response(t, ok(200, USERINFO_OK), &NoCache, NOW));
            let step = ex.on_callout_response(t, ok(404, "nope"), &NoCache, NOW);
            let Step::Respond(r) = step else {
                panic!("{step:?}")
            };
            assert_eq!(r.status, 400);
            assert_eq!(
                r.body,
                br#"{"errcode":"M_BAD_JSON","error":"Unable to resolve client-server API"}"#
            );
        }
    }

    #[test]
    fn delegate_hands_over_without_room_or_token() {
        let s = settings(&format!(
            r#"{HS_OVERRIDE},"csApiUrls":{{"example.org":"http://127.0.0.1:8008"}}"#
        ));
        let t = s.token_service.as_ref().unwrap();
        let b = with_delay("example.org");
        let (mut ex, step) = TokenExchange::start(
            t,
            TokenEndpoint::DelegateDelayedLeave,
            &b,
            &NoCache,
            NOW,
            || true,
        );
        assert_eq!(expect_callout(step).target, CalloutTarget::Homeserver);
        let step = ex.on_callout_response(t, ok(200, USERINFO_OK), &NoCache, NOW);
        let Step::Handover { handover, response } = step else {
            panic!("{step:?}")
        };
        assert_eq!(handover.cs_api.authority, "127.0.0.1:8008");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"{}"[..])
        );
        assert_eq!(response.header("access-control-allow-origin"), Some("*"));
        assert_eq!(ex.issued_full_access(), None);
    }

    #[test]
    fn sfu_webhook_verification() {
        let s = settings("");
        let t = s.token_service.as_ref().unwrap();
        let body =
            br#"{"event":"participant_left","room":{"name":"R"},"participant":{"identity":"I"}}"#;
        let (r, m) = sfu_webhook(t, None, body, NOW);
        assert_eq!((r.status, m), (401, None));
        let token = crate::webhook::tests_support::sign(body, "devkey", b"secret", NOW);
        let (r, m) = sfu_webhook(t, Some(&token), body, NOW);
        assert_eq!(r.status, 200);
        assert_eq!(
            m,
            Some(Message::Participant {
                room: "R".into(),
                identity: "I".into(),
                created_at: None,
                signal: crate::webhook::ParticipantSignal::Left
            })
        );
        let tampered =
            br#"{"event":"participant_left","room":{"name":"R"},"participant":{"identity":"J"}}"#;
        assert_eq!(sfu_webhook(t, Some(&token), tampered, NOW).0.status, 401);
        let room_event = br#"{"event":"room_finished","room":{"name":"R"}}"#;
        let token = crate::webhook::tests_support::sign(room_event, "devkey", b"secret", NOW);
        assert_eq!(
            sfu_webhook(t, Some(&token), room_event, NOW),
            (LocalResponse::webhook_accepted(), None)
        );
    }

    #[test]
    fn room_creation_failure_is_500() {
        let s = settings(HS_OVERRIDE);
        let t = s.token_service.as_ref().unwrap();
        for status in [Some(502), Some(404), None] {
            let (mut ex, _) = TokenExchange::start(
                t,
                TokenEndpoint::GetToken,
                &body("example.org", "@alice:example.org"),
                &NoCache,
                NOW,
                || true,
            );
            expect_callout(ex.on_callout_response(
                t,
                ok(200, r#"{"sub":"@alice:example.org"}"#),
                &NoCache,
                NOW,
            ));
            let r = CalloutResult {
                status,
                body: b"",
                cache_control: None,
                detail: "",
            };
            expect_error(
                ex.on_callout_response(t, r, &NoCache, NOW),
                500,
                "M_UNKNOWN",
            );
            // A stray second result never yields a token.
            expect_error(
                ex.on_callout_response(t, ok(200, ""), &NoCache, NOW),
                500,
                "M_UNKNOWN",
            );
        }
    }
}
