//! Matrix: server names, the OpenID userinfo callout, and Matrix-style error answers.
//!
//! Sources: Matrix spec appendix "Server Name" (grammar), server-server API
//! `GET /_matrix/federation/v1/openid/userinfo` (verification of a Matrix OpenID token), and
//! the client-server API's standard error response (`errcode`, `error`).

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use crate::config::Upstream;

/// The port federation uses when a server name has none (Matrix spec, server-name resolution).
pub const DEFAULT_FEDERATION_PORT: u16 = 8448;

/// Largest userinfo answer body that is parsed, in bytes; a larger one fails verification.
pub const MAX_USERINFO_BODY_BYTES: usize = 16 * 1024;

/// The host part of a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name (`example.org`).
    Dns(String),
    /// An IPv4 literal (`192.0.2.1`).
    Ipv4(Ipv4Addr),
    /// An IPv6 literal, written in brackets in a server name (`[2001:db8::1]`).
    Ipv6(Ipv6Addr),
}

/// A Matrix server name (`host[:port]`) as defined in the Matrix spec appendix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    /// The host.
    pub host: Host,
    /// The explicit port, if the server name has one.
    pub port: Option<u16>,
}

impl ServerName {
    /// Parses a server name: `dns-name | IPv4address | "[" IPv6address "]"`, then optional
    /// `:port` (1–5 digits, 1–65535). DNS names are 1–255 characters of `A-Z a-z 0-9 - .`.
    ///
    /// Errors (as a reason string) on anything else.
    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() > 255 + 6 {
            return Err("empty or too long".to_owned());
        }
        let (host, port) = if let Some(rest) = name.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| "unclosed `[`".to_owned())?;
            let ip: Ipv6Addr = ip.parse().map_err(|_| "invalid IPv6 literal".to_owned())?;
            let port = match after {
                "" => None,
                p => Some(parse_port(p.strip_prefix(':').ok_or("junk after `]`")?)?),
            };
            (Host::Ipv6(ip), port)
        } else {
            let (host, port) = match name.rsplit_once(':') {
                Some((h, p)) => (h, Some(parse_port(p)?)),
                None => (name, None),
            };
            let host = if let Ok(ip) = host.parse::<Ipv4Addr>() {
                Host::Ipv4(ip)
            } else {
                let valid = !host.is_empty()
                    && host.len() <= 255
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !valid {
                    return Err("invalid host".to_owned());
                }
                // A name whose last label is numeric (or hex) is no DNS name but a non-canonical
                // address that resolvers read as IPv4 (`127.0.0.01`, `127.1`, `2130706433`,
                // `0x7f.1`): refusing it keeps the private-address checks meaningful.
                let last = host
                    .trim_end_matches('.')
                    .rsplit('.')
                    .next()
                    .unwrap_or_default();
                if last.bytes().all(|b| b.is_ascii_digit())
                    || last.to_ascii_lowercase().starts_with("0x")
                {
                    return Err("not a canonical IPv4 address nor a DNS name".to_owned());
                }
                Host::Dns(host.to_owned())
            };
            (host, port)
        };
        Ok(Self { host, port })
    }

    /// The host as written in an authority (`example.org`, `192.0.2.1`, `[2001:db8::1]`).
    pub fn host_for_authority(&self) -> String {
        match &self.host {
            Host::Dns(h) => h.clone(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => format!("[{ip}]"),
        }
    }

    /// Where the userinfo callout goes without an override: the explicit port, or 8448.
    ///
    /// This is the Matrix server-name resolution without `.well-known` and SRV (those come
    /// with homeserver discovery); always TLS, as federation is.
    pub fn default_upstream(&self) -> Upstream {
        Upstream {
            tls: true,
            authority: format!(
                "{}:{}",
                self.host_for_authority(),
                self.port.unwrap_or(DEFAULT_FEDERATION_PORT)
            ),
            base_path: String::new(),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err("invalid port".to_owned());
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err("port out of range".to_owned()),
        Ok(port) => Ok(port),
    }
}

/// The path and query of the OpenID userinfo request for `access_token`, below `base_path`.
///
/// Returns `<base_path>/_matrix/federation/v1/openid/userinfo?access_token=<form-encoded>`
/// (server-server API, "OpenID"). The token is encoded as a query value (Go's
/// `url.QueryEscape` rules: space as `+`, everything but unreserved characters escaped).
pub fn userinfo_path(base_path: &str, access_token: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(access_token.as_bytes()).collect();
    format!("{base_path}/_matrix/federation/v1/openid/userinfo?access_token={encoded}")
}

#[derive(Deserialize)]
struct UserinfoBody {
    sub: String,
}

/// Why an OpenID token was not accepted (logged; the client always gets 401 `M_UNAUTHORIZED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserinfoError {
    /// The homeserver (or the proxy on its behalf) answered with a non-2xx status.
    Status(u16),
    /// The answer had no status at all (connection reset after headers, for example).
    NoStatus,
    /// The answer body is larger than [`MAX_USERINFO_BODY_BYTES`].
    TooLarge,
    /// The body is not JSON with a string `sub`.
    Malformed,
    /// `sub` is not a Matrix user ID on the server name the client sent.
    WrongServer,
    /// `sub`'s localpart has characters no Matrix user ID has, or it is over 255 bytes.
    InvalidUserId,
}

impl std::fmt::Display for UserinfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "homeserver answered status {s}"),
            Self::NoStatus => f.write_str("no answer from the homeserver"),
            Self::TooLarge => f.write_str("userinfo answer too large"),
            Self::Malformed => f.write_str("userinfo answer is not JSON with a string `sub`"),
            Self::WrongServer => {
                f.write_str("userinfo `sub` is not a user of the server name the client sent")
            }
            Self::InvalidUserId => f.write_str("userinfo `sub` is not a valid Matrix user ID"),
        }
    }
}

/// Checks a userinfo answer and returns the verified Matrix user ID (`sub`).
///
/// `status` is the HTTP status of the answer (`None` when there was none); `body` its bytes;
/// `matrix_server_name` the server name from the client's `openid_token`. The `sub` must be
/// `@localpart:server` with `server` (everything after the first `:`) equal to
/// `matrix_server_name` byte for byte, or one homeserver could vouch for another's users.
///
/// # Errors
/// A [`UserinfoError`] saying why the token is not accepted.
pub fn verify_userinfo(
    status: Option<u16>,
    body: &[u8],
    matrix_server_name: &str,
) -> Result<String, UserinfoError> {
    match status {
        None => return Err(UserinfoError::NoStatus),
        Some(s) if !(200..300).contains(&s) => return Err(UserinfoError::Status(s)),
        Some(_) => {}
    }
    if body.len() > MAX_USERINFO_BODY_BYTES {
        return Err(UserinfoError::TooLarge);
    }
    let parsed: UserinfoBody =
        serde_json::from_slice(body).map_err(|_| UserinfoError::Malformed)?;
    let (local, server) = parsed
        .sub
        .strip_prefix('@')
        .and_then(|s| s.split_once(':'))
        .ok_or(UserinfoError::WrongServer)?;
    if local.is_empty() || server != matrix_server_name {
        return Err(UserinfoError::WrongServer);
    }
    // Matrix spec appendix "User Identifiers": the (historical) localpart grammar is printable
    // ASCII without `:`, and a user ID is at most 255 bytes. Anything else (whitespace, control
    // characters, non-ASCII) is no user ID: refusing it also keeps it out of log lines.
    if parsed.sub.len() > 255
        || !local
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b':')
    {
        return Err(UserinfoError::InvalidUserId);
    }
    Ok(parsed.sub)
}

/// A Matrix-style error answer: HTTP status, `errcode` and human-readable `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixError {
    /// HTTP status code.
    pub status: u16,
    /// Matrix error code (`M_…`).
    pub errcode: &'static str,
    /// Human-readable message.
    pub error: &'static str,
}

/// The text of [`MatrixError::DELEGATION_UNAVAILABLE`].
const DELEGATION_UNAVAILABLE_TEXT: &str =
    "Delayed leave delegation is not available on this server";

impl MatrixError {
    /// 400: the body is not JSON or has a field unknown to the request type (lk-jwt-service).
    pub const NOT_JSON: Self = Self::new(400, "M_NOT_JSON", "Error reading request");
    /// 401: the OpenID token could not be verified, or the claimed user differs (lk-jwt-service).
    pub const UNAUTHORIZED: Self = Self::new(
        401,
        "M_UNAUTHORIZED",
        "The request could not be authorised.",
    );
    /// 500: LiveKit room creation failed (lk-jwt-service).
    pub const ROOM_CREATION_FAILED: Self =
        Self::new(500, "M_UNKNOWN", "Unable to create room on SFU");
    /// 500: minting the LiveKit access token failed.
    pub const TOKEN_MINTING_FAILED: Self = Self::new(
        500,
        "M_UNKNOWN",
        "Unable to create the LiveKit access token",
    );
    /// 413: the request body is over the filter's limit.
    pub const TOO_LARGE: Self = Self::new(413, "M_TOO_LARGE", "Request body too large");
    /// 405: known endpoint, other method (Matrix spec: `M_UNRECOGNIZED`).
    pub const METHOD_NOT_ALLOWED: Self =
        Self::new(405, "M_UNRECOGNIZED", "Method not allowed on this endpoint");
    /// 404: an endpoint of lk-jwt-service this filter does not serve yet.
    pub const UNRECOGNIZED: Self = Self::new(404, "M_UNRECOGNIZED", "Unrecognized request");
    /// 403: `/delegate_delayed_leave` from a user of a homeserver without full access
    /// (lk-jwt-service).
    pub const DELEGATION_FORBIDDEN: Self = Self::new(
        403,
        "M_FORBIDDEN",
        "Delegation of delayed events is only supported for full access users",
    );
    /// 400: delay parameters on a token endpoint from a user without full access
    /// (lk-jwt-service).
    pub const DELEGATION_RESTRICTED: Self =
        Self::bad_json("Delegation of delayed events is only supported for full access users");
    /// 400: the user's Client-Server API could not be found (lk-jwt-service).
    pub const CS_API_UNRESOLVABLE: Self = Self::bad_json(crate::client_discovery::UNRESOLVABLE);
    /// 400 (token endpoints) / 404 (`/delegate_delayed_leave`, `/sfu_webhook`): this proxy
    /// runs no delayed-leave jobs (Traefik: no timers; Envoy: the job service is not set up).
    pub const DELEGATION_UNAVAILABLE: Self = Self::bad_json(DELEGATION_UNAVAILABLE_TEXT);
    /// 404 variant of [`Self::DELEGATION_UNAVAILABLE`] for the delegation endpoints.
    pub const DELEGATION_ENDPOINT_UNAVAILABLE: Self =
        Self::new(404, "M_UNRECOGNIZED", DELEGATION_UNAVAILABLE_TEXT);
    /// 503: the job could not be handed to the job service (Envoy shared queue full or gone).
    pub const DELEGATION_FAILED: Self = Self::new(
        503,
        "M_UNKNOWN",
        "Delayed leave delegation is temporarily unavailable",
    );
    /// 401: a `/sfu_webhook` request that is not signed by the configured LiveKit API key.
    pub const WEBHOOK_REFUSED: Self =
        Self::new(401, "M_UNAUTHORIZED", "The webhook could not be verified.");

    /// A new error answer.
    pub const fn new(status: u16, errcode: &'static str, error: &'static str) -> Self {
        Self {
            status,
            errcode,
            error,
        }
    }

    /// 400 `M_BAD_JSON` with a message naming what is wrong.
    pub const fn bad_json(error: &'static str) -> Self {
        Self::new(400, "M_BAD_JSON", error)
    }

    /// The JSON body `{"errcode":"…","error":"…"}`.
    pub fn body(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            errcode: &'a str,
            error: &'a str,
        }
        serde_json::to_vec(&Body {
            errcode: self.errcode,
            error: self.error,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_grammar() {
        let ok = |s: &str| ServerName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(
            ok("example.org").default_upstream().authority,
            "example.org:8448"
        );
        assert_eq!(
            ok("example.org:443").default_upstream().authority,
            "example.org:443"
        );
        assert_eq!(ok("127.0.0.1:8448").host, Host::Ipv4(Ipv4Addr::LOCALHOST));
        assert_eq!(ok("[::1]:8448").default_upstream().authority, "[::1]:8448");
        assert_eq!(
            ok("[2001:db8::1]").default_upstream().authority,
            "[2001:db8::1]:8448"
        );
        assert!(ok("example.org").default_upstream().tls);
        for bad in [
            "",
            ":80",
            "example.org:",
            "example.org:0",
            "example.org:65536",
            "example.org:123456",
            "exa mple.org",
            "example.org/x",
            "user@example.org",
            "[::1",
            "[nope]:1",
            "::1",
            "example.org:80:90",
            "[::1]x",
            "exämple.org",
        ] {
            assert!(ServerName::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn userinfo_path_encodes_token() {
        assert_eq!(
            userinfo_path("", "a b+c/&=?%é"),
            "/_matrix/federation/v1/openid/userinfo?access_token=a+b%2Bc%2F%26%3D%3F%25%C3%A9"
        );
        assert_eq!(
            userinfo_path("/base", "tok"),
            "/base/_matrix/federation/v1/openid/userinfo?access_token=tok"
        );
    }

    #[test]
    fn userinfo_checks() {
        let v = |status, body: &str, server| verify_userinfo(status, body.as_bytes(), server);
        assert_eq!(
            v(Some(200), r#"{"sub":"@alice:example.org"}"#, "example.org"),
            Ok("@alice:example.org".to_owned())
        );
        assert_eq!(
            v(
                Some(200),
                r#"{"sub":"@alice:example.org:8448"}"#,
                "example.org:8448"
            ),
            Ok("@alice:example.org:8448".to_owned())
        );
        assert_eq!(
            v(
                Some(200),
                r#"{"sub":"@mallory:other.example"}"#,
                "example.org"
            ),
            Err(UserinfoError::WrongServer)
        );
        assert_eq!(
            v(Some(200), r#"{"sub":"@a:example.org"}"#, "Example.org"),
            Err(UserinfoError::WrongServer)
        );
        assert_eq!(
            v(Some(200), r#"{"sub":"alice:example.org"}"#, "example.org"),
            Err(UserinfoError::WrongServer)
        );
        assert_eq!(
            v(Some(200), r#"{"sub":"@:example.org"}"#, "example.org"),
            Err(UserinfoError::WrongServer)
        );
        assert_eq!(
            v(Some(200), r#"{"sub":5}"#, "example.org"),
            Err(UserinfoError::Malformed)
        );
        assert_eq!(
            v(Some(200), "<html>", "example.org"),
            Err(UserinfoError::Malformed)
        );
        assert_eq!(
            v(Some(401), r#"{"errcode":"M_UNKNOWN_TOKEN"}"#, "example.org"),
            Err(UserinfoError::Status(401))
        );
        assert_eq!(v(None, "", "example.org"), Err(UserinfoError::NoStatus));
        let big = format!(
            r#"{{"sub":"@a:example.org","pad":"{}"}}"#,
            "x".repeat(20_000)
        );
        assert_eq!(
            v(Some(200), &big, "example.org"),
            Err(UserinfoError::TooLarge)
        );
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            String::from_utf8(MatrixError::UNAUTHORIZED.body()).unwrap(),
            r#"{"errcode":"M_UNAUTHORIZED","error":"The request could not be authorised."}"#
        );
        assert_eq!(
            String::from_utf8(MatrixError::NOT_JSON.body()).unwrap(),
            r#"{"errcode":"M_NOT_JSON","error":"Error reading request"}"#
        );
    }
}
