#!/usr/bin/env bash
# Runs the fanout scenarios against session-server and against the ceiling
# (minimal fan-out server), each pinned to core 1 with the load generator on core
# 0, RUNS times each, and prints one line per run (JSON) plus a median summary.
# Usage: bench/run-fanout.sh [RUNS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECS=${2:-8}
SECRET=loadgen-secret-0123456789
cargo build --release --bin session-server --bin loadgen >/dev/null 2>&1
OUT=$(mktemp -d)
SCENARIOS=("10 10 10" "10 10 70" "1 100 5" "1 100 20")

start_server() {
  case $1 in
    server)
      rm -rf /tmp/fanout-data
      JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 ./target/release/session-server \
        --port 18900 --bind 127.0.0.1 --workers 1 --data-dir /tmp/fanout-data \
        --rate-limit-per-sec 100000 --rate-limit-burst 100000 >"$OUT/server.log" 2>&1 &
      PORT=18900 ;;
    ceiling)
      taskset -c 1 ./target/release/loadgen ceiling --port 18990 >"$OUT/ceiling.log" 2>&1 &
      PORT=18990 ;;
  esac
  PID=$!
  sleep 1
}

for target in ceiling server; do
  for scenario in "${SCENARIOS[@]}"; do
    set -- $scenario
    for run in $(seq "$RUNS"); do
      start_server "$target"
      JWT_SECRET=$SECRET taskset -c 0 ./target/release/loadgen fanout --url "ws://127.0.0.1:$PORT" \
        --rooms "$1" --members "$2" --hz "$3" --seconds "$SECS" --server-pid "$PID" \
        | sed "s/^/{\"target\":\"$target\",\"run\":$run,\"r\":/; s/\$/}/" | tee -a "$OUT/results.jsonl"
      kill "$PID"; wait "$PID" 2>/dev/null || true
    done
  done
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for row in rows:
    r = row["r"]
    groups.setdefault((row["target"], r["rooms"], r["members"], r["hz"]), []).append(r)
print("| target | layout | runs | p50 ms | p99 ms | CPU share | µs/delivery | deliveries/s |")
print("|---|---|---|---|---|---|---|---|")
for (target, rooms, members, hz), rs in sorted(groups.items()):
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {target} | {rooms}×{members}×{hz:g} Hz | {len(rs)} | {med(lambda r: r['latency_ms']['p50']):.2f} | "
          f"{med(lambda r: r['latency_ms']['p99']):.2f} | {med(lambda r: r['server_cpu_share']):.2f} | "
          f"{med(lambda r: r['server_cpu_us_per_delivery']):.1f} | {med(lambda r: r['deliveries_per_sec']):,.0f} |")
PY
