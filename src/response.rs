//! Answers the filter sends itself (local replies): token endpoint answers with their CORS
//! headers, Matrix-style errors, the health check.
//!
//! The CORS headers are exactly lk-jwt-service's, each set once.

use crate::matrix::MatrixError;

/// The CORS headers lk-jwt-service sets on every answer of `/sfu/get` and `/get_token`.
pub const CORS_HEADERS: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "POST"),
    (
        "access-control-allow-headers",
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
    ),
];

/// An HTTP answer produced by the filter instead of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u16,
    /// Header names (lower case) and values, each name at most once.
    pub headers: Vec<(&'static str, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
}

impl LocalResponse {
    fn with_cors(status: u16, body: Vec<u8>) -> Self {
        let mut headers: Vec<(&'static str, String)> = CORS_HEADERS
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect();
        headers.push(("content-type", "application/json".to_owned()));
        Self {
            status,
            headers,
            body,
        }
    }

    /// A Matrix-style error with the CORS headers and `Content-Type: application/json`.
    pub fn error(err: MatrixError) -> Self {
        let mut r = Self::with_cors(err.status, err.body());
        if err.status == 405 {
            r.headers.push(("allow", "OPTIONS, POST".to_owned()));
        }
        r
    }

    /// 200 `{"url": livekit_url, "jwt": jwt}` (lk-jwt-service's success answer).
    pub fn token(livekit_url: &str, jwt: &str) -> Self {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            url: &'a str,
            jwt: &'a str,
        }
        let body = serde_json::to_vec(&Body {
            url: livekit_url,
            jwt,
        })
        .unwrap_or_default();
        Self::with_cors(200, body)
    }

    /// 200 answer to a CORS preflight (`OPTIONS`): the CORS headers, `Content-Type:
    /// application/json` and the body `{}`. (lk-jwt-service sends no body; Envoy drops the
    /// `Content-Type` of a bodiless local reply, and the contract wants the header.)
    pub fn preflight() -> Self {
        Self::with_cors(200, b"{}".to_vec())
    }

    /// 200 `{}` with the CORS headers: `/delegate_delayed_leave` accepted the delayed event
    /// (lk-jwt-service's `DelegateDelayedLeaveResponse`).
    pub fn delegated() -> Self {
        Self::with_cors(200, b"{}".to_vec())
    }

    /// 200 with an empty body: `/sfu_webhook` took a verified webhook (LiveKit only looks at
    /// the status).
    pub fn webhook_accepted() -> Self {
        Self::healthy()
    }

    /// `/healthz`: 200 with an empty body.
    pub fn healthy() -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `/healthz` with a method other than GET or HEAD: 405 `M_UNRECOGNIZED`.
    pub fn health_method_not_allowed() -> Self {
        let mut r = Self::error(MatrixError::METHOD_NOT_ALLOWED);
        if let Some(allow) = r.headers.iter_mut().find(|(k, _)| *k == "allow") {
            allow.1 = "GET, HEAD".to_owned();
        }
        r
    }

    /// The value of header `name` (lower case), if set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_carries_cors_once() {
        let r = LocalResponse::error(MatrixError::UNAUTHORIZED);
        assert_eq!(r.status, 401);
        for (name, _) in CORS_HEADERS {
            assert_eq!(
                r.headers.iter().filter(|(k, _)| *k == name).count(),
                1,
                "{name}"
            );
        }
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    }

    #[test]
    fn token_body() {
        let r = LocalResponse::token("wss://sfu.example.org/livekit/sfu", "a.b.c");
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"url":"wss://sfu.example.org/livekit/sfu","jwt":"a.b.c"}"#
        );
    }

    #[test]
    fn health_405_allows_get_head() {
        let r = LocalResponse::health_method_not_allowed();
        assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    }
}
