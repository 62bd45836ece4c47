//! Micro-benchmarks of the core, natively (`cargo bench --bench core`): the median time per
//! operation over several rounds, printed next to the targets of the performance issue.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::hint::black_box;
use std::time::Instant;

use matrixrtc_livekit_auth::config::Settings;
use matrixrtc_livekit_auth::exchange::route;
use matrixrtc_livekit_auth::livekit::{self, Claims};
use matrixrtc_livekit_auth::path::{self, Prefix};
use matrixrtc_livekit_auth::requests::{TokenEndpoint, TokenRequest};

const ROUNDS: usize = 7;

/// Median nanoseconds per call of `f` over `ROUNDS` rounds of `iters` calls.
fn measure(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 10 {
        f();
    }
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn row(name: &str, ns: f64, target_ns: Option<f64>) {
    match target_ns {
        Some(t) => println!(
            "{name:<34} {:>10.3} µs   target ≤ {:>6.1} µs   ratio {:>5.2}   {}",
            ns / 1000.0,
            t / 1000.0,
            ns / t,
            if ns <= t { "met" } else { "MISSED" }
        ),
        None => println!("{name:<34} {:>10.3} µs", ns / 1000.0),
    }
}

fn main() {
    let prefixes = vec![Prefix::parse("/livekit-jwt-service").unwrap()];
    let settings = Settings::from_json(
        br#"{"stripPrefixes":["/livekit-jwt-service"],"livekitUrl":"wss://sfu.example.org","livekitKey":"devkey","livekitSecret":"secret-secret-secret-secret","fullAccessHomeservers":["example.org"]}"#,
        &|_| None,
    )
    .unwrap();
    let body = br#"{"room_id":"!abcdefghijklmnop:example.org","slot_id":"m.call#ROOM","openid_token":{"access_token":"syt_YWxpY2U_abcdefghijklmnopqrst_0123456789","token_type":"Bearer","matrix_server_name":"example.org","expires_in":3600},"member":{"id":"member-abcdef","claimed_user_id":"@alice:example.org","claimed_device_id":"ABCDEFGHIJ"}}"#;

    println!("core micro-benchmarks (median of {ROUNDS} rounds, native release build)");
    row(
        "strip-prefix (//get_token?x=1)",
        measure(1_000_000, || {
            black_box(path::strip(
                &prefixes,
                black_box("/livekit-jwt-service//get_token?x=1"),
            ));
        }),
        Some(1000.0),
    );
    row(
        "route (pass-through under prefix)",
        measure(1_000_000, || {
            black_box(route(
                &settings,
                "GET",
                black_box("/livekit-jwt-service/a/b?c=d"),
            ));
        }),
        None,
    );
    row(
        "decode /get_token body",
        measure(200_000, || {
            black_box(TokenRequest::decode(TokenEndpoint::GetToken, black_box(body)).unwrap());
        }),
        None,
    );
    row(
        "room alias + identity",
        measure(200_000, || {
            black_box(livekit::room_alias(
                "!abcdefghijklmnop:example.org",
                "m.call#ROOM",
            ));
            black_box(livekit::identity(
                "@alice:example.org",
                "ABCDEFGHIJ",
                "member-abcdef",
            ));
        }),
        None,
    );
    row(
        "mint (claims + HS256 sign)",
        measure(100_000, || {
            let c = Claims::client(
                "devkey",
                "identity",
                "room-alias",
                true,
                1_800_000_000,
                3600,
            );
            black_box(c.sign(b"secret-secret-secret-secret").unwrap());
        }),
        Some(20_000.0),
    );
}
