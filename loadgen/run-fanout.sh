#!/usr/bin/env bash
# Runs fanout scenarios against session-server and against the ceiling (minimal
# fan-out server), each pinned to core 1 with the load generator on core 0, RUNS
# times each; prints one line per run (JSON) plus a table of medians.
#
# Usage: loadgen/run-fanout.sh [RUNS] [SECONDS]
# Environment:
#   SCENARIOS  ';'-separated "rooms members hz shapes slow_members [protocol
#              [max_snapshot_hz]]" (default: the issue 5 layouts); protocol is v1
#              (default) or v2, max_snapshot_hz the server's --max-snapshot-hz
#              (default: the server's default, 60)
#   TARGETS    "ceiling server" (default) or one of them
# The overload curve: SCENARIOS="10 10 70 0 0;10 10 140 0 0;…" TARGETS=server.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECS=${2:-8}
SECRET=loadgen-secret-0123456789
DEFAULT_SCENARIOS="10 10 10 0 0;10 10 10 200 0;10 10 70 0 0;10 10 700 0 0;1 100 5 0 0;1 100 20 0 0;10 10 10 0 1;10 10 10 200 1"
IFS=';' read -r -a SCENARIO_LIST <<<"${SCENARIOS:-$DEFAULT_SCENARIOS}"
read -r -a TARGET_LIST <<<"${TARGETS:-ceiling server}"
cargo build --release --bin session-server --bin loadgen >/dev/null 2>&1
OUT=$(mktemp -d)
DATA="$OUT/data"

start_server() {
  case $1 in
    server)
      rm -rf "$DATA"
      JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 ./target/release/session-server \
        --port 18900 --bind 127.0.0.1 --workers 1 --data-dir "$DATA" \
        ${2:+--max-snapshot-hz "$2"} \
        --rate-limit-per-sec 100000 --rate-limit-burst 100000 >"$OUT/server.log" 2>&1 &
      PORT=18900 ;;
    ceiling)
      taskset -c 1 ./target/release/loadgen ceiling --port 18990 >"$OUT/ceiling.log" 2>&1 &
      PORT=18990 ;;
  esac
  PID=$!
  sleep 1
}

for target in "${TARGET_LIST[@]}"; do
  for scenario in "${SCENARIO_LIST[@]}"; do
    read -r rooms members hz shapes slow protocol max_hz <<<"$scenario"
    protocol=${protocol:-v1}
    for run in $(seq "$RUNS"); do
      start_server "$target" "${max_hz:-}"
      JWT_SECRET=$SECRET taskset -c 0 ./target/release/loadgen fanout --url "ws://127.0.0.1:$PORT" \
        --rooms "$rooms" --members "$members" --hz "$hz" --shapes "$shapes" --slow-members "$slow" \
        --seconds "$SECS" --server-pid "$PID" $([ "$protocol" = v2 ] && echo --v2) \
        | sed "s/^/{\"target\":\"$target\",\"run\":$run,\"cap\":\"${max_hz:-default}\",\"r\":/; s/\$/}/" | tee -a "$OUT/results.jsonl"
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
    key = (row["target"], r["rooms"], r["members"], r["hz"], r["shapes"], r["slow_members"],
           r.get("protocol", "v1"), row.get("cap", "default"))
    groups.setdefault(key, []).append(r)
print("| target | protocol | cap Hz | layout | shapes | slow | runs | sent/s | p50 ms | p99 ms | CPU share | µs/delivery "
      "| deliveries/s | B/snapshot | superseded | stale at end | RSS MiB | generator CPU "
      "| msgs/s/member | B/s into each member | B/s out of server | µs CPU/conveyed move |")
print("|" + "---|" * 22)
for (target, rooms, members, hz, shapes, slow, protocol, cap), rs in sorted(groups.items()):
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {target} | {protocol} | {cap} | {rooms}×{members}×{hz:g} Hz | {shapes} | {slow} | {len(rs)} "
          f"| {med(lambda r: r['messages_sent'] / r['seconds']):,.0f} "
          f"| {med(lambda r: r['latency_ms']['p50']):.2f} | {med(lambda r: r['latency_ms']['p99']):.2f} "
          f"| {med(lambda r: r['server_cpu_share']):.2f} | {med(lambda r: r['server_cpu_us_per_delivery']):.1f} "
          f"| {med(lambda r: r['deliveries_per_sec']):,.0f} | {med(lambda r: r['bytes_per_snapshot']):,.0f} "
          f"| {med(lambda r: r['moves_superseded'] / max(r['moves_expected'], 1)):.0%} "
          f"| {max(r['final_state_stale_pairs'] for r in rs)} "
          f"| {med(lambda r: r['server_rss_kib'] / 1024):.1f} | {med(lambda r: r['loadgen_cpu_share']):.2f} "
          f"| {med(lambda r: r.get('messages_per_sec_per_member', 0)):.1f} "
          f"| {med(lambda r: r.get('bytes_per_sec_per_member', 0)):,.0f} "
          f"| {med(lambda r: r['bytes_per_sec']):,.0f} "
          f"| {med(lambda r: r.get('server_cpu_us_per_conveyed_move', 0)):.2f} |")
PY
