#!/usr/bin/env bash
# A/B fan-out: the same scenarios against several session-server binaries (and
# server flags), runs interleaved (run 1 of every scenario and variant, then
# run 2, …) so machine noise hits every variant and scenario alike; server on
# core 1, load generator on core 0 (as run-fanout.sh); prints each run's JSON
# line, then a table of medians.
#
# Usage: VARIANTS="base=/path/a;new=/path/b --max-snapshot-hz 0" loadgen/run-ab.sh [RUNS] [SECONDS]
# Environment:
#   VARIANTS   ';'-separated "label=binary [flags…]"
#   SCENARIOS  ';'-separated "rooms members hz shapes [v1|v2] [deflate]" (default
#              below; "deflate": members offer permessage-deflate, `--deflate`)
#   LOADGEN    the loadgen binary (default ./target/release/loadgen)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECS=${2:-6}
SECRET=loadgen-secret-0123456789
LOADGEN=${LOADGEN:-./target/release/loadgen}
IFS=';' read -r -a VARIANT_LIST <<<"$VARIANTS"
IFS=';' read -r -a SCENARIO_LIST <<<"${SCENARIOS:-10 10 10 0;10 10 10 200;10 10 70 0}"
OUT=$(mktemp -d)
for run in $(seq "$RUNS"); do
  for scenario in "${SCENARIO_LIST[@]}"; do
    read -r rooms members hz shapes protocol deflate <<<"$scenario"
    flags=()
    [[ ${protocol:-v1} == v2 ]] && flags+=(--v2)
    [[ ${deflate:-} == deflate ]] && flags+=(--deflate)
    for variant in "${VARIANT_LIST[@]}"; do
      label=${variant%%=*}
      read -r -a cmd <<<"${variant#*=}"
      rm -rf "$OUT/data"
      JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 "${cmd[@]}" --port 18901 --bind 127.0.0.1 \
        --workers 1 --data-dir "$OUT/data" --rate-limit-per-sec 100000 --rate-limit-burst 100000 \
        >"$OUT/server.log" 2>&1 &
      PID=$!
      sleep 1
      JWT_SECRET=$SECRET taskset -c 0 "$LOADGEN" fanout --url ws://127.0.0.1:18901 \
        --rooms "$rooms" --members "$members" --hz "$hz" --shapes "$shapes" \
        --seconds "$SECS" --server-pid "$PID" "${flags[@]}" \
        | sed "s/^/{\"variant\":\"$label\",\"run\":$run,\"r\":/; s/\$/}/" | tee -a "$OUT/results.jsonl"
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
    protocol = r.get("protocol", "v1") + (" deflate" if r.get("deflate") else "")
    groups.setdefault((r["rooms"], r["members"], r["hz"], r["shapes"], protocol, row["variant"]), []).append(r)
print("| layout | shapes | protocol | variant | runs | p50 ms | p99 ms | CPU share | µs/delivery | deliveries/s | msgs/s/member | B/s into each member | wire B/s into each member | µs CPU/conveyed move | stale at end |")
print("|" + "---|" * 15)
for (rooms, members, hz, shapes, protocol, variant), rs in groups.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    # Wire bytes: frame headers and payloads as sent (loadgen builds before
    # --deflate did not report them).
    wire = (f"{med(lambda r: r['wire_bytes_per_sec_per_member']):,.0f}"
            if all("wire_bytes_per_sec_per_member" in r for r in rs) else "–")
    print(f"| {rooms}×{members}×{hz:g} Hz | {shapes} | {protocol} | {variant} | {len(rs)} "
          f"| {med(lambda r: r['latency_ms']['p50']):.2f} | {med(lambda r: r['latency_ms']['p99']):.2f} "
          f"| {med(lambda r: r['server_cpu_share']):.2f} | {med(lambda r: r['server_cpu_us_per_delivery']):.1f} "
          f"| {med(lambda r: r['deliveries_per_sec']):,.0f} | {med(lambda r: r['messages_per_sec_per_member']):.1f} "
          f"| {med(lambda r: r['bytes_per_sec_per_member']):,.0f} | {wire} | {med(lambda r: r['server_cpu_us_per_conveyed_move']):.2f} "
          f"| {max(r['final_state_stale_pairs'] for r in rs)} |")
PY
