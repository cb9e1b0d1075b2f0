#!/usr/bin/env bash
# loadgen idle at 19,000 connections (BENCHMARKS.md's command), base and new alternated; also samples
# supervisor / worker VmRSS every 0.2 s for the split.  Usage: [BASE_BIN=… NEW_BIN=… TAG=…] bash run-idle-ab.sh RUNS
set -euo pipefail
RUNS=${1:-2}
export RUST_BACKTRACE=0
SECRET=loadgen-secret-0123456789
LG=/tmp/ab/base-loadgen
declare -A BIN=([base]=${BASE_BIN:-/tmp/ab/base-session-server} [new]=${NEW_BIN:-/tmp/ab2/new-session-server})
OUT=/tmp/ab2/runs; mkdir -p $OUT; J=/tmp/ab2/idle${TAG:-}.jsonl; rm -f $J
rss() { awk '/^VmRSS:/{print $2}' /proc/$1/status 2>/dev/null || echo 0; }
for run in $(seq "$RUNS"); do
  for v in base new; do
    rm -rf /tmp/ab2/idle-data
    JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 ${BIN[$v]} \
      --port 18906 --bind 127.0.0.1 --workers 1 --data-dir /tmp/ab2/idle-data \
      --max-rooms 2000 --rooms-per-worker 2000 --max-connections ${MAXCONN:-19500} > $OUT/idle-server-$v.log 2>&1 &
    PID=$!; sleep 1
    W=$(cat /proc/$PID/task/*/children | tr ' ' '\n' | grep . | head -1)
    s0=$(rss $PID); w0=$(rss $W)
    JWT_SECRET=$SECRET taskset -c 0 $LG idle \
      --url ws://127.0.0.1:18906 --connections 19000 --members ${MEMBERS:-10} --sources 4 --server-pid $PID > $OUT/idle-$v-$run.json &
    L=$!
    : > $OUT/idle-samples-$v-$run.txt
    while kill -0 $L 2>/dev/null; do echo "$(rss $PID) $(rss $W)" >> $OUT/idle-samples-$v-$run.txt; sleep 0.2; done
    if ! wait $L; then echo "loadgen failed ($v run $run)"; kill $PID; wait $PID 2>/dev/null || true; exit 1; fi
    python3 - $v $run $s0 $w0 $OUT/idle-$v-$run.json $OUT/idle-samples-$v-$run.txt <<'PY' | tee -a $J
import json,sys
v,run,s0,w0,f,samples=sys.argv[1:]
r=json.load(open(f)); n=r["connections"]
rows=[tuple(map(int,l.split())) for l in open(samples) if len(l.split())==2]
s,w=max(rows,key=lambda x:x[0]+x[1])  # the plateau while all sockets are held
print(json.dumps({"variant":v,"run":int(run),"kib_per_conn":r["server_rss_kib_per_connection"],
  "connect_seconds":r["connect_seconds"],"rss_before":r["server_rss_kib_before"],"rss_after":r["server_rss_kib_after"],
  "sup_kib_per_conn_sampled":(s-int(s0))/n,"worker_kib_per_conn_sampled":(w-int(w0))/n,"sup_before":int(s0),"worker_before":int(w0),"sup_peak":s,"worker_peak":w}))
PY
    kill $PID; wait $PID 2>/dev/null || true
    sleep 2
  done
done
