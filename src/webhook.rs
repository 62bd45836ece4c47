//! LiveKit webhooks (`POST /sfu_webhook`), the participant signals of delayed-leave delegation
//! (MSC4140, issue #8): signature verification and the events the delayed-leave jobs use.
//!
//! LiveKit signs each webhook with an access token in the `Authorization` header: HS256 with
//! the API secret, `iss` = API key, and a `sha256` claim holding the standard base64 of the
//! SHA-256 of the request body (LiveKit server SDK `webhook.Receive`; lk-jwt-service verifies
//! them the same way). Host-agnostic: the adapters pass the body, the header and the time.
//!
//! The Envoy filter serves `/sfu_webhook` with this and hands the participant signals to the
//! delayed-leave job service ([`crate::job_service`]).

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Seconds a webhook token's `nbf`/`exp` may be off (clock skew between LiveKit and the proxy).
pub const LEEWAY_SECS: u64 = 60;

/// Why a webhook was refused. None of them echo the token or the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookError {
    /// No `Authorization` header.
    MissingAuthorization,
    /// Not an HS256 JWT signed with the API secret (or not a JWT at all).
    BadSignature,
    /// Signed, but `iss` is not the configured API key.
    WrongIssuer,
    /// Outside the token's `nbf`..`exp` (with [`LEEWAY_SECS`]).
    Expired,
    /// The `sha256` claim does not match the body: tampered or replayed with another body.
    ChecksumMismatch,
    /// The (authentic) body is not a LiveKit webhook event.
    NotAnEvent,
}

impl std::fmt::Display for WebhookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MissingAuthorization => "no Authorization header",
            Self::BadSignature => "not signed with the LiveKit API secret",
            Self::WrongIssuer => "signed for another API key",
            Self::Expired => "signature token expired or not yet valid",
            Self::ChecksumMismatch => "body does not match the signed sha256",
            Self::NotAnEvent => "body is not a LiveKit webhook event",
        })
    }
}

/// What the delayed-leave jobs learn from a webhook about a participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ParticipantSignal {
    /// `participant_joined`: connected to the SFU.
    Joined,
    /// `participant_left`: disconnected on purpose.
    Left,
    /// `participant_connection_aborted`: the connection broke.
    ConnectionAborted,
}

/// A verified LiveKit webhook event: its `event` name and, when present, the LiveKit room name
/// (the room alias this crate derives) and the participant identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// `event`, e.g. `participant_joined`.
    pub event: String,
    /// `room.name`.
    pub room: Option<String>,
    /// `participant.identity`.
    pub identity: Option<String>,
    /// `createdAt`: when LiveKit made the event, Unix seconds (protobuf JSON writes it as a
    /// string).
    pub created_at: Option<u64>,
    /// `participant.disconnectReason` is `DUPLICATE_IDENTITY`: LiveKit dropped this session
    /// because the same identity connected again, so the participant is still there.
    pub replaced_by_new_session: bool,
}

impl WebhookEvent {
    /// The participant signal this event carries, `None` for the events jobs ignore
    /// (including a departure caused by the same identity connecting again).
    pub fn signal(&self) -> Option<ParticipantSignal> {
        if self.replaced_by_new_session {
            return None;
        }
        match self.event.as_str() {
            "participant_joined" => Some(ParticipantSignal::Joined),
            "participant_left" => Some(ParticipantSignal::Left),
            "participant_connection_aborted" => Some(ParticipantSignal::ConnectionAborted),
            _ => None,
        }
    }
}

/// Verifies a LiveKit webhook and parses its event.
///
/// Takes the raw request `body`, the `Authorization` header value (the token, optionally
/// after `Bearer `), the API key and secret, and the time in Unix seconds. Returns the event,
/// or why the webhook is refused; the signature and checksum are checked before the body is
/// parsed.
///
/// The signature is checked with `jsonwebtoken::crypto::verify` (HS256 only, whatever the
/// token's header says; a header naming another algorithm is refused); the header and claims
/// are read as plain JSON. `jsonwebtoken::decode` would do the same but links its JWK and
/// validation machinery, which grew the Envoy filter by a tenth.
pub fn verify(
    body: &[u8],
    authorization: Option<&str>,
    api_key: &str,
    api_secret: &[u8],
    now: u64,
) -> Result<WebhookEvent, WebhookError> {
    crate::hs256::install();
    let header = authorization
        .ok_or(WebhookError::MissingAuthorization)?
        .trim();
    let token = header.strip_prefix("Bearer ").unwrap_or(header).trim();
    let mut parts = token.split('.');
    let (Some(head), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(WebhookError::BadSignature);
    };
    let signed = token
        .get(..head.len() + 1 + payload.len())
        .ok_or(WebhookError::BadSignature)?;
    let key = DecodingKey::from_secret(api_secret).map_err(|_| WebhookError::BadSignature)?;
    if !jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &key, Algorithm::HS256)
        .unwrap_or(false)
    {
        return Err(WebhookError::BadSignature);
    }
    let head = json_part(head).ok_or(WebhookError::BadSignature)?;
    if head.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(WebhookError::BadSignature);
    }
    let claims = json_part(payload).ok_or(WebhookError::BadSignature)?;
    if claims.get("iss").and_then(Value::as_str) != Some(api_key) {
        return Err(WebhookError::WrongIssuer);
    }
    let not_before = claims
        .get("nbf")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_sub(LEEWAY_SECS);
    let expires = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(WebhookError::Expired)?;
    if now < not_before || now > expires.saturating_add(LEEWAY_SECS) {
        return Err(WebhookError::Expired);
    }
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    if claims.get("sha256").and_then(Value::as_str) != Some(digest.as_str()) {
        return Err(WebhookError::ChecksumMismatch);
    }
    let event: Value = serde_json::from_slice(body).map_err(|_| WebhookError::NotAnEvent)?;
    let text = |outer: &str, inner: &str| {
        event
            .get(outer)
            .and_then(|o| o.get(inner))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(WebhookEvent {
        event: event
            .get("event")
            .and_then(Value::as_str)
            .ok_or(WebhookError::NotAnEvent)?
            .to_owned(),
        room: text("room", "name"),
        identity: text("participant", "identity"),
        created_at: event.get("createdAt").and_then(|v| match v {
            Value::String(s) => s.parse().ok(),
            other => other.as_u64(),
        }),
        replaced_by_new_session: event
            .get("participant")
            .and_then(|p| p.get("disconnectReason"))
            .is_some_and(|r| r.as_str() == Some("DUPLICATE_IDENTITY") || r.as_u64() == Some(2)),
    })
}

/// A base64url (unpadded) JSON object of a JWT.
fn json_part(part: &str) -> Option<Value> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

/// Test helper: webhook tokens as LiveKit makes them.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// A webhook token for `body`: HS256 with `secret`, `iss` = `api_key`, valid from `now`
    /// for 60 s, `sha256` of the body.
    pub fn sign(body: &[u8], api_key: &str, secret: &[u8], now: u64) -> String {
        crate::hs256::install();
        let sha256 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        let claims =
            serde_json::json!({"iss": api_key, "nbf": now, "exp": now + 60, "sha256": sha256});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"e2e-secret-0123456789abcdef0123456789abcdef";
    /// Made with LiveKit's Python SDK (`AccessToken("devkey", SECRET).with_sha256(...)`) for
    /// [`BODY`]: nbf 1795953668, exp 1795975268.
    const LIVEKIT_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzaGEyNTYiOiJDQ1M3S3ljUDBMMWZzUWJXRDY2VjZLK2hYOUdKaEpzN2F5OW9pZjM2R2t3PSIsInN1YiI6IiIsImlzcyI6ImRldmtleSIsIm5iZiI6MTc5NTk1MzY2OCwiZXhwIjoxNzk1OTc1MjY4fQ.tyM0BGwvp39EGAgy1QrOs0pocjnF7X6g5J8dXMy36-0";
    const BODY: &[u8] = br#"{"event":"participant_left","room":{"sid":"RM_x","name":"TK4o8wNCXi5t5936bOvIzE/X3XFc7cgp3jGRDqK0j5E"},"participant":{"sid":"PA_y","identity":"@alice:example.org:DEVICE"},"id":"EV_1","createdAt":"1795950000"}"#;
    const NOW: u64 = 1_795_960_000;

    fn sign(claims: serde_json::Value, secret: &[u8]) -> String {
        crate::hs256::install();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    /// A webhook token for `body` as LiveKit makes it, valid around [`NOW`].
    fn token_for(body: &[u8]) -> String {
        tests_support::sign(body, "devkey", SECRET, NOW)
    }

    #[test]
    fn livekits_own_webhook_token_is_accepted() {
        let event = verify(BODY, Some(LIVEKIT_TOKEN), "devkey", SECRET, NOW).unwrap();
        assert_eq!(event.signal(), Some(ParticipantSignal::Left));
        assert_eq!(
            event.room.as_deref(),
            Some("TK4o8wNCXi5t5936bOvIzE/X3XFc7cgp3jGRDqK0j5E")
        );
        assert_eq!(event.identity.as_deref(), Some("@alice:example.org:DEVICE"));
        assert_eq!(
            event.created_at,
            Some(1_795_950_000),
            "protobuf JSON's string int64"
        );
        let bearer = format!("Bearer {LIVEKIT_TOKEN}");
        assert!(verify(BODY, Some(&bearer), "devkey", SECRET, NOW).is_ok());
    }

    #[test]
    fn tampered_unsigned_foreign_and_stale_webhooks_are_refused() {
        let tampered =
            String::from_utf8_lossy(BODY).replace("participant_left", "participant_joined");
        let refuse = |body: &[u8], auth: Option<&str>, key: &str, secret: &[u8], now: u64| {
            verify(body, auth, key, secret, now).unwrap_err()
        };
        assert_eq!(
            refuse(
                tampered.as_bytes(),
                Some(LIVEKIT_TOKEN),
                "devkey",
                SECRET,
                NOW
            ),
            WebhookError::ChecksumMismatch
        );
        assert_eq!(
            refuse(BODY, None, "devkey", SECRET, NOW),
            WebhookError::MissingAuthorization
        );
        assert_eq!(
            refuse(BODY, Some(LIVEKIT_TOKEN), "devkey", b"another-secret", NOW),
            WebhookError::BadSignature
        );
        assert_eq!(
            refuse(BODY, Some("not a jwt"), "devkey", SECRET, NOW),
            WebhookError::BadSignature
        );
        assert_eq!(
            refuse(BODY, Some(LIVEKIT_TOKEN), "otherkey", SECRET, NOW),
            WebhookError::WrongIssuer
        );
        assert_eq!(
            refuse(
                BODY,
                Some(LIVEKIT_TOKEN),
                "devkey",
                SECRET,
                1_795_975_268 + 61
            ),
            WebhookError::Expired
        );
        assert_eq!(
            refuse(
                BODY,
                Some(LIVEKIT_TOKEN),
                "devkey",
                SECRET,
                1_795_953_668 - 61
            ),
            WebhookError::Expired
        );
    }

    #[test]
    fn other_algorithms_and_missing_claims_are_refused() {
        // alg none, and a token without the sha256 claim.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJpc3MiOiJkZXZrZXkifQ.";
        assert_eq!(
            verify(BODY, Some(none), "devkey", SECRET, NOW).unwrap_err(),
            WebhookError::BadSignature
        );
        let no_sha = sign(
            serde_json::json!({"iss": "devkey", "exp": NOW + 60}),
            SECRET,
        );
        assert_eq!(
            verify(BODY, Some(&no_sha), "devkey", SECRET, NOW).unwrap_err(),
            WebhookError::ChecksumMismatch
        );
        let no_exp = sign(serde_json::json!({"iss": "devkey", "sha256": "x"}), SECRET);
        assert_eq!(
            verify(BODY, Some(&no_exp), "devkey", SECRET, NOW).unwrap_err(),
            WebhookError::Expired
        );
        // Signed with the secret, but the header names another algorithm.
        let hs384_header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"alg":"HS384","typ":"JWT"}"#);
        let genuine = token_for(BODY);
        let payload = genuine.split('.').nth(1).unwrap();
        let message = format!("{hs384_header}.{payload}");
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            verify(
                BODY,
                Some(&format!("{message}.{signature}")),
                "devkey",
                SECRET,
                NOW
            )
            .unwrap_err(),
            WebhookError::BadSignature
        );
        // Four parts, or garbage.
        for token in [format!("{genuine}.x"), "a.b".to_owned(), "...".to_owned()] {
            assert_eq!(
                verify(BODY, Some(&token), "devkey", SECRET, NOW).unwrap_err(),
                WebhookError::BadSignature,
                "{token}"
            );
        }
    }

    #[test]
    fn signed_non_events_and_unknown_events() {
        let body = b"[1,2,3]";
        assert_eq!(
            verify(body, Some(&token_for(body)), "devkey", SECRET, NOW).unwrap_err(),
            WebhookError::NotAnEvent
        );
        let body = br#"{"event":"room_started","room":{"name":"r"}}"#;
        let token = token_for(body);
        let event = verify(body, Some(&token), "devkey", SECRET, NOW).unwrap();
        assert_eq!(event.signal(), None);
        assert_eq!(event.identity, None);
        for (name, signal) in [
            ("participant_joined", ParticipantSignal::Joined),
            (
                "participant_connection_aborted",
                ParticipantSignal::ConnectionAborted,
            ),
        ] {
            let mut e = WebhookEvent {
                event: name.to_owned(),
                room: None,
                identity: None,
                created_at: None,
                replaced_by_new_session: false,
            };
            assert_eq!(e.signal(), Some(signal));
            e.replaced_by_new_session = true;
            assert_eq!(e.signal(), None, "{name} for a replaced session");
        }
    }
}
