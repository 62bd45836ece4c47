//! Homeserver discovery for the OpenID userinfo callout, following the Matrix spec's
//! server-server API section "Resolving server names", as far as a proxy filter can:
//!
//! 1. a `homeservers` override for the server name;
//! 2. an IP literal, or any server name with an explicit port: that address;
//! 3. `GET https://<hostname>/.well-known/matrix/server`: its `m.server` (with its own port, or
//!    8448); the answer is cached per its `Cache-Control: max-age` within bounds, failures
//!    briefly;
//! 4. otherwise `<hostname>:8448`.
//!
//! SRV records cannot be looked up from a wasm filter (the host offers no DNS API); a server
//! that relies on them needs an override. Redirects are not followed. Before any callout the
//! [`HomeserverPolicy`] decides whether the server name (and a delegation target) may be called
//! at all, so a client cannot use the proxy to probe the internal network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use crate::config::Upstream;
use crate::matrix::{Host, ServerName, DEFAULT_FEDERATION_PORT};

/// Path of the server discovery document (Matrix spec, "Server discovery").
pub const WELL_KNOWN_PATH: &str = "/.well-known/matrix/server";
/// Largest `.well-known` body parsed, in bytes.
pub const MAX_WELL_KNOWN_BODY_BYTES: usize = 16 * 1024;
/// Cache lifetime of a `.well-known` answer without `Cache-Control: max-age`, seconds (spec: 24 h).
pub const DEFAULT_WELL_KNOWN_TTL_SECS: u64 = 24 * 3600;
/// Shortest cache lifetime of a successful `.well-known` answer, seconds.
pub const MIN_WELL_KNOWN_TTL_SECS: u64 = 5 * 60;
/// Longest cache lifetime of a successful `.well-known` answer, seconds (spec: 48 h).
pub const MAX_WELL_KNOWN_TTL_SECS: u64 = 48 * 3600;
/// Cache lifetime of a failed `.well-known` lookup (error, timeout, garbage), seconds.
pub const FAILURE_TTL_SECS: u64 = 5 * 60;

/// Which homeservers a client-supplied server name may make the proxy call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HomeserverPolicy {
    /// `allowedHomeservers`: when set, only these server names (exact, or `*.suffix` for any
    /// subdomain of `suffix`) are called. `None`: any public server name.
    pub allowed: Option<Vec<String>>,
    /// `allowPrivateAddresses`: when `false` (the default), IP literals in loopback, private,
    /// link-local, shared, unique-local, unspecified, broadcast or multicast ranges,
    /// single-label names (`localhost`, `vm`) and `*.localhost` are refused, as server names
    /// and as `.well-known` delegation targets.
    pub allow_private: bool,
}

/// Why a server name is not called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid server name (Matrix spec appendix grammar).
    Invalid(String),
    /// Not in `allowedHomeservers`.
    NotAllowed,
    /// A private, loopback or otherwise internal address.
    Private,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(r) => write!(f, "not a valid server name ({r})"),
            Refusal::NotAllowed => f.write_str("not in allowedHomeservers"),
            Refusal::Private => {
                f.write_str("an internal address (set allowPrivateAddresses to allow it)")
            }
        }
    }
}

impl HomeserverPolicy {
    fn check_name(&self, server_name: &str) -> Result<(), Refusal> {
        match &self.allowed {
            None => Ok(()),
            Some(list) if list.iter().any(|p| pattern_matches(p, server_name)) => Ok(()),
            Some(_) => Err(Refusal::NotAllowed),
        }
    }

    /// Refuses an internal `host` (see [`HomeserverPolicy::allow_private`]).
    ///
    /// # Errors
    /// [`Refusal::Private`] for an internal host when private addresses are not allowed.
    pub fn check_host(&self, host: &Host) -> Result<(), Refusal> {
        if self.allow_private || !is_internal(host) {
            Ok(())
        } else {
            Err(Refusal::Private)
        }
    }
}

/// `*.example.org` matches any subdomain of `example.org` (not `example.org` itself); anything
/// else matches exactly. Server names compare byte for byte (they are case-sensitive in `sub`).
fn pattern_matches(pattern: &str, server_name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => server_name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == server_name,
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    // Forms that embed an IPv4 address: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
    // translated (::ffff:0:a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    let seg = ip.segments();
    let [s0, s1, s2, s3, s4, s5, s6, s7] = seg;
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let embedded = if let Some(v) = ip.to_ipv4() {
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(v)
    } else if [s0, s1, s2, s3, s4, s5] == [0, 0, 0, 0, 0xffff, 0]
        || [s0, s1, s2, s3, s4, s5] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        Some(v4(s6, s7))
    } else if s0 == 0x2002 {
        Some(v4(s1, s2))
    } else {
        None
    };
    if embedded.is_some_and(is_internal_v4) {
        return true;
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s0 & 0xfe00) == 0xfc00
        || (s0 & 0xffc0) == 0xfe80
        || (s0 & 0xffc0) == 0xfec0
}

/// DNS suffixes that only resolve inside a network (RFC 6761/6762/8375, cloud metadata,
/// Kubernetes): never a public homeserver.
const INTERNAL_SUFFIXES: [&str; 8] = [
    "localhost",
    "localdomain",
    "local",
    "internal",
    "lan",
    "home.arpa",
    "svc",
    "cluster.local",
];

/// `true` for hosts a client must not make the proxy dial unless private addresses are allowed.
pub fn is_internal(host: &Host) -> bool {
    match host {
        Host::Ipv4(ip) => is_internal_v4(*ip),
        Host::Ipv6(ip) => is_internal_v6(*ip),
        Host::Dns(name) => {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            // Single-label names (`localhost`, `vm`, `metadata`) only resolve through local
            // search domains or /etc/hosts: never a public homeserver.
            !lower.contains('.')
                || INTERNAL_SUFFIXES.iter().any(|suffix| {
                    lower == *suffix
                        || lower
                            .strip_suffix(suffix)
                            .is_some_and(|head| head.ends_with('.'))
                })
        }
    }
}

/// Converts an IP address to a [`Host`].
pub fn host_of(ip: IpAddr) -> Host {
    match ip {
        IpAddr::V4(v4) => Host::Ipv4(v4),
        IpAddr::V6(v6) => Host::Ipv6(v6),
    }
}

/// A cached `.well-known` result for one server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDelegation {
    /// Where userinfo goes (`host:port`, TLS), or `None` when the lookup failed and the
    /// fallback `<hostname>:8448` applies.
    pub authority: Option<String>,
    /// Unix time (seconds) after which the entry is stale.
    pub expires_at: u64,
}

/// Storage for `.well-known` results, shared by all workers where the host allows it.
/// Implementations bound their size; a lost entry only costs one more lookup.
pub trait DiscoveryCache {
    /// The entry for `server_name`, if present (fresh or stale; the caller checks expiry).
    fn get(&self, server_name: &str) -> Option<CachedDelegation>;
    /// Stores the entry for `server_name`.
    fn put(&self, server_name: &str, entry: &CachedDelegation);
}

/// A cache that stores nothing (every lookup fetches `.well-known`).
pub struct NoCache;

impl DiscoveryCache for NoCache {
    fn get(&self, _: &str) -> Option<CachedDelegation> {
        None
    }
    fn put(&self, _: &str, _: &CachedDelegation) {}
}

/// A cache in the memory of one instance (the Traefik plugin: http-wasm has no shared data
/// between instances), holding at most `capacity` server names; when full, a new name empties
/// it first, so clients cannot grow it by sending many names.
pub struct MemoryCache {
    capacity: usize,
    entries: std::cell::RefCell<std::collections::HashMap<String, CachedDelegation>>,
}

impl MemoryCache {
    /// An empty cache for at most `capacity` server names.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: std::cell::RefCell::default(),
        }
    }

    /// How many server names it holds.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// `true` when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }
}

impl DiscoveryCache for MemoryCache {
    fn get(&self, server_name: &str) -> Option<CachedDelegation> {
        self.entries.borrow().get(server_name).cloned()
    }

    fn put(&self, server_name: &str, entry: &CachedDelegation) {
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= self.capacity && !entries.contains_key(server_name) {
            entries.clear();
        }
        entries.insert(server_name.to_owned(), entry.clone());
    }
}

/// What to do for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Call userinfo at this upstream.
    Direct(Upstream),
    /// Fetch `https://<host>/.well-known/matrix/server` from this upstream (`host:443`) first.
    WellKnown(Upstream),
}

/// Decides where the userinfo callout for `server_name` goes.
///
/// `overrides` are the configured `homeservers` (always honoured); `cache` holds earlier
/// `.well-known` results, `now` is Unix seconds.
///
/// # Errors
/// A [`Refusal`] when the server name is invalid, not allowed, or internal.
pub fn plan(
    server_name: &str,
    overrides: &std::collections::BTreeMap<String, Upstream>,
    policy: &HomeserverPolicy,
    cache: &dyn DiscoveryCache,
    now: u64,
) -> Result<Plan, Refusal> {
    if let Some(upstream) = overrides.get(server_name) {
        return Ok(Plan::Direct(upstream.clone()));
    }
    let name = ServerName::parse(server_name).map_err(Refusal::Invalid)?;
    policy.check_name(server_name)?;
    policy.check_host(&name.host)?;
    if name.port.is_some() || !matches!(name.host, Host::Dns(_)) {
        return Ok(Plan::Direct(name.default_upstream()));
    }
    if let Some(entry) = cache.get(server_name).filter(|e| e.expires_at > now) {
        let authority = match entry.authority {
            // The cache is shared by every filter instance of the VM, which may run under a
            // more permissive policy: check the cached target against this one.
            Some(authority) => {
                let target = ServerName::parse(&authority).map_err(Refusal::Invalid)?;
                policy.check_host(&target.host)?;
                authority
            }
            None => name.default_upstream().authority,
        };
        return Ok(Plan::Direct(tls_upstream(authority)));
    }
    Ok(Plan::WellKnown(tls_upstream(format!(
        "{}:443",
        name.host_for_authority()
    ))))
}

fn tls_upstream(authority: String) -> Upstream {
    Upstream {
        tls: true,
        authority,
        base_path: String::new(),
    }
}

#[derive(Deserialize)]
struct WellKnownBody {
    #[serde(rename = "m.server")]
    m_server: String,
}

/// The outcome of a `.well-known` lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Where userinfo goes.
    pub upstream: Upstream,
    /// What to cache for the server name.
    pub entry: CachedDelegation,
    /// Why the fallback was used, for the log (`None` on a valid delegation).
    pub fallback_reason: Option<String>,
}

/// Interprets a `.well-known/matrix/server` answer for `server_name` (a DNS name without port).
///
/// `status` is the answer's HTTP status (`None`: no answer: timeout, reset, unreachable);
/// `cache_control` its `Cache-Control` header; `body` its bytes; `now` Unix seconds.
/// A valid `m.server` gives its host and port (8448 when absent); anything else falls back to
/// `<hostname>:8448` (Matrix spec) and is cached for [`FAILURE_TTL_SECS`].
///
/// # Errors
/// [`Refusal::Private`] when `m.server` points at an internal address the policy refuses.
pub fn discovered(
    server_name: &str,
    status: Option<u16>,
    cache_control: Option<&str>,
    body: &[u8],
    policy: &HomeserverPolicy,
    now: u64,
) -> Result<Discovered, Refusal> {
    let fallback = |reason: String| -> Result<Discovered, Refusal> {
        let name = ServerName::parse(server_name).map_err(Refusal::Invalid)?;
        Ok(Discovered {
            upstream: name.default_upstream(),
            entry: CachedDelegation {
                authority: None,
                expires_at: now.saturating_add(FAILURE_TTL_SECS),
            },
            fallback_reason: Some(reason),
        })
    };
    match status {
        Some(200) => {}
        Some(s) => return fallback(format!(".well-known answered status {s}")),
        None => return fallback(".well-known lookup failed (no answer)".to_owned()),
    }
    if body.len() > MAX_WELL_KNOWN_BODY_BYTES {
        return fallback(".well-known answer too large".to_owned());
    }
    let target = match serde_json::from_slice::<WellKnownBody>(body) {
        Ok(b) => b.m_server,
        Err(_) => return fallback(".well-known answer has no string m.server".to_owned()),
    };
    let delegated = match ServerName::parse(&target) {
        Ok(d) => d,
        Err(r) => return fallback(format!(".well-known m.server is not a server name ({r})")),
    };
    policy.check_host(&delegated.host)?;
    let ttl = max_age(cache_control)
        .unwrap_or(DEFAULT_WELL_KNOWN_TTL_SECS)
        .clamp(MIN_WELL_KNOWN_TTL_SECS, MAX_WELL_KNOWN_TTL_SECS);
    let authority = format!(
        "{}:{}",
        delegated.host_for_authority(),
        delegated.port.unwrap_or(DEFAULT_FEDERATION_PORT)
    );
    Ok(Discovered {
        upstream: tls_upstream(authority.clone()),
        entry: CachedDelegation {
            authority: Some(authority),
            expires_at: now.saturating_add(ttl),
        },
        fallback_reason: None,
    })
}

/// The `max-age` of a `Cache-Control` header in seconds; `no-store`/`no-cache` count as 0.
fn max_age(cache_control: Option<&str>) -> Option<u64> {
    let value = cache_control?;
    let mut age = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(0);
        }
        if let Some(n) = lower.strip_prefix("max-age=") {
            age = n.trim_matches('"').parse::<u64>().ok();
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn open() -> HomeserverPolicy {
        HomeserverPolicy::default()
    }

    fn direct(authority: &str) -> Plan {
        Plan::Direct(tls_upstream(authority.to_owned()))
    }

    #[test]
    fn memory_cache_is_bounded() {
        let cache = MemoryCache::new(2);
        let entry = CachedDelegation {
            authority: None,
            expires_at: 1,
        };
        cache.put("a.example", &entry);
        cache.put("b.example", &entry);
        cache.put("a.example", &entry);
        assert_eq!(cache.len(), 2, "updating a held name does not evict");
        cache.put("c.example", &entry);
        assert_eq!(cache.len(), 1, "a new name beyond capacity starts over");
        assert_eq!(cache.get("c.example"), Some(entry));
        assert!(cache.get("a.example").is_none());
    }

    #[test]
    fn resolution_order() {
        let mut overrides = BTreeMap::new();
        overrides.insert(
            "example.org".to_owned(),
            Upstream {
                tls: false,
                authority: "synapse:8008".into(),
                base_path: String::new(),
            },
        );
        let p = |s: &str| plan(s, &overrides, &open(), &NoCache, 0);
        assert!(matches!(p("example.org"), Ok(Plan::Direct(u)) if u.authority == "synapse:8008"));
        assert_eq!(p("example.com:8448"), Ok(direct("example.com:8448")));
        assert_eq!(p("192.0.2.1"), Ok(direct("192.0.2.1:8448")));
        assert_eq!(p("[2001:db8::1]:443"), Ok(direct("[2001:db8::1]:443")));
        assert_eq!(
            p("example.com"),
            Ok(Plan::WellKnown(tls_upstream("example.com:443".into())))
        );
        assert!(matches!(p("bad name"), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn private_addresses_refused_by_default() {
        let none = BTreeMap::new();
        for name in [
            "127.0.0.1:8448",
            "10.0.0.1",
            "172.16.0.1:443",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "[::1]:8448",
            "[fd00::1]",
            "[fe80::1]",
            "[::ffff:10.0.0.1]",
            "localhost",
            "localhost:8448",
            "foo.localhost",
        ] {
            assert_eq!(
                plan(name, &none, &open(), &NoCache, 0),
                Err(Refusal::Private),
                "{name}"
            );
            let allow = HomeserverPolicy {
                allow_private: true,
                ..open()
            };
            assert!(plan(name, &none, &allow, &NoCache, 0).is_ok(), "{name}");
        }
        assert!(plan("8.8.8.8:8448", &none, &open(), &NoCache, 0).is_ok());
        assert!(plan("[2001:db8::1]:8448", &none, &open(), &NoCache, 0).is_ok());
        assert!(plan("[64:ff9b::808:808]", &none, &open(), &NoCache, 0).is_ok());
        assert!(plan("matrix.internals.example", &none, &open(), &NoCache, 0).is_ok());
    }

    #[test]
    fn allow_list() {
        let none = BTreeMap::new();
        let policy = HomeserverPolicy {
            allowed: Some(vec!["example.org".into(), "*.example.net".into()]),
            allow_private: false,
        };
        let p = |s: &str| plan(s, &none, &policy, &NoCache, 0);
        assert!(p("example.org").is_ok());
        assert!(p("matrix.example.net").is_ok());
        assert_eq!(p("example.net"), Err(Refusal::NotAllowed));
        assert_eq!(p("evilexample.net"), Err(Refusal::NotAllowed));
        assert_eq!(p("example.org:8448"), Err(Refusal::NotAllowed));
        assert_eq!(p("other.example"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn well_known_delegation_and_cache() {
        let cache = MemoryCache::new(64);
        let none = BTreeMap::new();
        let d = discovered(
            "example.org",
            Some(200),
            Some("public, max-age=3600"),
            br#"{"m.server":"matrix.example.org:443"}"#,
            &open(),
            1000,
        )
        .unwrap();
        assert_eq!(d.upstream.authority, "matrix.example.org:443");
        assert_eq!(d.entry.expires_at, 1000 + 3600);
        cache.put("example.org", &d.entry);
        assert_eq!(
            plan("example.org", &none, &open(), &cache, 2000),
            Ok(direct("matrix.example.org:443"))
        );
        // A cached target is checked against the current policy (the cache is shared).
        let strict_cache = MemoryCache::new(64);
        strict_cache.put(
            "example.net",
            &CachedDelegation {
                authority: Some("127.0.0.1:8008".into()),
                expires_at: 9999,
            },
        );
        assert_eq!(
            plan("example.net", &none, &open(), &strict_cache, 2000),
            Err(Refusal::Private)
        );
        let allow = HomeserverPolicy {
            allow_private: true,
            ..open()
        };
        assert_eq!(
            plan("example.net", &none, &allow, &strict_cache, 2000),
            Ok(direct("127.0.0.1:8008"))
        );
        // Stale → fetch again.
        assert!(matches!(
            plan("example.org", &none, &open(), &cache, 5000),
            Ok(Plan::WellKnown(_))
        ));
    }

    #[test]
    fn well_known_port_defaults_and_ttl_bounds() {
        let d =
            |body: &[u8], cc| discovered("example.org", Some(200), cc, body, &open(), 0).unwrap();
        let a = d(br#"{"m.server":"matrix.example.org"}"#, None);
        assert_eq!(a.upstream.authority, "matrix.example.org:8448");
        assert_eq!(a.entry.expires_at, DEFAULT_WELL_KNOWN_TTL_SECS);
        assert_eq!(
            d(br#"{"m.server":"[2001:db8::2]"}"#, Some("max-age=1"))
                .upstream
                .authority,
            "[2001:db8::2]:8448"
        );
        assert_eq!(
            d(br#"{"m.server":"h.example"}"#, Some("max-age=1"))
                .entry
                .expires_at,
            MIN_WELL_KNOWN_TTL_SECS
        );
        assert_eq!(
            d(br#"{"m.server":"h.example"}"#, Some("max-age=9999999"))
                .entry
                .expires_at,
            MAX_WELL_KNOWN_TTL_SECS
        );
        assert_eq!(
            d(br#"{"m.server":"h.example"}"#, Some("no-store"))
                .entry
                .expires_at,
            MIN_WELL_KNOWN_TTL_SECS
        );
    }

    #[test]
    fn well_known_failures_fall_back_to_8448() {
        for (status, body) in [
            (Some(404), &b"{}"[..]),
            (None, &b""[..]),
            (Some(200), &b"<html>"[..]),
            (Some(200), &br#"{"m.server": 5}"#[..]),
            (Some(200), &br#"{"m.server": "bad name"}"#[..]),
            (Some(301), &b""[..]),
        ] {
            let d = discovered("example.org", status, None, body, &open(), 100).unwrap();
            assert_eq!(d.upstream.authority, "example.org:8448");
            assert_eq!(
                d.entry,
                CachedDelegation {
                    authority: None,
                    expires_at: 100 + FAILURE_TTL_SECS
                }
            );
            assert!(d.fallback_reason.is_some());
        }
    }

    #[test]
    fn delegation_to_internal_address_refused() {
        let r = discovered(
            "example.org",
            Some(200),
            None,
            br#"{"m.server":"127.0.0.1:8008"}"#,
            &open(),
            0,
        );
        assert_eq!(r, Err(Refusal::Private));
        let allow = HomeserverPolicy {
            allow_private: true,
            ..open()
        };
        assert!(discovered(
            "example.org",
            Some(200),
            None,
            br#"{"m.server":"127.0.0.1:8008"}"#,
            &allow,
            0
        )
        .is_ok());
    }
}
