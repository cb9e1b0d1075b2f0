#!/bin/bash
# Final measurements of this session: base e9f914c vs new (e988747), one after another on a quiet machine.
set -u
cd /tmp
R=/tmp/ab3
echo "== idle $(date)"
MAXCONN=26000 bash /work/main/loadgen/results/2026-12-07/issue28/run-idle-ab.sh 3 > $R/idle.out 2>&1
cp /tmp/ab2/idle.jsonl $R/idle.jsonl
echo "== perf $(date)"
bash /work/main/loadgen/results/2026-12-07/issue28/perf-ab.sh 5 0 > $R/perf-s0.out 2>&1
cp /tmp/ab2/perf-s0.jsonl $R/perf-s0.jsonl
echo "== fanout $(date)"
cd /work/main && VARIANTS="base=/tmp/ab/base-session-server;new=/tmp/ab2/new-session-server" SCENARIOS="10 10 10 0;10 10 10 200;10 10 70 0;10 10 10 0 v2" LOADGEN=/tmp/ab/base-loadgen bash loadgen/run-ab.sh 4 6 > $R/fanout.out 2>&1
echo "== recovery $(date)"
cp $(cat /tmp/ab2/recovery-bin.txt) $R/recovery-bench
for v in base new new base; do
  echo "== $v" >> $R/recovery.txt
  TEST_SERVER_BIN=/tmp/ab/$v-session-server $R/recovery-bench rooms 2>&1 | grep '^|' >> $R/recovery.txt
done
echo "== done $(date)"
