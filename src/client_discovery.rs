//! Client-Server API discovery for delayed-leave delegation (issue #8): where a user's
//! homeserver serves the Client-Server API, from `https://<server name>/.well-known/matrix/client`
//! (Matrix spec, Client-Server API "Server Discovery": `m.homeserver.base_url`). The delayed
//! event restart/send calls go there. Host-agnostic; no adapter calls it yet (README "Status").

use crate::config::Upstream;

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

#[cfg(test)]
mod tests {
    use super::*;

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
