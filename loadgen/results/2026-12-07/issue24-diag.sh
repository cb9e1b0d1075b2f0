#!/usr/bin/env bash
# Used for issue 24 attribution runs (BENCHMARKS.md): binaries were copies in /tmp/issue24-bins (head-server = a76f977, base-server = 618b0a3, loadgen = a76f977); output lines are in issue24-diag-budget.jsonl
# usage: diag.sh LABEL BINARY "server flags" "loadgen flags" SECS
set -euo pipefail
LABEL=$1; BIN=$2; SFLAGS=$3; LFLAGS=$4; SECS=${5:-8}
SECRET=loadgen-secret-0123456789
D=$(mktemp -d)
JWT_SECRET=$SECRET RUST_LOG=warn taskset -c 1 $BIN --port 18901 --bind 127.0.0.1 --internal-port 18902 \
  --workers 1 --data-dir "$D/data" --rate-limit-per-sec 100000 --rate-limit-burst 100000 $SFLAGS >"$D/server.log" 2>&1 &
PID=$!
sleep 1
JWT_SECRET=$SECRET taskset -c 0 /tmp/issue24-bins/loadgen fanout --url ws://127.0.0.1:18901 --seconds $SECS --server-pid $PID $LFLAGS > "$D/r.json"
M=$(curl -s http://127.0.0.1:18902/metrics | grep -E '^session_server_(fanout_latency_seconds_bucket|snapshots_sent|snapshots_skipped|snapshots_compressed|messages_compressed|compressed_bytes|cursor_moves_folded|ops_sent|ops_bytes|snapshot_bytes|frames_in)' | tr '\n' ' ')
kill $PID; wait $PID 2>/dev/null || true
python3 - "$D/r.json" "$LABEL" "$SFLAGS" "$LFLAGS" "$M" <<'PY'
import json,sys
r=json.loads(open(sys.argv[1]).read())
print(json.dumps({"label":sys.argv[2],"server_flags":sys.argv[3],"loadgen_flags":sys.argv[4],"metrics":sys.argv[5],"r":r}))
PY
rm -rf "$D"
