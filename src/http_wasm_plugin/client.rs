//! Blocking HTTP/1.1 callouts from the Traefik plugin over the WasmEdge socket extension.
//! Placeholder until the transport lands: every callout fails, which the exchange turns into
//! the SPEC's failure answers (401 for the homeserver, 500 for LiveKit).

use crate::config::TokenService;
use crate::exchange::Callout;

/// What a callout produced, as the exchange needs it.
pub struct Outcome {
    pub status: Option<u16>,
    pub cache_control: Option<String>,
    pub body: Vec<u8>,
    pub detail: String,
}

/// Makes the callout `c`; reads at most `max_body` bytes of the answer body.
pub fn call(c: &Callout, _service: &TokenService, _max_body: usize) -> Outcome {
    Outcome {
        status: None,
        cache_control: None,
        body: Vec::new(),
        detail: format!(
            "callouts to {} are not available in this build yet",
            c.upstream.authority
        ),
    }
}
