//! Client-Server API discovery for delayed-leave delegation (issue #8): where a user's
//! homeserver serves the Client-Server API, from `https://<server name>/.well-known/matrix/client`
//! (Matrix spec, Client-Server API "Server Discovery": `m.homeserver.base_url`). The delayed
//! event restart/send calls go there. Host-agnostic: [`plan`] says whether a `.well-known`
//! callout is needed, [`discovered`] reads its answer.
//!
//! Configured `csApiUrls` always win (lk-jwt-service's overrides); found base URLs are cached
//! for [`CACHE_TTL_SECS`] (lk-jwt-service: 4 hours) in the same [`DiscoveryCache`] as
//! federation discovery, under a key no server name can collide with. A discovered base URL
//! is a remote server's word: like a federation `.well-known` delegation it must not point at
//! an internal address unless `allowPrivateAddresses` is set (with `fullAccessHomeservers:
//! ["*"]` anyone's server gets here). `csApiUrls` are the operator's and are not checked.

use std::collections::BTreeMap;

use crate::config::Upstream;
use crate::discovery::{CachedDelegation, DiscoveryCache, HomeserverPolicy};
use crate::matrix::ServerName;

/// How long a discovered Client-Server API base URL is cached, in seconds.
pub const CACHE_TTL_SECS: u64 = 4 * 3600;

/// Path of the client `.well-known` document.
pub const CLIENT_WELL_KNOWN_PATH: &str = "/.well-known/matrix/client";
/// Largest client `.well-known` body read, in bytes.
pub const MAX_CLIENT_WELL_KNOWN_BYTES: usize = 16 * 1024;
/// The error text clients get (400 `M_BAD_JSON`) when the Client-Server API cannot be found,
/// as lk-jwt-service answers.
pub const UNRESOLVABLE: &str = "Unable to resolve client-server API";

/// Why the Client-Server API could not be found from a `.well-known` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientDiscoveryError {
    /// The answer's status was not 200 (or there was none).
    Status(Option<u16>),
    /// The body is larger than [`MAX_CLIENT_WELL_KNOWN_BYTES`].
    TooLarge,
    /// Not JSON with a string `m.homeserver.base_url`.
    Malformed,
    /// `base_url` is not an absolute `http`/`https` URL without query, fragment or user info.
    BadBaseUrl(String),
    /// `base_url` points at an internal address and `allowPrivateAddresses` is off.
    Internal(String),
    /// `base_url` is plain `http` and `allowPrivateAddresses` is off.
    NotHttps(String),
}

impl std::fmt::Display for ClientDiscoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(Some(s)) => write!(f, "client .well-known answered status {s}"),
            Self::Status(None) => f.write_str("no answer for client .well-known"),
            Self::TooLarge => f.write_str("client .well-known too large"),
            Self::Malformed => {
                f.write_str("client .well-known has no string m.homeserver.base_url")
            }
            Self::BadBaseUrl(reason) => write!(f, "client .well-known base_url: {reason}"),
            Self::NotHttps(authority) => write!(
                f,
                "client .well-known base_url http://{authority} is not https \
                 (allowPrivateAddresses is off)"
            ),
            Self::Internal(authority) => write!(
                f,
                "client .well-known base_url points at the internal address {authority} \
                 (allowPrivateAddresses is off)"
            ),
        }
    }
}

/// The Client-Server API base from a `.well-known/matrix/client` answer: `status` and `body`
/// as received. Returns the upstream (scheme, `host:port`, base path without trailing `/`).
pub fn parse_client_well_known(
    status: Option<u16>,
    body: &[u8],
) -> Result<Upstream, ClientDiscoveryError> {
    if status != Some(200) {
        return Err(ClientDiscoveryError::Status(status));
    }
    if body.len() > MAX_CLIENT_WELL_KNOWN_BYTES {
        return Err(ClientDiscoveryError::TooLarge);
    }
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ClientDiscoveryError::Malformed)?;
    let base_url = doc
        .get("m.homeserver")
        .and_then(|h| h.get("base_url"))
        .and_then(serde_json::Value::as_str)
        .ok_or(ClientDiscoveryError::Malformed)?;
    let trimmed = base_url.trim().trim_end_matches('/');
    Upstream::parse(trimmed, false).map_err(ClientDiscoveryError::BadBaseUrl)
}

/// Where the Client-Server API of a server name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPlan {
    /// Known (override or cache): the base.
    Known(Upstream),
    /// Fetch [`CLIENT_WELL_KNOWN_PATH`] from this upstream (`https://<server name>`) first.
    WellKnown(Upstream),
}

/// The cache key of `server_name`'s Client-Server API base (a space never occurs in a
/// server name, so it cannot collide with a federation discovery entry).
fn cache_key(server_name: &str) -> String {
    format!("cs-api {server_name}")
}

/// Decides how to find the Client-Server API of `server_name`: the `overrides`
/// (`csApiUrls`), a fresh `cache` entry (`now` in Unix seconds) that `policy` allows, or a
/// `.well-known` callout.
///
/// # Errors
/// [`ClientDiscoveryError::BadBaseUrl`] when `server_name` is not a valid server name.
pub fn plan(
    server_name: &str,
    overrides: &BTreeMap<String, Upstream>,
    policy: &HomeserverPolicy,
    cache: &dyn DiscoveryCache,
    now: u64,
) -> Result<ClientPlan, ClientDiscoveryError> {
    if let Some(upstream) = overrides.get(server_name) {
        return Ok(ClientPlan::Known(upstream.clone()));
    }
    // The cache is shared with filters that may run a more permissive policy: check again.
    let cached = cache
        .get(&cache_key(server_name))
        .filter(|e| e.expires_at > now)
        .and_then(|e| e.authority)
        .and_then(|url| Upstream::parse(&url, false).ok())
        .filter(|up| allowed(up, policy).is_ok());
    if let Some(upstream) = cached {
        return Ok(ClientPlan::Known(upstream));
    }
    let name = ServerName::parse(server_name).map_err(ClientDiscoveryError::BadBaseUrl)?;
    Ok(ClientPlan::WellKnown(Upstream {
        tls: true,
        authority: format!("{}:{}", name.host_for_authority(), name.port.unwrap_or(443)),
        base_path: String::new(),
    }))
}

/// `Ok` when `policy` lets the proxy call `upstream`: https (a name that merely resolves to an
/// internal address then also needs a certificate for that name) on a host that is not an
/// internal address, unless private addresses are allowed.
fn allowed(upstream: &Upstream, policy: &HomeserverPolicy) -> Result<(), ClientDiscoveryError> {
    if !upstream.tls && !policy.allow_private {
        return Err(ClientDiscoveryError::NotHttps(upstream.authority.clone()));
    }
    let name = ServerName::parse(&upstream.authority).map_err(ClientDiscoveryError::BadBaseUrl)?;
    policy
        .check_host(&name.host)
        .map_err(|_| ClientDiscoveryError::Internal(upstream.authority.clone()))
}

/// Reads the `.well-known/matrix/client` answer for `server_name` ([`parse_client_well_known`]),
/// refuses a base URL on an internal address unless `policy` allows private addresses, and
/// caches the base found until `now` + [`CACHE_TTL_SECS`]. Failures are not cached.
///
/// # Errors
/// As [`parse_client_well_known`]; [`ClientDiscoveryError::Internal`].
pub fn discovered(
    server_name: &str,
    status: Option<u16>,
    body: &[u8],
    policy: &HomeserverPolicy,
    cache: &dyn DiscoveryCache,
    now: u64,
) -> Result<Upstream, ClientDiscoveryError> {
    let upstream = parse_client_well_known(status, body)?;
    allowed(&upstream, policy)?;
    let url = format!(
        "{}://{}{}",
        if upstream.tls { "https" } else { "http" },
        upstream.authority,
        upstream.base_path
    );
    cache.put(
        &cache_key(server_name),
        &CachedDelegation {
            authority: Some(url),
            expires_at: now.saturating_add(CACHE_TTL_SECS),
        },
    );
    Ok(upstream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::MemoryCache;

    #[test]
    fn overrides_then_cache_then_well_known() {
        let cache = MemoryCache::new(8);
        let mut overrides = BTreeMap::new();
        overrides.insert(
            "a.example".to_owned(),
            Upstream::parse("http://127.0.0.1:8008/cs", false).unwrap(),
        );
        let open = HomeserverPolicy::default();
        assert_eq!(
            plan("a.example", &overrides, &open, &cache, 0),
            Ok(ClientPlan::Known(Upstream {
                tls: false,
                authority: "127.0.0.1:8008".into(),
                base_path: "/cs".into()
            }))
        );
        let well_known = plan("b.example:8448", &overrides, &open, &cache, 0).unwrap();
        let ClientPlan::WellKnown(up) = well_known else {
            panic!("{well_known:?}")
        };
        assert_eq!((up.tls, up.authority.as_str()), (true, "b.example:8448"));
        let body = br#"{"m.homeserver":{"base_url":"https://matrix.b.example/base/"}}"#;
        let found = discovered("b.example:8448", Some(200), body, &open, &cache, 100).unwrap();
        assert_eq!(found.base_path, "/base");
        assert_eq!(
            plan("b.example:8448", &overrides, &open, &cache, 101),
            Ok(ClientPlan::Known(found))
        );
        // Stale after the TTL; a federation entry for the same name is another key.
        assert!(matches!(
            plan(
                "b.example:8448",
                &overrides,
                &open,
                &cache,
                100 + CACHE_TTL_SECS
            ),
            Ok(ClientPlan::WellKnown(_))
        ));
        assert_eq!(cache.get("b.example:8448"), None);
        // Failures are not cached.
        assert!(discovered("c.example", Some(404), b"", &open, &cache, 0).is_err());
        assert_eq!(cache.len(), 1);
        assert!(plan("not a name", &overrides, &open, &cache, 0).is_err());
    }

    #[test]
    fn internal_base_urls_need_allow_private_addresses() {
        let cache = MemoryCache::new(8);
        let strict = HomeserverPolicy::default();
        let private = HomeserverPolicy {
            allow_private: true,
            ..HomeserverPolicy::default()
        };
        for url in [
            "https://127.0.0.1:8008/admin",
            "https://10.0.0.1",
            "https://[::1]:8008",
            "https://localhost:8008",
            "https://synapse:8008",
            "http://internal.example.org:8008",
        ] {
            let body = format!(r#"{{"m.homeserver":{{"base_url":"{url}"}}}}"#);
            assert!(
                matches!(
                    discovered("x.example", Some(200), body.as_bytes(), &strict, &cache, 0),
                    Err(ClientDiscoveryError::Internal(_) | ClientDiscoveryError::NotHttps(_))
                ),
                "{url}"
            );
            assert!(
                discovered("x.example", Some(200), body.as_bytes(), &private, &cache, 0).is_ok()
            );
        }
        // Cached under a permissive policy, refused under a strict one.
        assert!(matches!(
            plan("x.example", &BTreeMap::new(), &strict, &cache, 1),
            Ok(ClientPlan::WellKnown(_))
        ));
        assert!(matches!(
            plan("x.example", &BTreeMap::new(), &private, &cache, 1),
            Ok(ClientPlan::Known(_))
        ));
    }

    #[test]
    fn base_url_with_and_without_path() {
        let up = parse_client_well_known(
            Some(200),
            br#"{"m.homeserver":{"base_url":"https://matrix.example.org/"},"m.identity_server":{}}"#,
        )
        .unwrap();
        assert!(up.tls);
        assert_eq!(up.authority, "matrix.example.org:443");
        assert_eq!(up.base_path, "");
        let up = parse_client_well_known(
            Some(200),
            br#"{"m.homeserver":{"base_url":"http://synapse:8008/matrix"}}"#,
        )
        .unwrap();
        assert_eq!(
            (up.tls, up.authority.as_str(), up.base_path.as_str()),
            (false, "synapse:8008", "/matrix")
        );
    }

    #[test]
    fn unusable_answers_are_errors() {
        assert_eq!(
            parse_client_well_known(Some(404), b"{}"),
            Err(ClientDiscoveryError::Status(Some(404)))
        );
        assert_eq!(
            parse_client_well_known(None, b""),
            Err(ClientDiscoveryError::Status(None))
        );
        for body in [
            &b"<html>"[..],
            br#"{"m.homeserver":{}}"#,
            br#"{"m.homeserver":{"base_url":5}}"#,
            br#"[]"#,
        ] {
            assert_eq!(
                parse_client_well_known(Some(200), body),
                Err(ClientDiscoveryError::Malformed)
            );
        }
        for url in [
            "ftp://x.example",
            "https://u:p@x.example",
            "https://x.example/?q",
            "/relative",
        ] {
            let body = format!(r#"{{"m.homeserver":{{"base_url":"{url}"}}}}"#);
            assert!(matches!(
                parse_client_well_known(Some(200), body.as_bytes()),
                Err(ClientDiscoveryError::BadBaseUrl(_))
            ));
        }
        let huge = vec![b' '; MAX_CLIENT_WELL_KNOWN_BYTES + 1];
        assert_eq!(
            parse_client_well_known(Some(200), &huge),
            Err(ClientDiscoveryError::TooLarge)
        );
    }
}
