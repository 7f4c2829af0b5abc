#!/usr/bin/env bash
# `make demo`: `make run`'s gateway (envoy/run.sh: minifugu, sidecar, Envoy with the filter) and the
# demo store app in front of it; prints the store's URL. Ctrl-C stops everything.
# Ports: DEMO_PORT (8000) for the store, and envoy/run.sh's GATEWAY_PORT, ADMIN_PORT, SIDECAR_PORT,
# MINIFUGU_PORT (8080, 9901, 9090, 8787).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

: "${DEMO_PORT:=8000}" "${GATEWAY_PORT:=8080}"
export DEMO_PORT GATEWAY_PORT
python="$root/.tools/venv/bin/python"
[[ -x "$python" ]] || { echo "missing $python: run 'make demo' (it installs what is needed)" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$DEMO_PORT") 2>/dev/null; then
  echo "port $DEMO_PORT is already in use; set DEMO_PORT to a free one" >&2
  exit 1
fi
# The demo is the local gateway in front of minifugu, whatever the calling shell points at.
unset TURBOPUFFER_URL TURBOPUFFER_API_KEY TURBOPUFFER_REGION AEROSPIKE_HOSTS
export AUTH_MODE=passthrough

run_dir="$root/.run/demo-$DEMO_PORT"
mkdir -p "$run_dir"
gateway_out="$run_dir/gateway.out"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping the demo..."
  # envoy/run.sh stops its own processes on TERM.
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

"$root/envoy/run.sh" >"$gateway_out" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
for ((i = 0; i < 600; i++)); do
  grep -q "Ctrl-C stops everything." "$gateway_out" && break
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    cat "$gateway_out" >&2
    echo "the gateway did not start (envoy/run.sh exited)" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q "Ctrl-C stops everything." "$gateway_out" || { cat "$gateway_out" >&2; echo "the gateway did not start within 60 s" >&2; exit 1; }
sed -n '/Layer gateway running/,/logs/p' "$gateway_out"

cd "$root/demo"
"$python" store.py >"$run_dir/store.log" 2>&1 &
pids+=($!)
for ((i = 0; i < 200; i++)); do
  curl -fsS -o /dev/null "http://127.0.0.1:$DEMO_PORT/healthz" 2>/dev/null && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then
    cat "$run_dir/store.log" >&2
    echo "the demo store did not start" >&2
    exit 1
  fi
  sleep 0.1
done

cat <<INFO

Demo store running: http://127.0.0.1:$DEMO_PORT/
  It stages the catalogue (demo/catalogue.json) in pipeline ${DEMO_PIPELINE:-demo-store-embed} and embeds it
  into namespace ${DEMO_NAMESPACE:-demo-store}, all through the gateway; watch the pipeline panel.
  store log  $run_dir/store.log

Ctrl-C stops everything.
INFO

# Exit (and stop the rest) as soon as either dies.
wait -n "${pids[@]}" 2>/dev/null || true
echo "a demo process exited; see $run_dir and the gateway's logs" >&2
exit 1
