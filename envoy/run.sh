#!/usr/bin/env bash
# `make run`: the whole gateway on loopback — the Turbopuffer emulator (unless a real upstream is
# configured), the sidecar with its embedded cache, and Envoy with the filter. Ctrl-C stops all.
# Ports: GATEWAY_PORT (8080), ADMIN_PORT (9901), SIDECAR_PORT (9090), MINIFUGU_PORT (8787).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

: "${GATEWAY_PORT:=8080}" "${ADMIN_PORT:=9901}" "${SIDECAR_PORT:=9090}" "${MINIFUGU_PORT:=8787}"
export GATEWAY_PORT ADMIN_PORT SIDECAR_PORT MINIFUGU_PORT
# One folder per gateway port, so two gateways on one host keep their configs and logs apart.
run_dir="$root/.run/gateway-$GATEWAY_PORT"
logs="$run_dir/logs"
mkdir -p "$logs"
envoy_bin="$root/.tools/venv/bin/envoy"
minifugu_bin="$root/.tools/bin/minifugu"
sidecar_bin="$root/target/release/hevlayer-sidecar"
for bin in "$envoy_bin" "$sidecar_bin"; do
  [[ -x "$bin" ]] || { echo "missing $bin: run 'make run' (it installs and builds what is needed)" >&2; exit 1; }
done

# A port some other process already holds would make the readiness checks below latch onto it.
ports=(GATEWAY_PORT ADMIN_PORT SIDECAR_PORT)
[[ -n "${TURBOPUFFER_URL:-}${TURBOPUFFER_API_KEY:-}" ]] || ports+=(MINIFUGU_PORT)
for var in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/${!var}") 2>/dev/null; then
    echo "port ${!var} is already in use; set $var to a free one" >&2
    exit 1
  fi
done

if [[ "${AUTH_MODE:-passthrough}" == keys && -z "${SIDECAR_GATEWAY_KEY:-}" ]]; then
  echo "AUTH_MODE=keys needs SIDECAR_GATEWAY_KEY: the sidecar's own gateway key (scope admin), which it" >&2
  echo "presents for pipeline vectors and document-fetch misses" >&2
  exit 1
fi

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping (${#pids[@]} processes)..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

wait_for() { # name url attempts
  local i
  for ((i = 0; i < $3; i++)); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not become ready at $2; see $logs" >&2
  exit 1
}

wait_for_port() { # name port attempts
  local i
  for ((i = 0; i < $3; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not start listening on port $2; see $logs" >&2
  exit 1
}

if [[ -z "${TURBOPUFFER_URL:-}" && -z "${TURBOPUFFER_API_KEY:-}" ]]; then
  [[ -x "$minifugu_bin" ]] || { echo "missing $minifugu_bin: run 'make tools'" >&2; exit 1; }
  MINIFUGU_LISTEN="127.0.0.1:$MINIFUGU_PORT" "$minifugu_bin" >"$logs/minifugu.log" 2>&1 &
  pids+=($!)
  wait_for_port minifugu "$MINIFUGU_PORT" 100
  upstream="minifugu (local Turbopuffer emulator) on 127.0.0.1:$MINIFUGU_PORT"
elif [[ -n "${TURBOPUFFER_URL:-}" ]]; then
  upstream="$TURBOPUFFER_URL"
else
  upstream="https://${TURBOPUFFER_REGION:-?}.turbopuffer.com"
fi

sidecar_key=()
if [[ "${AUTH_MODE:-passthrough}" == keys ]]; then
  sidecar_key=(--gateway-api-key "$SIDECAR_GATEWAY_KEY")
fi
if [[ -n "${AEROSPIKE_HOSTS:-}" ]]; then
  cache="Aerospike at $AEROSPIKE_HOSTS"
else
  cache="embedded document cache"
fi
"$sidecar_bin" --listen "127.0.0.1:$SIDECAR_PORT" --gateway-url "http://127.0.0.1:$GATEWAY_PORT" "${sidecar_key[@]}" \
  >"$logs/sidecar.log" 2>&1 &
pids+=($!)
wait_for sidecar "http://127.0.0.1:$SIDECAR_PORT/healthz" 100

ACCESS_LOG="$logs/access.log" python3 "$root/envoy/render.py" --profile local --out "$run_dir/envoy.yaml"
# A dynamic base id: a second Envoy on the host would otherwise fail to bind the hot-restart socket
# of base id 0 ("unable to bind domain socket with base_id=0").
"$envoy_bin" -c "$run_dir/envoy.yaml" --concurrency "${ENVOY_CONCURRENCY:-2}" --use-dynamic-base-id \
  --log-path "$logs/envoy.log" &
pids+=($!)
wait_for envoy "http://127.0.0.1:$ADMIN_PORT/ready" 200

cat <<INFO

Layer gateway running
  gateway   http://127.0.0.1:$GATEWAY_PORT   (Envoy + hevlayer filter)
  upstream  $upstream
  sidecar   http://127.0.0.1:$SIDECAR_PORT   ($cache; /healthz, /metrics)
  admin     http://127.0.0.1:$ADMIN_PORT    (Envoy admin; filter counters under /stats?filter=hevlayer)
  logs      $logs/{envoy,sidecar,minifugu,access}.log

Try:
  curl -s -X POST http://127.0.0.1:$GATEWAY_PORT/v2/namespaces/demo \\
    -H 'Authorization: Bearer local-key' -H 'content-type: application/json' \\
    -d '{"upsert_rows":[{"id":1,"title":"hello"}]}'
  curl -s http://127.0.0.1:$GATEWAY_PORT/v2/namespaces/demo/documents/1 -H 'Authorization: Bearer local-key'

Ctrl-C stops everything.
INFO

# Exit (and stop the rest) as soon as any of them dies.
wait -n "${pids[@]}" 2>/dev/null || true
echo "a gateway process exited; see $logs" >&2
exit 1
