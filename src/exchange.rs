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

use crate::config::{Settings, TokenService, Upstream};
use crate::discovery::{self, DiscoveryCache, Plan};
use crate::livekit::{self, Claims};
use crate::matrix::{self, MatrixError};
use crate::path::{self, Prefix};
use crate::requests::{TokenEndpoint, TokenRequest};
use crate::response::LocalResponse;

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
/// `P/healthz` and `P/delegate_delayed_leave` for each strip prefix P, or the root paths
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
        "/sfu/get" | "/get_token" | "/healthz" | "/delegate_delayed_leave"
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
        "/delegate_delayed_leave" => {
            return Some(Decision::Respond(LocalResponse::error(
                MatrixError::UNRECOGNIZED,
            )))
        }
        _ => return None,
    };
    Some(match method {
        "POST" => Decision::ReadBody(endpoint),
        "OPTIONS" => Decision::Respond(LocalResponse::preflight()),
        _ => Decision::Respond(LocalResponse::error(MatrixError::METHOD_NOT_ALLOWED)),
    })
}

/// Which dependency a callout goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutTarget {
    /// The user's homeserver (OpenID userinfo).
    Homeserver,
    /// The server name's `.well-known/matrix/server` (discovery, over TLS).
    WellKnown,
    /// The LiveKit server API (CreateRoom).
    LiveKit,
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
}

#[derive(Debug)]
enum State {
    AwaitWellKnown(TokenRequest),
    AwaitUserinfo(TokenRequest),
    AwaitCreateRoom {
        identity: String,
        alias: String,
        full_access: bool,
        user_id: String,
    },
    Done,
}

/// One token request in flight: the state machine from the request body to the answer.
#[derive(Debug)]
pub struct TokenExchange {
    state: State,
    issued_full_access: Option<bool>,
}

impl TokenExchange {
    /// Starts an exchange for a whole request `body` sent to `endpoint`; `cache` holds
    /// `.well-known` results, `now` is Unix seconds.
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
    ) -> (Self, Step) {
        let request = match TokenRequest::decode(endpoint, body) {
            Ok(r) => r,
            Err(e) => {
                log::info!("token request refused: {} {}", e.errcode, e.error);
                return Self::done(LocalResponse::error(e));
            }
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
                let exchange = Self {
                    state: State::AwaitUserinfo(request),
                    issued_full_access: None,
                };
                (exchange, Step::Callout(callout))
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
                let exchange = Self {
                    state: State::AwaitWellKnown(request),
                    issued_full_access: None,
                };
                (exchange, Step::Callout(callout))
            }
        }
    }

    fn done(response: LocalResponse) -> (Self, Step) {
        (
            Self {
                state: State::Done,
                issued_full_access: None,
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
            State::AwaitUserinfo(request) => self.after_userinfo(service, request, result, now),
            State::AwaitCreateRoom {
                identity,
                alias,
                full_access,
                user_id,
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
                        Step::Respond(LocalResponse::token(&service.livekit_url, &jwt))
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
        if request.wants_delayed_leave {
            return Step::Respond(LocalResponse::error(MatrixError::bad_json(
                "Delayed leave delegation (delay_id, delay_timeout) is not supported by this server",
            )));
        }
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
            Step::Respond(r) => panic!(
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
        assert!(
            matches!(route(&s, "POST", "/livekit-jwt-service/delegate_delayed_leave"), Decision::Respond(r) if r.status == 404)
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
        );
        expect_error(step, 401, "M_UNAUTHORIZED");
    }

    #[test]
    fn delayed_leave_refused_after_openid_check() {
        let s = settings(HS_OVERRIDE);
        let t = s.token_service.as_ref().unwrap();
        let mut b = body("example.org", "@alice:example.org");
        b.pop();
        b.extend_from_slice(br#","delay_id":"d1","delay_timeout":10000}"#);
        let (mut ex, step) = TokenExchange::start(t, TokenEndpoint::GetToken, &b, &NoCache, NOW);
        expect_callout(step);
        expect_error(
            ex.on_callout_response(t, ok(200, r#"{"sub":"@alice:example.org"}"#), &NoCache, NOW),
            400,
            "M_BAD_JSON",
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
