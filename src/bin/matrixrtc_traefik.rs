//! The Traefik middleware plugin (http-wasm handler ABI): a wasm32-wasip1 command module whose
//! `main` registers the handler. Build: `scripts/build-traefik.sh`.

fn main() {
    #[cfg(target_arch = "wasm32")]
    matrixrtc_livekit_auth::http_wasm_plugin::register();
}
