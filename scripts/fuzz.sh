#!/usr/bin/env bash
# Fuzzes the core's entry points with cargo fuzz (libFuzzer, nightly toolchain), each target for
# SECONDS (default 60), and prints executions and crashes per target. Crashes are kept in
# fuzz/artifacts/<target>/; each one found must become a regression test.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(strip_prefix token_request callout_answers plugin_config http1_answer webhook)
fi

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

summary=()
status=0
for t in "${targets[@]}"; do
  log=$(mktemp)
  echo "==> fuzzing $t for ${seconds}s"
  if cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -max_len=4096 >"$log" 2>&1; then
    result="no crash"
  else
    result="CRASH (see fuzz/artifacts/$t/)"
    status=1
    tail -30 "$log"
  fi
  execs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
  summary+=("$(printf '%-16s %12s execs  %s' "$t" "${execs:-?}" "$result")")
  rm -f "$log"
done
printf '\n%s\n' "target           executions  result"
printf '%s\n' "${summary[@]}"
exit $status
