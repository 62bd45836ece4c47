//! LiveKit: room alias and identity derivation, LiveKit access token claims and HS256 minting,
//! and the Twirp `RoomService/CreateRoom` request.
//!
//! Sources: lk-jwt-service (`CreateLiveKitRoomAlias`, `CreateLiveKitIdentity`, the grants of
//! its handler, PR #222 `canPublish`, PR #228 room creation per MSC4195), LiveKit's access
//! token format (`iss` = API key, `sub` = identity, `video` grant with camelCase claim names)
//! and `livekit_room.proto` (`CreateRoomRequest`).

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::TokenService;

/// Twirp path of LiveKit's CreateRoom, appended to the LiveKit API base path.
pub const CREATE_ROOM_PATH: &str = "/twirp/livekit.RoomService/CreateRoom";
/// `empty_timeout` of a created room, in seconds (lk-jwt-service).
pub const ROOM_EMPTY_TIMEOUT_SECS: u32 = 300;
/// `departure_timeout` of a created room, in seconds (lk-jwt-service).
pub const ROOM_DEPARTURE_TIMEOUT_SECS: u32 = 20;
/// Lifetime of the server token that authorises CreateRoom, in seconds.
pub const SERVER_TOKEN_LIFETIME_SECS: u64 = 60;
/// The slot id that `/sfu/get` (legacy) implies (MSC4195).
pub const LEGACY_SLOT_ID: &str = "m.call#ROOM";

/// Encodes a list of strings as compact JSON exactly as Go's `json.Marshal` does (with its
/// HTML-safe escaping of `<`, `>`, `&`, U+2028 and U+2029), so derived names match
/// lk-jwt-service byte for byte.
fn go_json_array(items: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|s| s.len() + 3).sum::<usize>() + 2);
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        for c in item.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\u{8}' => out.extend_from_slice(b"\\b"),
                '\u{c}' => out.extend_from_slice(b"\\f"),
                c if (c as u32) < 0x20
                    || matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') =>
                {
                    out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
                }
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out.push(b'"');
    }
    out.push(b']');
    out
}

/// Unpadded standard base64 of SHA-256 over the Go-style compact JSON array of `items`.
fn hash_of(items: &[&str]) -> String {
    STANDARD_NO_PAD.encode(Sha256::digest(go_json_array(items)))
}

/// The LiveKit room name (room alias) for a Matrix room and MatrixRTC slot:
/// `b64(sha256(["<room_id>","<slot_id>"]))` (lk-jwt-service `CreateLiveKitRoomAlias`).
pub fn room_alias(room_id: &str, slot_id: &str) -> String {
    hash_of(&[room_id, slot_id])
}

/// The LiveKit identity for `/get_token`:
/// `b64(sha256(["<user_id>","<claimed_device_id>","<member_id>"]))`
/// (lk-jwt-service `CreateLiveKitIdentity`).
pub fn identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hash_of(&[user_id, device_id, member_id])
}

/// The LiveKit identity for the legacy `/sfu/get`: `<user_id>:<device_id>`.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

/// LiveKit's video grant (claim `video`), with LiveKit's camelCase claim names. Absent fields
/// are omitted from the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VideoGrant {
    /// Permission to create rooms (server token for CreateRoom only; never in a client token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_create: Option<bool>,
    /// Permission to join `room`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_join: Option<bool>,
    /// Administration of `room` (server token for GetParticipant only; never in a client
    /// token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_admin: Option<bool>,
    /// The LiveKit room name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Permission to publish tracks. LiveKit treats a missing value as `true`, so restricted
    /// users get an explicit `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    /// Permission to subscribe to tracks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    /// Permission to update the participant's own metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_update_own_metadata: Option<bool>,
}

/// The claims of a LiveKit access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// LiveKit API key.
    pub iss: String,
    /// Participant identity (absent in the server token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The video grant.
    pub video: VideoGrant,
}

impl Claims {
    /// Claims of a client LiveKit access token: join `room` as `identity`, subscribe, update
    /// own metadata, and publish only when `full_access`. Valid from `now` (Unix seconds) for
    /// `lifetime_secs` seconds.
    pub fn client(
        api_key: &str,
        identity: &str,
        room: &str,
        full_access: bool,
        now: u64,
        lifetime_secs: u64,
    ) -> Self {
        Self {
            iss: api_key.to_owned(),
            sub: Some(identity.to_owned()),
            nbf: now,
            exp: now.saturating_add(lifetime_secs),
            video: VideoGrant {
                room_join: Some(true),
                room: Some(room.to_owned()),
                can_publish: Some(full_access),
                can_subscribe: Some(true),
                can_update_own_metadata: Some(true),
                ..VideoGrant::default()
            },
        }
    }

    /// Claims of the short-lived server token that authorises CreateRoom (`roomCreate` only).
    pub fn room_create(api_key: &str, now: u64) -> Self {
        Self::server(
            api_key,
            now,
            VideoGrant {
                room_create: Some(true),
                ..VideoGrant::default()
            },
        )
    }

    /// A server token (no identity) valid for [`SERVER_TOKEN_LIFETIME_SECS`] from `now`.
    fn server(api_key: &str, now: u64, video: VideoGrant) -> Self {
        Self {
            iss: api_key.to_owned(),
            sub: None,
            nbf: now,
            exp: now.saturating_add(SERVER_TOKEN_LIFETIME_SECS),
            video,
        }
    }

    /// Claims of the short-lived server token that authorises GetParticipant in `room`
    /// (`roomAdmin` for that room only, as LiveKit's server SDKs ask for it).
    pub fn room_admin(api_key: &str, room: &str, now: u64) -> Self {
        Self::server(
            api_key,
            now,
            VideoGrant {
                room_admin: Some(true),
                room: Some(room.to_owned()),
                ..VideoGrant::default()
            },
        )
    }

    /// Signs the claims as an HS256 JWT with the LiveKit API secret `secret`.
    ///
    /// # Errors
    /// The `jsonwebtoken` error for an empty secret or a failed serialisation.
    pub fn sign(&self, secret: &[u8]) -> Result<String, jsonwebtoken::errors::Error> {
        crate::hs256::install();
        let key = jsonwebtoken::EncodingKey::from_secret(secret)?;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            self,
            &key,
        )
    }
}

/// LiveKit's `CreateRoomRequest` (`livekit_room.proto`), only the fields this filter sets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateRoomRequest {
    /// Room name (the room alias).
    #[prost(string, tag = "1")]
    pub name: String,
    /// Seconds to keep the room open if no one joins.
    #[prost(uint32, tag = "2")]
    pub empty_timeout: u32,
    /// Maximum number of participants (0: no limit).
    #[prost(uint32, tag = "3")]
    pub max_participants: u32,
    /// Seconds to keep the room open after everyone leaves.
    #[prost(uint32, tag = "10")]
    pub departure_timeout: u32,
}

/// The protobuf body of the CreateRoom call for `alias`, as lk-jwt-service sends it.
pub fn create_room_body(alias: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&CreateRoomRequest {
        name: alias.to_owned(),
        empty_timeout: ROOM_EMPTY_TIMEOUT_SECS,
        max_participants: 0,
        departure_timeout: ROOM_DEPARTURE_TIMEOUT_SECS,
    })
}

/// LiveKit's `RoomParticipantIdentity` (`livekit_room.proto`), the GetParticipant request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RoomParticipantIdentity {
    /// Room name (the room alias).
    #[prost(string, tag = "1")]
    pub room: String,
    /// Participant identity.
    #[prost(string, tag = "2")]
    pub identity: String,
}

/// Twirp path of GetParticipant (is this identity in this room?), below the LiveKit API URL.
pub const GET_PARTICIPANT_PATH: &str = "/twirp/livekit.RoomService/GetParticipant";

/// The protobuf body of a GetParticipant call.
pub fn get_participant_body(room: &str, identity: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&RoomParticipantIdentity {
        room: room.to_owned(),
        identity: identity.to_owned(),
    })
}

/// What a GetParticipant answer says: `Some(true)` present (2xx), `Some(false)` absent (404,
/// Twirp `not_found`), `None` unknown (no answer, other errors).
pub fn participant_present(status: Option<u16>, body: &[u8]) -> Option<bool> {
    match status {
        Some(200..=299) => Some(true),
        Some(404) => Some(false),
        Some(_) => serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .filter(|e| e.get("code").and_then(serde_json::Value::as_str) == Some("not_found"))
            .map(|_| false),
        None => None,
    }
}

/// The full path of the CreateRoom call below the configured LiveKit API URL.
pub fn create_room_path(service: &TokenService) -> String {
    format!("{}{CREATE_ROOM_PATH}", service.livekit_api.base_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently: sha256 of the Go `json.Marshal` output bytes, unpadded
    // base64 (python3: base64.b64encode(hashlib.sha256(b'["!r:example.org","m.call#ROOM"]')
    // .digest()).rstrip(b"=")).
    #[test]
    fn room_alias_vectors() {
        assert_eq!(
            go_json_array(&["!r:example.org", "m.call#ROOM"]),
            br#"["!r:example.org","m.call#ROOM"]"#
        );
        assert_eq!(
            room_alias("!r:example.org", "m.call#ROOM"),
            "Wo+x1mkuP6lfKFaewLo3cuhg3yvsg/b+emgRekpVe7Q"
        );
    }

    #[test]
    fn identity_vectors() {
        assert_eq!(
            identity("@alice:example.org", "DEVICE", "member-1"),
            "ZhlrG5pVejj+OlqePjLQQjuMl0gaU5rmJ4LCmZOam2U"
        );
        assert_eq!(
            legacy_identity("@alice:example.org", "DEVICE"),
            "@alice:example.org:DEVICE"
        );
    }

    #[test]
    fn go_html_safe_escaping() {
        assert_eq!(
            go_json_array(&["<a&b>", "\u{2028}\"\\\n\u{1}é"]),
            "[\"\\u003ca\\u0026b\\u003e\",\"\\u2028\\\"\\\\\\n\\u0001é\"]".as_bytes()
        );
        assert_eq!(
            room_alias("<&>", "m.call#ROOM"),
            "Oa3DrjP1WIcaIFKJDrS2p1V8MdSC9mMhxS9aFBUo1F4"
        );
    }

    #[test]
    fn client_claims_json() {
        let c = Claims::client("devkey", "id", "room", false, 1_700_000_000, 3600);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "iss": "devkey", "sub": "id", "nbf": 1_700_000_000u64, "exp": 1_700_003_600u64,
                "video": {"roomJoin": true, "room": "room", "canPublish": false,
                          "canSubscribe": true, "canUpdateOwnMetadata": true}
            })
        );
        let full = Claims::client("devkey", "id", "room", true, 0, 3600);
        assert_eq!(full.video.can_publish, Some(true));
        assert_eq!(full.video.room_create, None);
    }

    #[test]
    fn server_token_claims() {
        let c = Claims::room_create("devkey", 100);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"iss": "devkey", "nbf": 100, "exp": 160, "video": {"roomCreate": true}})
        );
    }

    #[test]
    fn signature_is_hs256_with_secret() {
        let c = Claims::client("devkey", "id", "room", true, 1_700_000_000, 3600);
        let jwt = c.sign(b"secret").unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let ok = jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"secret").unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(ok.header.alg, jsonwebtoken::Algorithm::HS256);
        assert_eq!(ok.claims["video"]["room"], "room");
        assert!(jsonwebtoken::decode::<serde_json::Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_secret(b"wrong").unwrap(),
            &validation,
        )
        .is_err());
    }

    #[test]
    fn get_participant_pieces() {
        // Field 1 "r", field 2 "id" (protobuf wire format, as protoc encodes it).
        assert_eq!(get_participant_body("r", "id"), b"\x0a\x01r\x12\x02id");
        let claims = serde_json::to_value(Claims::room_admin("k", "room", 100)).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"iss":"k","nbf":100,"exp":100 + SERVER_TOKEN_LIFETIME_SECS,
                "video":{"roomAdmin":true,"room":"room"}})
        );
        assert_eq!(participant_present(Some(200), b""), Some(true));
        assert_eq!(participant_present(Some(404), b""), Some(false));
        let not_found = br#"{"code":"not_found","msg":"participant not found"}"#;
        assert_eq!(participant_present(Some(400), not_found), Some(false));
        assert_eq!(participant_present(Some(503), b"upstream"), None);
        assert_eq!(participant_present(None, b""), None);
    }

    #[test]
    fn create_room_protobuf() {
        // name=1 (len-delimited), empty_timeout=2 (300), departure_timeout=10 (20); the
        // zero max_participants is not encoded (proto3 default).
        assert_eq!(
            create_room_body("r"),
            vec![0x0a, 0x01, b'r', 0x10, 0xac, 0x02, 0x50, 0x14]
        );
    }
}
