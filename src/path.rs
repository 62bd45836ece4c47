//! Strip-prefix: the path rules of `SPEC.md` section 3.
//!
//! A configured [`Prefix`] matches a request path only at a segment boundary; the rest of the
//! path is forwarded with the slashes where the prefix ended collapsed to one, so the upstream
//! never sees `//get_token` (which Go's `net/http` answers with a 301 that makes Element Call
//! connect without audio or video). Percent-encoding is never decoded and the query string is
//! kept byte for byte.

/// A validated strip prefix: starts with `/`, no trailing `/`, at least one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// Validates a configured prefix such as `/livekit-jwt-service` or `/livekit-jwt-service/`.
    ///
    /// Trailing slashes are ignored. Errors (as a reason string) when the prefix does not start
    /// with `/`, is `/` alone, has an empty segment (`//`), or contains `?`, `#`, whitespace
    /// or control characters (they cannot be part of a request path).
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err(format!("`{raw}` must start with `/`"));
        }
        let trimmed = raw.trim_end_matches('/');
        if trimmed.is_empty() {
            return Err("`/` alone is not a prefix (it would match every request)".to_owned());
        }
        if trimmed.contains("//") {
            return Err(format!("`{raw}` has an empty segment (`//`)"));
        }
        if let Some(c) = trimmed
            .chars()
            .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`{raw}` contains `{}`, which cannot occur in a path",
                c.escape_default()
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The prefix without trailing slash, as sent in `X-Forwarded-Prefix`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part of `path` after this prefix, if the prefix matches at a segment boundary.
    ///
    /// Returns `Some("")` for the prefix itself and `Some("/…")` (possibly with several leading
    /// slashes) for paths below it; `None` when the path is outside (including
    /// `/livekit-jwt-servicefoo` for `/livekit-jwt-service`).
    fn rest_of<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.0.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
}

/// The outcome of stripping a prefix from a request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripped<'p> {
    /// The prefix that matched.
    pub prefix: &'p Prefix,
    /// The new path, starting with exactly one `/`, without the query.
    pub path: String,
    /// The new request target: `path`, then `?` and the original query if there was one.
    pub target: String,
}

/// Splits a request target (`:path`) into path and optional query at the first `?`.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// Collapses the run of leading slashes of `rest` to exactly one `/` (`""` becomes `/`).
///
/// Backslashes in that run count as slashes: browsers (WHATWG URL) read `/\host` as
/// `//host`, so a forwarded `/\evil.example/x` could become an open redirect upstream.
pub fn collapse_leading_slashes(rest: &str) -> String {
    format!("/{}", rest.trim_start_matches(['/', '\\']))
}

/// Strips the first matching prefix of `prefixes` (the caller orders them longest first) from
/// the request target `target` (path plus optional `?query`).
///
/// Returns `None` when no prefix matches; the request then passes through untouched. Only the
/// path is matched: a query that contains the prefix is left alone. `%2F` never separates
/// segments because nothing is decoded.
pub fn strip<'p>(prefixes: &'p [Prefix], target: &str) -> Option<Stripped<'p>> {
    let (path, query) = split_target(target);
    prefixes.iter().find_map(|prefix| {
        let rest = prefix.rest_of(path)?;
        let path = collapse_leading_slashes(rest);
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        Some(Stripped {
            prefix,
            path,
            target,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes(list: &[&str]) -> Vec<Prefix> {
        list.iter().map(|p| Prefix::parse(p).unwrap()).collect()
    }

    /// Every row of `shared/cases/strip-prefix.tsv` (copied into `tests/cases/`), for both
    /// spellings of the configured prefix.
    #[test]
    fn shared_strip_prefix_cases() {
        let tsv = include_str!("../tests/cases/strip-prefix.tsv");
        let mut rows = 0;
        for configured in ["/livekit-jwt-service", "/livekit-jwt-service/"] {
            let ps = prefixes(&[configured]);
            for line in tsv.lines().skip(1).filter(|l| !l.trim().is_empty()) {
                let cols: Vec<&str> = line.split('\t').collect();
                let (target, expected) = (cols[1], cols[2]);
                let got = strip(&ps, target);
                match expected {
                    "UNTOUCHED" => assert_eq!(got, None, "{target} must pass untouched"),
                    want => {
                        let got = got.unwrap_or_else(|| panic!("{target} must match"));
                        assert_eq!(got.target, want, "{target}");
                        assert_eq!(got.prefix.as_str(), "/livekit-jwt-service");
                    }
                }
                rows += 1;
            }
        }
        assert_eq!(rows, 2 * 13, "all rows of the case file were checked");
    }

    #[test]
    fn slashes_after_prefix_collapse() {
        let ps = prefixes(&["/p"]);
        for (t, want) in [
            ("/p", "/"),
            ("/p/", "/"),
            ("/p//", "/"),
            ("/p///get_token", "/get_token"),
            ("/p//a//b", "/a//b"),
            ("/p?", "/?"),
            ("/p//?a=/p//x", "/?a=/p//x"),
            ("/p/\\evil.example/x", "/evil.example/x"),
        ] {
            assert_eq!(strip(&ps, t).unwrap().target, want, "{t}");
        }
    }

    #[test]
    fn longest_prefix_wins_when_ordered() {
        let ps = prefixes(&["/a/b", "/a"]);
        let s = strip(&ps, "/a/b/c").unwrap();
        assert_eq!((s.prefix.as_str(), s.target.as_str()), ("/a/b", "/c"));
        let s = strip(&ps, "/a/bc").unwrap();
        assert_eq!((s.prefix.as_str(), s.target.as_str()), ("/a", "/bc"));
    }

    #[test]
    fn encoded_slash_is_not_a_boundary() {
        let ps = prefixes(&["/p"]);
        assert_eq!(strip(&ps, "/p%2Fget_token"), None);
        assert_eq!(strip(&ps, "/P/x"), None, "matching is case-sensitive");
        assert_eq!(strip(&ps, "*"), None);
        assert_eq!(strip(&ps, ""), None);
    }
}
