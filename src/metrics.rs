//! Metric names and labels, host-agnostic: what the filter counts and how it names it.
//!
//! Names are Envoy stat names with the labels embedded as `.label.value` pairs; the shipped
//! `envoy/envoy.yaml` turns them into Prometheus labels with `stats_config.stats_tags`, so a
//! scrape of `/stats/prometheus` reads e.g.
//! `matrixrtc_token_requests{endpoint="get_token",outcome="issued_full"} 3`.
//! Label values are fixed words (never a user, token or server name), so cardinality is bounded.

use crate::exchange::CalloutTarget;
use crate::requests::TokenEndpoint;
use crate::response::LocalResponse;

/// Counter: token requests by endpoint and outcome.
pub fn token_requests(endpoint: TokenEndpoint, outcome: &str) -> String {
    let endpoint = match endpoint {
        TokenEndpoint::SfuGet => "sfu_get",
        TokenEndpoint::GetToken => "get_token",
        TokenEndpoint::DelegateDelayedLeave => "delegate_delayed_leave",
        TokenEndpoint::SfuWebhook => "sfu_webhook",
    };
    format!("matrixrtc.token_requests.endpoint.{endpoint}.outcome.{outcome}")
}

/// The outcome label of a token request's answer: `issued_full`, `issued_restricted`,
/// `accepted` (200 without a token: a delegation or a webhook), `bad_request` (400),
/// `unauthorized` (401), `forbidden` (403), `too_large` (413), `sfu_error` (500 from room
/// creation), `internal_error` (other 500), `unavailable` (503), or `other`.
pub fn outcome(response: &LocalResponse, issued_full_access: Option<bool>) -> &'static str {
    match (response.status, issued_full_access) {
        (200, Some(true)) => "issued_full",
        (200, Some(false)) => "issued_restricted",
        (200, None) => "accepted",
        (400, _) => "bad_request",
        (401, _) => "unauthorized",
        (403, _) => "forbidden",
        (503, _) => "unavailable",
        (413, _) => "too_large",
        (500, _) if response.body.windows(6).any(|w| w == b"on SFU") => "sfu_error",
        (500, _) => "internal_error",
        _ => "other",
    }
}

fn target_label(target: CalloutTarget) -> &'static str {
    match target {
        CalloutTarget::Homeserver => "homeserver",
        CalloutTarget::WellKnown => "well_known",
        CalloutTarget::LiveKit => "livekit",
        CalloutTarget::ClientWellKnown => "client_well_known",
        CalloutTarget::DelayedEvents => "delayed_events",
    }
}

/// Counter: callouts by target and result (`ok`, `status_3xx`/`4xx`/`5xx`, `no_answer` for
/// connection failures, resets and timeouts, `not_dispatched`).
pub fn callouts(target: CalloutTarget, status: Option<u16>, dispatched: bool) -> String {
    let result = match (dispatched, status) {
        (false, _) => "not_dispatched",
        (true, None) => "no_answer",
        (true, Some(200..=299)) => "ok",
        (true, Some(300..=399)) => "status_3xx",
        (true, Some(400..=499)) => "status_4xx",
        (true, Some(_)) => "status_5xx",
    };
    format!(
        "matrixrtc.callouts.target.{}.result.{result}",
        target_label(target)
    )
}

/// Histogram: callout duration in milliseconds, by target.
pub fn callout_duration_ms(target: CalloutTarget) -> String {
    format!(
        "matrixrtc.callout_duration_ms.target.{}",
        target_label(target)
    )
}

/// Counter: requests forwarded with a prefix stripped.
pub const STRIP_PREFIX_REWRITES: &str = "matrixrtc.strip_prefix_rewrites";

/// Counter: `.well-known` cache lookups by result (`hit`, `miss`).
pub fn well_known_cache(hit: bool) -> String {
    format!(
        "matrixrtc.well_known_cache.result.{}",
        if hit { "hit" } else { "miss" }
    )
}

/// Counter: delayed-leave jobs by how they ended (`sent`, `already_sent`, `gone`, `replaced`,
/// `refused`, `gave_up`; see [`crate::delayed_leave::Outcome`]).
pub fn delayed_leave_jobs(outcome: crate::delayed_leave::Outcome) -> String {
    use crate::delayed_leave::Outcome;
    let label = match outcome {
        Outcome::Sent => "sent",
        Outcome::AlreadySent => "already_sent",
        Outcome::Gone => "gone",
        Outcome::Replaced => "replaced",
        Outcome::Refused(_) => "refused",
        Outcome::GaveUp => "gave_up",
    };
    format!("matrixrtc.delayed_leave_jobs.outcome.{label}")
}

/// Gauge: delayed-leave jobs running now.
pub const DELAYED_LEAVE_JOBS_RUNNING: &str = "matrixrtc.delayed_leave_jobs_running";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::MatrixError;

    #[test]
    fn names() {
        assert_eq!(
            token_requests(TokenEndpoint::GetToken, "issued_full"),
            "matrixrtc.token_requests.endpoint.get_token.outcome.issued_full"
        );
        assert_eq!(
            callouts(CalloutTarget::Homeserver, Some(503), true),
            "matrixrtc.callouts.target.homeserver.result.status_5xx"
        );
        assert_eq!(
            callouts(CalloutTarget::LiveKit, None, false),
            "matrixrtc.callouts.target.livekit.result.not_dispatched"
        );
    }

    #[test]
    fn outcomes() {
        let ok = LocalResponse::token("wss://x", "a.b.c");
        assert_eq!(outcome(&ok, Some(true)), "issued_full");
        assert_eq!(outcome(&ok, Some(false)), "issued_restricted");
        assert_eq!(
            outcome(
                &LocalResponse::error(MatrixError::ROOM_CREATION_FAILED),
                None
            ),
            "sfu_error"
        );
        assert_eq!(
            outcome(
                &LocalResponse::error(MatrixError::TOKEN_MINTING_FAILED),
                None
            ),
            "internal_error"
        );
        assert_eq!(
            outcome(&LocalResponse::error(MatrixError::UNAUTHORIZED), None),
            "unauthorized"
        );
        assert_eq!(
            outcome(&LocalResponse::error(MatrixError::NOT_JSON), None),
            "bad_request"
        );
        assert_eq!(
            outcome(
                &LocalResponse::error(MatrixError::DELEGATION_FORBIDDEN),
                None
            ),
            "forbidden"
        );
        assert_eq!(outcome(&LocalResponse::delegated(), None), "accepted");
        assert_eq!(
            delayed_leave_jobs(crate::delayed_leave::Outcome::AlreadySent),
            "matrixrtc.delayed_leave_jobs.outcome.already_sent"
        );
    }
}
