#!/usr/bin/env bash
# TLS against plain, in one run: handshakes per second (`loadgen churn`) and CPU
# per delivery at 10 × 10 × 10 Hz (`loadgen fanout`), server pinned to core 1
# with one worker, generator on core 0, RUNS runs of each, alternating.
# A throwaway CA and a certificate for localhost are made with openssl.
#
# Usage: loadgen/run-tls.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECRET=loadgen-secret-0123456789
cargo build --release --bin session-server --bin loadgen >/dev/null 2>&1
DIR=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$DIR/ca.key" -out "$DIR/ca.crt" -days 2 -subj /CN=bench-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$DIR/tls.key" -out "$DIR/tls.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$DIR/ext"
openssl x509 -req -in "$DIR/tls.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
  -CAcreateserial -out "$DIR/tls.crt" -days 2 -extfile "$DIR/ext" 2>/dev/null

run() { # MODE SCENARIO
  local extra=() scheme=ws
  if [ "$1" = tls ]; then extra=(--tls-cert "$DIR/tls.crt" --tls-key "$DIR/tls.key"); scheme=wss; fi
  rm -rf "$DIR/data"
  JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 ./target/release/session-server --port 18950 \
    --bind 127.0.0.1 --workers 1 --data-dir "$DIR/data" \
    --rate-limit-per-sec 100000 --rate-limit-burst 100000 "${extra[@]}" >"$DIR/server.log" 2>&1 &
  local pid=$!
  sleep 1
  if [ "$2" = churn ]; then
    LOADGEN_TLS_CA=$DIR/ca.crt JWT_SECRET=$SECRET taskset -c 0 ./target/release/loadgen churn \
      --url "$scheme://localhost:18950" --seconds 5 --server-pid "$pid"
  else
    LOADGEN_TLS_CA=$DIR/ca.crt JWT_SECRET=$SECRET taskset -c 0 ./target/release/loadgen fanout \
      --url "$scheme://localhost:18950" --rooms 10 --members 10 --hz 10 --seconds 6 --server-pid "$pid"
  fi | sed "s/^/{\"mode\":\"$1\",\"r\":/; s/\$/}/" | tee -a "$DIR/results.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for scenario in churn fanout; do
  for _ in $(seq "$RUNS"); do
    run plain "$scenario"
    run tls "$scenario"
  done
done

python3 - "$DIR/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for scenario, key in [("churn", "handshakes_per_sec"), ("fanout", "server_cpu_us_per_delivery")]:
    for mode in ("plain", "tls"):
        vals = [r["r"][key] for r in rows if r["mode"] == mode and r["r"]["scenario"] == scenario]
        print(f"{scenario:7} {mode:6} {key}: median {statistics.median(vals):,.1f} (runs: {', '.join(f'{v:,.1f}' for v in vals)})")
PY
