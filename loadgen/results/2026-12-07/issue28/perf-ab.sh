#!/usr/bin/env bash
# perf stat task-clock over 5 s in the middle of a 10 s fanout run (10x10x10 Hz, v1, shapes $3), per target.
# Usage: bash /tmp/ab2/perf-ab.sh RUNS SHAPES
set -euo pipefail
RUNS=${1:-2}; SHAPES=${2:-0}
SECRET=loadgen-secret-0123456789
LG=/tmp/ab/base-loadgen
declare -A BIN=([base]=/tmp/ab/base-session-server [new]=/tmp/ab2/new-session-server)
OUT=/tmp/ab2/runs; mkdir -p $OUT; J=/tmp/ab2/perf-s$SHAPES.jsonl; rm -f $J
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
    PIDS=$PID; for c in $(cat /proc/$PID/task/*/children 2>/dev/null); do PIDS="$PIDS,$c"; done
    JWT_SECRET=$SECRET taskset -c 0 $LG fanout --url ws://127.0.0.1:$PORT --rooms 10 --members 10 --hz 10 --shapes $SHAPES \
      --seconds 10 --server-pid "$PID" > $OUT/perf-fanout.json &
    F=$!; sleep 3
    taskset -c 0 perf stat -x, -e task-clock -p $PIDS -o $OUT/perf-stat.txt -- sleep 5
    wait $F || true
    ms=$(grep task-clock $OUT/perf-stat.txt | cut -d, -f1)
    python3 - "$target" "$run" "$PIDS" "$ms" $OUT/perf-fanout.json <<'PY' | tee -a $J
import json,sys
t,run,pids,ms,f=sys.argv[1:]
r=json.load(open(f)); d=r["deliveries_per_sec"]; ms=float(ms)
print(json.dumps({"target":t,"run":int(run),"pids":pids,"task_clock_ms_5s":ms,"deliveries_per_sec":d,
  "perf_us_per_delivery":ms*1000/(d*5),"loadgen_us_per_delivery":r["server_cpu_us_per_delivery"],"p50":r["latency_ms"]["p50"]}))
PY
    kill "$PID"; wait "$PID" 2>/dev/null || true
  done
done
