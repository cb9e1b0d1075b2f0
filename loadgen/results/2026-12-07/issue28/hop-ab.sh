#!/usr/bin/env bash
# perf stat task-clock (server and its children) over 5 s in the middle of a 10 s fanout run
# (10 rooms x 10 members x 10 Hz, v1, no shapes), server on core 1, load on core 0:
# the session server, the ceiling, and the ceiling with a process hop per message.
# Usage: bash hop-ab.sh RUNS [SERVER_BIN] [LOADGEN_BIN (built with `ceiling --hop`)]
set -euo pipefail
RUNS=${1:-3}; BIN=${2:-/tmp/ab2/new-session-server}; LG=${3:-/tmp/prof3/hop-loadgen}
SECRET=loadgen-secret-0123456789; OUT=/tmp/prof3/hopab; mkdir -p $OUT
for run in $(seq $RUNS); do
 for target in new ceiling ceiling-hop; do
  rm -rf $OUT/data
  case $target in
   new) JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 $BIN --max-snapshot-hz 0 --port 18901 --bind 127.0.0.1 --workers 1 \
          --data-dir $OUT/data --rate-limit-per-sec 100000 --rate-limit-burst 100000 >$OUT/s.log 2>&1 & PORT=18901;;
   ceiling) taskset -c 1 $LG ceiling --port 18990 >$OUT/c.log 2>&1 & PORT=18990;;
   ceiling-hop) taskset -c 1 $LG ceiling --port 18991 --hop >$OUT/h.log 2>&1 & PORT=18991;;
  esac
  PID=$!; sleep 1
  PIDS=$PID; for c in $(cat /proc/$PID/task/*/children 2>/dev/null); do PIDS="$PIDS,$c"; done
  JWT_SECRET=$SECRET taskset -c 0 $LG fanout --url ws://127.0.0.1:$PORT --rooms 10 --members 10 --hz 10 --shapes 0 \
    --seconds 10 --server-pid $PID > $OUT/f.json &
  F=$!; sleep 3
  taskset -c 0 perf stat -x, -e task-clock,context-switches -p $PIDS -o $OUT/stat.txt -- sleep 5
  wait $F || true
  python3 - $target $run $OUT/stat.txt $OUT/f.json <<'PY'
import json,sys
t,run,stat,f=sys.argv[1:]
lines=open(stat).read().splitlines()
ms=float([l for l in lines if 'task-clock' in l][0].split(',')[0])
cs=float([l for l in lines if 'context-switches' in l][0].split(',')[0])
r=json.load(open(f)); d=r["deliveries_per_sec"]
print(json.dumps({"target":t,"run":int(run),"deliveries_per_sec":round(d),"us_per_delivery":round(ms*1000/(d*5),3),
  "switches_per_message":round(cs/(d/10*5),2),"p50_ms":r["latency_ms"]["p50"],"p99_ms":r["latency_ms"]["p99"]}))
PY
  kill $PID; wait $PID 2>/dev/null || true
 done
done
