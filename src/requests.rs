//! Request bodies of the token endpoints and their validation (lk-jwt-service parity).
//!
//! Decoding is strict, as lk-jwt-service's `DisallowUnknownFields`: a body that is not JSON,
//! has a wrong type, or carries a field unknown to the request type (at any depth) is
//! `M_NOT_JSON`. A required field that is missing, `null` or empty is `M_BAD_JSON`, and so is
//! only one of `delay_id` / `delay_timeout`; both are found before any callout.
//!
//! `delay_cs_api_url` is accepted (clients send it) and never used: the proxy finds the
//! Client-Server API itself (`csApiUrls`, `.well-known/matrix/client`), so a client cannot
//! point the proxy's callouts at an address of its choosing.

use serde::Deserialize;

use crate::livekit::{self, LEGACY_SLOT_ID};
use crate::matrix::MatrixError;

/// A Matrix OpenID token as returned by `POST /_matrix/client/v3/user/{userId}/openid/request_token`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenIdToken {
    /// The opaque token the homeserver vouches for.
    pub access_token: Option<String>,
    /// Always `Bearer`; accepted, not checked (lk-jwt-service).
    pub token_type: Option<String>,
    /// The server name of the user's homeserver.
    pub matrix_server_name: Option<String>,
    /// Lifetime of the token, seconds; accepted, not checked.
    pub expires_in: Option<i64>,
}

/// The `member` object of a `/get_token` request (MSC4195).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The MatrixRTC membership id.
    pub id: Option<String>,
    /// The Matrix user ID the client claims; must equal the verified `sub`.
    pub claimed_user_id: Option<String>,
    /// The device ID the client claims.
    pub claimed_device_id: Option<String>,
}

/// `POST /get_token` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTokenBody {
    room_id: Option<String>,
    slot_id: Option<String>,
    openid_token: Option<OpenIdToken>,
    member: Option<Member>,
    delay_id: Option<String>,
    delay_timeout: Option<i64>,
    /// Accepted, never used (module docs).
    #[allow(dead_code)]
    delay_cs_api_url: Option<String>,
}

/// `POST /delegate_delayed_leave` body: `/get_token`'s with both delay fields required.
type DelegateBody = GetTokenBody;

/// `POST /sfu/get` (legacy) body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SfuGetBody {
    room: Option<String>,
    openid_token: Option<OpenIdToken>,
    device_id: Option<String>,
    delay_id: Option<String>,
    delay_timeout: Option<i64>,
    /// Accepted, never used (module docs).
    #[allow(dead_code)]
    delay_cs_api_url: Option<String>,
}

/// The endpoints whose body the filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// `/sfu/get` (legacy, MSC4195 before slots).
    SfuGet,
    /// `/get_token`.
    GetToken,
    /// `/delegate_delayed_leave` (MSC4140 delegation after the fact: no LiveKit access
    /// token, no room creation).
    DelegateDelayedLeave,
    /// `/sfu_webhook` (LiveKit webhooks; not a token request, its body is a webhook event).
    SfuWebhook,
}

/// The delayed event a client hands over (MSC4140): `delay_id` and `delay_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayedLeave {
    /// `delay_id`, as the homeserver issued it. Opaque; path-escaped when used.
    pub delay_id: String,
    /// `delay_timeout`: the delayed event's timeout, in milliseconds (> 0).
    pub delay_timeout_ms: u64,
}

/// Who the client claims to be, in the shape each endpoint gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimant {
    /// `/sfu/get`: a device ID.
    Legacy {
        /// `device_id`.
        device_id: String,
    },
    /// `/get_token`: a membership.
    Member {
        /// `member.id`.
        id: String,
        /// `member.claimed_user_id`.
        claimed_user_id: String,
        /// `member.claimed_device_id`.
        claimed_device_id: String,
    },
}

/// A decoded and validated token request, ready for the OpenID userinfo callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Which endpoint it came to.
    pub endpoint: TokenEndpoint,
    /// The Matrix room ID (`room_id`, or `room` for `/sfu/get`).
    pub room_id: String,
    /// The MatrixRTC slot (`slot_id`, or `m.call#ROOM` for `/sfu/get`).
    pub slot_id: String,
    /// `openid_token.access_token`. Never logged.
    pub access_token: String,
    /// `openid_token.matrix_server_name`, exactly as sent.
    pub matrix_server_name: String,
    /// Who the client claims to be.
    pub claimant: Claimant,
    /// The delayed leave event to keep alive (MSC4140 delegation), when both `delay_id` and
    /// `delay_timeout` were given.
    pub delayed_leave: Option<DelayedLeave>,
}

impl TokenRequest {
    /// Decodes and validates a request body for `endpoint`.
    ///
    /// # Errors
    /// [`MatrixError::NOT_JSON`] when the body is not JSON of the request type (unknown
    /// field, wrong type, invalid UTF-8, trailing data); `M_BAD_JSON` naming the first
    /// missing or empty required field, a lone `delay_id` / `delay_timeout`, a
    /// `delay_timeout` that is not positive, or (`/delegate_delayed_leave`) a missing delay
    /// field. [`TokenEndpoint::SfuWebhook`] is not a token request: `M_NOT_JSON`.
    pub fn decode(endpoint: TokenEndpoint, body: &[u8]) -> Result<Self, MatrixError> {
        match endpoint {
            TokenEndpoint::SfuWebhook => Err(MatrixError::NOT_JSON),
            TokenEndpoint::DelegateDelayedLeave => {
                let mut b: DelegateBody =
                    serde_json::from_slice(body).map_err(|_| MatrixError::NOT_JSON)?;
                // The common fields first (as lk-jwt-service validates), then the delay.
                let (delay_id, delay_timeout) = (b.delay_id.take(), b.delay_timeout.take());
                let mut request = Self::get_token(endpoint, b)?;
                let delay_id = checked_delay_id(required(delay_id, "Missing field: delay_id")?)?;
                let delay_timeout_ms = positive_timeout(delay_timeout)?
                    .ok_or(MatrixError::bad_json("Missing field: delay_timeout"))?;
                request.delayed_leave = Some(DelayedLeave {
                    delay_id,
                    delay_timeout_ms,
                });
                Ok(request)
            }
            TokenEndpoint::GetToken => {
                let b: GetTokenBody =
                    serde_json::from_slice(body).map_err(|_| MatrixError::NOT_JSON)?;
                Self::get_token(endpoint, b)
            }
            TokenEndpoint::SfuGet => {
                let b: SfuGetBody =
                    serde_json::from_slice(body).map_err(|_| MatrixError::NOT_JSON)?;
                let (access_token, matrix_server_name) = openid_fields(b.openid_token)?;
                let room_id = required(b.room, "Missing field: room")?;
                let device_id = required(b.device_id, "Missing field: device_id")?;
                let delayed_leave = delay_pair(b.delay_id, b.delay_timeout)?;
                // The legacy identity contains the device ID verbatim, and a delegated job
                // keeps it in memory.
                if delayed_leave.is_some() && device_id.len() > MAX_DELAY_ID_BYTES {
                    return Err(MatrixError::bad_json("device_id is too long"));
                }
                Ok(Self {
                    endpoint,
                    room_id,
                    slot_id: LEGACY_SLOT_ID.to_owned(),
                    access_token,
                    matrix_server_name,
                    claimant: Claimant::Legacy { device_id },
                    delayed_leave,
                })
            }
        }
    }

    /// A `/get_token`-shaped body (also `/delegate_delayed_leave`'s).
    fn get_token(endpoint: TokenEndpoint, b: GetTokenBody) -> Result<Self, MatrixError> {
        let (access_token, matrix_server_name) = openid_fields(b.openid_token)?;
        let member = b
            .member
            .ok_or(MatrixError::bad_json("Missing field: member"))?;
        let request = Self {
            endpoint,
            room_id: required(b.room_id, "Missing field: room_id")?,
            slot_id: required(b.slot_id, "Missing field: slot_id")?,
            access_token,
            matrix_server_name,
            claimant: Claimant::Member {
                id: required(member.id, "Missing field: member.id")?,
                claimed_user_id: required(
                    member.claimed_user_id,
                    "Missing field: member.claimed_user_id",
                )?,
                claimed_device_id: required(
                    member.claimed_device_id,
                    "Missing field: member.claimed_device_id",
                )?,
            },
            delayed_leave: delay_pair(b.delay_id, b.delay_timeout)?,
        };
        Ok(request)
    }

    /// The LiveKit room name for this request.
    pub fn room_alias(&self) -> String {
        livekit::room_alias(&self.room_id, &self.slot_id)
    }

    /// The LiveKit identity for the verified Matrix user ID `user_id`.
    pub fn identity(&self, user_id: &str) -> String {
        match &self.claimant {
            Claimant::Legacy { device_id } => livekit::legacy_identity(user_id, device_id),
            Claimant::Member {
                id,
                claimed_device_id,
                ..
            } => livekit::identity(user_id, claimed_device_id, id),
        }
    }

    /// `false` when the client claimed a user ID (`/get_token`) other than the verified one.
    pub fn claim_matches(&self, user_id: &str) -> bool {
        match &self.claimant {
            Claimant::Legacy { .. } => true,
            Claimant::Member {
                claimed_user_id, ..
            } => claimed_user_id == user_id,
        }
    }
}

fn required(value: Option<String>, missing: &'static str) -> Result<String, MatrixError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(MatrixError::bad_json(missing)),
    }
}

fn openid_fields(token: Option<OpenIdToken>) -> Result<(String, String), MatrixError> {
    let token = token.ok_or(MatrixError::bad_json("Missing field: openid_token"))?;
    Ok((
        required(
            token.access_token,
            "Missing field: openid_token.access_token",
        )?,
        required(
            token.matrix_server_name,
            "Missing field: openid_token.matrix_server_name",
        )?,
    ))
}

/// `delay_id` and `delay_timeout` come together or not at all (lk-jwt-service).
fn delay_pair(
    delay_id: Option<String>,
    delay_timeout: Option<i64>,
) -> Result<Option<DelayedLeave>, MatrixError> {
    let delay_id = delay_id.filter(|s| !s.is_empty());
    match (delay_id, positive_timeout(delay_timeout)?) {
        (Some(delay_id), Some(delay_timeout_ms)) => Ok(Some(DelayedLeave {
            delay_id: checked_delay_id(delay_id)?,
            delay_timeout_ms,
        })),
        (None, None) => Ok(None),
        _ => Err(MatrixError::bad_json(
            "delay_id and delay_timeout must be given together",
        )),
    }
}

/// Longest `delay_id` accepted, in bytes (Synapse's are about 25; the job service keeps every
/// `delay_id` in memory).
pub const MAX_DELAY_ID_BYTES: usize = 255;

/// A `delay_id` the proxy can put into a path: at most [`MAX_DELAY_ID_BYTES`], and not `.` or
/// `..` (dot segments stay unescaped, and a server normalising them would act on another
/// path).
fn checked_delay_id(delay_id: String) -> Result<String, MatrixError> {
    if delay_id.len() > MAX_DELAY_ID_BYTES {
        return Err(MatrixError::bad_json("delay_id is too long"));
    }
    if delay_id == "." || delay_id == ".." {
        return Err(MatrixError::bad_json("delay_id is not a valid delay ID"));
    }
    Ok(delay_id)
}

/// `delay_timeout`: absent or 0 is `None`; negative is `M_BAD_JSON`.
fn positive_timeout(delay_timeout: Option<i64>) -> Result<Option<u64>, MatrixError> {
    match delay_timeout {
        None | Some(0) => Ok(None),
        Some(t) => u64::try_from(t)
            .map(Some)
            .map_err(|_| MatrixError::bad_json("delay_timeout must be positive")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENID: &str = r#"{"access_token":"tok","token_type":"Bearer","matrix_server_name":"example.org","expires_in":3600}"#;

    fn get_token(extra: &str) -> String {
        format!(
            r#"{{"room_id":"!r:example.org","slot_id":"m.call#ROOM","openid_token":{OPENID},"member":{{"id":"m1","claimed_user_id":"@alice:example.org","claimed_device_id":"DEV"}}{extra}}}"#
        )
    }

    #[track_caller]
    fn err(endpoint: TokenEndpoint, body: &str) -> MatrixError {
        TokenRequest::decode(endpoint, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn real_client_get_token_body() {
        let r = TokenRequest::decode(TokenEndpoint::GetToken, get_token("").as_bytes()).unwrap();
        assert_eq!(r.access_token, "tok");
        assert_eq!(r.matrix_server_name, "example.org");
        assert_eq!(r.delayed_leave, None);
        assert!(r.claim_matches("@alice:example.org"));
        assert!(!r.claim_matches("@bob:example.org"));
    }

    #[test]
    fn legacy_and_new_endpoints_meet() {
        let legacy = TokenRequest::decode(
            TokenEndpoint::SfuGet,
            format!(r#"{{"room":"!r:example.org","openid_token":{OPENID},"device_id":"DEV"}}"#)
                .as_bytes(),
        )
        .unwrap();
        let new = TokenRequest::decode(TokenEndpoint::GetToken, get_token("").as_bytes()).unwrap();
        assert_eq!(legacy.room_alias(), new.room_alias());
        assert_eq!(
            legacy.identity("@alice:example.org"),
            "@alice:example.org:DEV"
        );
    }

    #[test]
    fn not_json() {
        for body in [
            "",
            "nope",
            "[]",
            &get_token(r#","foo":1"#),
            r#"{"room_id":5}"#,
            &get_token("").replace(r#""expires_in":3600"#, r#""expires_in":3600,"x":1"#),
            &get_token("").replace(r#""id":"m1""#, r#""id":"m1","x":1"#),
            &format!("{} trailing", get_token("")),
        ] {
            assert_eq!(
                err(TokenEndpoint::GetToken, body),
                MatrixError::NOT_JSON,
                "{body}"
            );
        }
        assert_eq!(
            TokenRequest::decode(TokenEndpoint::GetToken, b"{\"room_id\":\"\xff\"}").unwrap_err(),
            MatrixError::NOT_JSON
        );
        assert_eq!(
            err(TokenEndpoint::SfuGet, r#"{"room_id":"x"}"#),
            MatrixError::NOT_JSON
        );
    }

    #[test]
    fn bad_json_names_field() {
        let cases = [
            (
                get_token("").replace(r#""room_id":"!r:example.org","#, ""),
                "room_id",
            ),
            (
                get_token("").replace(r#""slot_id":"m.call#ROOM""#, r#""slot_id":"""#),
                "slot_id",
            ),
            (
                get_token("").replace(r#""access_token":"tok""#, r#""access_token":null"#),
                "openid_token.access_token",
            ),
            (
                get_token("").replace(r#""matrix_server_name":"example.org","#, ""),
                "openid_token.matrix_server_name",
            ),
            (
                get_token("").replace(r#""claimed_user_id":"@alice:example.org","#, ""),
                "member.claimed_user_id",
            ),
        ];
        for (body, field) in cases {
            let e = err(TokenEndpoint::GetToken, &body);
            assert_eq!(e.errcode, "M_BAD_JSON", "{body}");
            assert!(e.error.ends_with(field), "{} for {body}", e.error);
        }
        assert_eq!(err(TokenEndpoint::SfuGet, "{}").errcode, "M_BAD_JSON");
    }

    #[test]
    fn delay_parameters() {
        assert_eq!(
            err(TokenEndpoint::GetToken, &get_token(r#","delay_id":"d""#)).errcode,
            "M_BAD_JSON"
        );
        assert_eq!(
            err(
                TokenEndpoint::GetToken,
                &get_token(r#","delay_timeout":1000"#)
            )
            .errcode,
            "M_BAD_JSON"
        );
        let body =
            get_token(r#","delay_id":"d","delay_timeout":1000,"delay_cs_api_url":"https://x""#);
        let r = TokenRequest::decode(TokenEndpoint::GetToken, body.as_bytes()).unwrap();
        assert_eq!(
            r.delayed_leave,
            Some(DelayedLeave {
                delay_id: "d".into(),
                delay_timeout_ms: 1000
            })
        );
        assert_eq!(
            err(
                TokenEndpoint::GetToken,
                &get_token(r#","delay_id":"d","delay_timeout":-5"#)
            )
            .error,
            "delay_timeout must be positive"
        );
    }

    #[test]
    fn delay_ids_that_cannot_be_a_path_segment_are_refused() {
        for (id, error) in [
            ("..".to_owned(), "delay_id is not a valid delay ID"),
            (".".to_owned(), "delay_id is not a valid delay ID"),
            ("x".repeat(MAX_DELAY_ID_BYTES + 1), "delay_id is too long"),
        ] {
            let extra = format!(r#","delay_id":"{id}","delay_timeout":1000"#);
            for endpoint in [TokenEndpoint::GetToken, TokenEndpoint::DelegateDelayedLeave] {
                let e = err(endpoint, &get_token(&extra));
                assert_eq!((e.errcode, e.error), ("M_BAD_JSON", error));
            }
        }
        let ok = format!(r#","delay_id":"{}","delay_timeout":1000"#, "x".repeat(255));
        assert!(TokenRequest::decode(TokenEndpoint::GetToken, get_token(&ok).as_bytes()).is_ok());
    }

    #[test]
    fn delegate_delayed_leave_requires_every_field() {
        let full = get_token(r#","delay_id":"syd_x","delay_timeout":8000"#);
        let r = TokenRequest::decode(TokenEndpoint::DelegateDelayedLeave, full.as_bytes()).unwrap();
        assert_eq!(r.endpoint, TokenEndpoint::DelegateDelayedLeave);
        assert_eq!(r.delayed_leave.unwrap().delay_timeout_ms, 8000);
        for (body, missing) in [
            (get_token(r#","delay_timeout":8000"#), "delay_id"),
            (get_token(r#","delay_id":"syd_x""#), "delay_timeout"),
            (
                get_token(r#","delay_id":"","delay_timeout":8000"#),
                "delay_id",
            ),
            (
                get_token(r#","delay_id":"d","delay_timeout":0"#),
                "delay_timeout",
            ),
        ] {
            let e = err(TokenEndpoint::DelegateDelayedLeave, &body);
            assert_eq!(
                (e.status, e.errcode, e.error),
                (
                    400,
                    "M_BAD_JSON",
                    format!("Missing field: {missing}").as_str()
                )
            );
        }
        let no_member = full.replace(
            r#","member":{"id":"m1","claimed_user_id":"@alice:example.org","claimed_device_id":"DEV"}"#,
            "",
        );
        assert_eq!(
            err(TokenEndpoint::DelegateDelayedLeave, &no_member).error,
            "Missing field: member"
        );
        assert_eq!(
            err(TokenEndpoint::DelegateDelayedLeave, r#"{"x":1}"#).errcode,
            "M_NOT_JSON"
        );
        assert_eq!(
            err(TokenEndpoint::DelegateDelayedLeave, "{}").error,
            "Missing field: openid_token"
        );
    }
}
