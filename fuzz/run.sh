#!/usr/bin/env bash
# `make fuzz`: runs every fuzz target for FUZZ_SECONDS each (cargo-fuzz, libFuzzer, a nightly
# toolchain), from the committed seeds plus what earlier runs found (fuzz/corpus/, not committed),
# then prints executions and crashes per target and one verdict line. A crash leaves its input in
# fuzz/artifacts/<target>/: turn it into a regression test.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${1:-120}"
shift
targets=("$@")
cargo_fuzz="$root/.tools/bin/cargo-fuzz"
logs="$root/.run/fuzz"
mkdir -p "$logs"
rows=()
total=0
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="$logs/$t.log"
  echo "fuzzing $t for ${seconds}s (log: $log)"
  # Built with debug assertions and overflow checks: arithmetic that overflows is a finding too.
  if RUSTUP_TOOLCHAIN=nightly "$cargo_fuzz" run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 >"$log" 2>&1; then
    crashes=0
  else
    crashes=1
    failed=$((failed + 1))
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  runs=${runs:-0}
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  total=$((total + runs))
  rows+=("$(printf '%-24s %14s %8s %8s' "$t" "$runs" "$crashes" "$corpus")")
done
printf '%-24s %14s %8s %8s\n' target executions crashes corpus
for r in "${rows[@]}"; do echo "$r"; done
echo "total executions: $total"
if [[ $failed -gt 0 ]]; then
  echo "FUZZING FOUND $failed CRASHING TARGET(S): see fuzz/artifacts/ and the logs in $logs"
  exit 1
fi
echo "no crashes"
