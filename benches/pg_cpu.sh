#!/usr/bin/env bash
# Where a PostgreSQL fresh key's cost goes: `fresh` and `limit_fresh` (see http.sh) alternated,
# 4 s each, twice, with the CPU the demo and every `postgres` process spent per request (from
# /proc), and the WAL each request wrote (pg_current_wal_lsn, pg_stat_wal). Run on the machine
# that runs the server, as a user who can read its processes' /proc entries.
#   STORE=postgres://postgres@127.0.0.1:5440/postgres benches/pg_cpu.sh
# DEMO=path runs another build of the demo; MODES overrides the scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${STORE:?set STORE=postgres://…}"
if [ -z "${DEMO:-}" ]; then
  cargo build -q --release --example demo_server
  DEMO=target/release/examples/demo_server
fi
out=$(mktemp)
"$DEMO" --addr 127.0.0.1:0 --store "$STORE" --no-recovery-points --limit-routes >"$out" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
base=$(sed -n 's/^listening on //p' "$out")
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() { local t=0; for p in $(pgrep -u postgres); do t=$((t + $(ticks "$p"))); done; echo $t; }
sql() { psql "$STORE" -Atc "$1"; }
for round in 1 2; do
  for mode in ${MODES:-fresh limit_fresh}; do
    p0=$(pg_ticks); d0=$(ticks "$server")
    l0=$(sql 'select pg_current_wal_lsn()'); w0=$(sql 'select wal_records, wal_sync from pg_stat_wal')
    line=$(RUN=$(date +%s%N) MODE=$mode wrk -t2 -c32 -d4s -s benches/http.lua "$base" | grep RESULT)
    p1=$(pg_ticks); d1=$(ticks "$server")
    l1=$(sql 'select pg_current_wal_lsn()'); w1=$(sql 'select wal_records, wal_sync from pg_stat_wal')
    n=$(echo "$line" | awk '{print $6}')
    python3 - "$mode" "$line" "$n" "$hz" "$p0" "$p1" "$d0" "$d1" "$(sql "select pg_wal_lsn_diff('$l1','$l0')")" "$w0" "$w1" <<'PY'
import sys
mode, line, n, hz, p0, p1, d0, d1, wal, w0, w1 = sys.argv[1:]
n, hz = int(n), int(hz)
(r0, s0), (r1, s1) = (map(int, w.split("|")) for w in (w0, w1))
us = lambda a, b: (int(b) - int(a)) / hz / n * 1e6
print(f"{mode}: {line.split()[2]} requests/s; per request: PostgreSQL CPU {us(p0, p1):.0f} µs, "
      f"demo CPU {us(d0, d1):.0f} µs, WAL {float(wal) / n:.0f} B in {(r1 - r0) / n:.1f} records, "
      f"{(s1 - s0) / n:.2f} WAL syncs")
PY
  done
done
