#!/usr/bin/env bash
# base / new (both --max-snapshot-hz 0) / loadgen ceiling, interleaved, pinning and flags as loadgen/run-ab.sh.
# Usage: bash /tmp/ab2/run-ceiling-ab.sh RUNS SECS SHAPES TAG
set -euo pipefail
RUNS=${1:-4}; SECS=${2:-6}; SHAPES=${3:-0}; TAG=${4:-s$SHAPES}
SECRET=loadgen-secret-0123456789
LG=/tmp/ab/base-loadgen
declare -A BIN=([base]=/tmp/ab/base-session-server [new]=/tmp/ab2/new-session-server)
OUT=/tmp/ab2/runs; mkdir -p $OUT; J=/tmp/ab2/ceiling-$TAG.jsonl; rm -f $J
for run in $(seq "$RUNS"); do
  for target in base new ceiling; do
    rm -rf "$OUT/data"
    if [ $target = ceiling ]; then
      taskset -c 1 $LG ceiling --port 18990 >"$OUT/ceiling.log" 2>&1 & PORT=18990
    else
      JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 ${BIN[$target]} --max-snapshot-hz 0 --port 18901 --bind 127.0.0.1 \
        --workers 1 --data-dir "$OUT/data" --rate-limit-per-sec 100000 --rate-limit-burst 100000 >"$OUT/server-$target.log" 2>&1 & PORT=18901
    fi
    PID=$!; sleep 1
    JWT_SECRET=$SECRET taskset -c 0 $LG fanout --url ws://127.0.0.1:$PORT --rooms 10 --members 10 --hz 10 --shapes $SHAPES \
      --seconds "$SECS" --server-pid "$PID" | sed "s/^/{\"target\":\"$target\",\"run\":$run,\"r\":/; s/\$/}/" | tee -a $J
    kill "$PID"; wait "$PID" 2>/dev/null || true
  done
done
python3 - $J <<'PY'
import json,sys,statistics
rows=[json.loads(l) for l in open(sys.argv[1])]
med={}
for t in ("base","new","ceiling"):
    rs=[r["r"] for r in rows if r["target"]==t]
    us=[r["server_cpu_us_per_delivery"] for r in rs]
    med[t]=statistics.median(us)
    print(t, "µs/delivery runs:", [round(u,1) for u in us], "median", round(med[t],1),
          "deliveries/s", round(statistics.median(r["deliveries_per_sec"] for r in rs)),
          "cpu share", round(statistics.median(r["server_cpu_share"] for r in rs),3),
          "p50/p99 ms", statistics.median(r["latency_ms"]["p50"] for r in rs), statistics.median(r["latency_ms"]["p99"] for r in rs),
          "stale", max(r["final_state_stale_pairs"] for r in rs))
print("ratios: base/ceiling %.2f  new/ceiling %.2f  new/base %.3f" % (med["base"]/med["ceiling"], med["new"]/med["ceiling"], med["new"]/med["base"]))
PY
