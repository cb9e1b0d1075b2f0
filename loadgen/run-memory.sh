#!/usr/bin/env bash
# Resident memory of full rooms (BENCHMARKS.md, "Memory per room"): one fresh
# server per run (embedded store in a new data dir, 2 workers), one `loadgen
# memory` run against it, then the server is stopped by its pid.
#
#   loadgen/run-memory.sh NAME [loadgen memory flags…]
#
# e.g. loadgen/run-memory.sh full-2 --rooms 1 --members 2 --shapes 1000 --newlines 2000
# Prints `NAME <json>`. With TRIM=1 it then asks each process (supervisor and
# workers) for glibc's malloc_stats and calls malloc_trim(0) in it through gdb,
# printing `NAME trim pid=… in_use_kib=… system_kib=… rss_before=… rss_after=…`
# per process: what the allocator holds for live blocks against what it keeps. Needs target/release/{session-server,loadgen}
# (CARGO_TARGET_DIR overrides target/).
set -euo pipefail
name=$1
shift
target=${CARGO_TARGET_DIR:-target}/release
port=${PORT:-$((18950 + RANDOM % 40))}
data=$(mktemp -d /tmp/mem-data-XXXXXX)
export JWT_SECRET=memory-secret-0123456789abcdef
export ADMIN_TOKEN=memory-admin-0123456789abcdef
RUST_LOG=warn "$target/session-server" --port "$port" --bind 127.0.0.1 \
  --data-dir "$data" --workers 2 >"$data/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
result=$("$target/loadgen" memory --url "ws://127.0.0.1:$port" --server-pid "$server" "$@")
echo "$name $result"
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
if [[ ${TRIM:-0} == 1 ]]; then
  for pid in $server $(cat /proc/"$server"/task/*/children); do
    before=$(rss "$pid")
    gdb -q -batch -p "$pid" -ex 'call (void)malloc_stats()' -ex 'call (int)malloc_trim(0)' >/dev/null 2>&1 || true
    sleep 0.2
    # malloc_stats writes to the process's stderr (the server log): its last
    # "Total (incl. mmap)" block is this call's.
    total=$(grep -A2 'Total (incl. mmap)' "$data/server.log" | tail -2 | awk '{print $NF}' | paste -sd' ')
    echo "$name trim pid=$pid system_bytes,in_use_bytes=${total// /,} rss_before_kib=$before rss_after_kib=$(rss "$pid")"
    # Where the rest lives: the mappings holding most of it (KiB, name).
    top=$(awk '/^[0-9a-f]+-[0-9a-f]+ / {m=$1" "$6} /^Rss:/ {print $2, m}' "/proc/$pid/smaps" |
      sort -rn | head -4 | awk '{printf "%s:%s%s ", $1, $2, ($3 == "" ? "" : "(" $3 ")")}')
    echo "$name mappings pid=$pid $top"
  done
fi
