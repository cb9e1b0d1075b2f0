#!/bin/bash
# Quiet rerun of the recovery bench: base and new alternated, rooms only.
cd /work/main
for v in base new new base base new; do
  echo "== $v"
  TEST_SERVER_BIN=/tmp/ab/$v-session-server /tmp/ab/recovery-bench rooms 2>&1 | grep '^|'
done
