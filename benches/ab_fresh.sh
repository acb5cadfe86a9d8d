#!/usr/bin/env bash
# Fresh keys on a Redis-protocol server, paired: two builds of the demo (A and B) on one server
# of this script's own, their `fresh` and `limit_fresh` scenarios alternated round by round
# (and which goes first, too), so that the machine's drift hits both alike. For an A/B of a
# store change that benches/http.sh, one demo at a time, cannot resolve. Prints each run, then
# medians, each round's ratio of fresh to the mean of that round's two limit runs, and B's
# fresh over A's.
#
#   A=/tmp/demo-before B=target/release/examples/demo_server benches/ab_fresh.sh
#   SERVER=redis-server ROUNDS=8 SECS=4 A=… B=… benches/ab_fresh.sh
#   STORE=memory SCENARIO=replay A=… B=… benches/ab_fresh.sh
#   STORE=memory A=demo B=demo PRELOAD_B=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 benches/ab_fresh.sh
#   SERVER=redis-server DURABLE=1 A=… B=… benches/ab_fresh.sh   # appendonly yes, appendfsync always
#
# SERVER: the server binary (default valkey-server, else redis-server), on PORT (6395).
# DURABLE=1: the server persists as a payment service runs it (`appendonly yes`, `appendfsync
# always`: every write synced before it is acknowledged); otherwise no persistence.
# STORE=memory: the demos on their own memory stores instead, their limit the bare route.
# SCENARIO: fresh (default) or replay, each paired with its limit.
# PRELOAD_A, PRELOAD_B: a library to LD_PRELOAD into that side's demo (another allocator: the
# same build on glibc's malloc and on jemalloc, Debian's `libjemalloc2`).
# CPU per request: the demo's and the server's (INFO cpu; 0 on memory), over each measured run.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${A:?A=path of the first demo build}" "${B:?B=path of the second demo build}"
PORT=${PORT:-6395}
ROUNDS=${ROUNDS:-8}
SECS=${SECS:-4}
SERVER=${SERVER:-$(command -v valkey-server || command -v redis-server || true)}
SCENARIO=${SCENARIO:-fresh}
MEMORY=$([ "${STORE:-}" = memory ] && echo 1 || echo "")
dir=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
store=memory
if [ -z "$MEMORY" ]; then
  persistence=(--appendonly no)
  [ -z "${DURABLE:-}" ] || persistence=(--appendonly yes --appendfsync always)
  "$SERVER" --port "$PORT" --bind 127.0.0.1 --save '' "${persistence[@]}" --daemonize yes --dir "$dir" \
    --logfile "$dir/server.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  store="redis://127.0.0.1:$PORT"
fi
export LIMIT_BARE=$MEMORY
declare -A base pid
for side in A B; do
  preload=PRELOAD_$side
  ${!preload:+env LD_PRELOAD=${!preload}} "${!side}" --addr 127.0.0.1:0 --store "$store" --no-recovery-points --limit-routes \
    >"$dir/$side.out" &
  pid[$side]=$!
  pids+=("$!")
done
for side in A B; do
  for _ in $(seq 100); do grep -q listening "$dir/$side.out" && break; sleep 0.1; done
  base[$side]=$(sed -n 's/^listening on //p' "$dir/$side.out")
  [ -n "${base[$side]}" ] || { echo "demo $side did not start" >&2; exit 1; }
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
server_cpu() { [ -z "$MEMORY" ] || { echo 0; return; }; redis-cli -p "$PORT" info cpu | awk -F: '/used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }
hz=$(getconf CLK_TCK)
echo "$([ -n "$MEMORY" ] && echo memory || "$SERVER" --version | cut -d' ' -f1-3)${DURABLE:+ (appendonly yes, appendfsync always)}, $SCENARIO; $ROUNDS rounds of ${SECS}s per run, wrk -t2 -c32"
lines=$(mktemp -p "$dir")
for round in $(seq "$ROUNDS"); do
  # Which build goes first alternates: a run just after another build's fresh keys runs
  # slower (about 5 % on identical builds), so a fixed order would favour one side.
  s=$SCENARIO
  order="A:$s B:$s B:limit_$s A:limit_$s"
  [ $((round % 2)) = 1 ] || order="B:$s A:$s A:limit_$s B:limit_$s"
  for run in $order; do
    side=${run%%:*} mode=${run#*:}
    RUN=$(date +%s%N) MODE=$mode wrk -t2 -c32 -d1s -s benches/http.lua "${base[$side]}" >/dev/null
    t0=$(ticks "${pid[$side]}") c0=$(server_cpu)
    result=$(RUN=$(date +%s%N) MODE=$mode wrk -t2 -c32 -d"${SECS}s" -s benches/http.lua "${base[$side]}" | grep '^RESULT')
    t1=$(ticks "${pid[$side]}") c1=$(server_cpu)
    read -r _ _ rps _ _ n _ <<<"$result"
    awk -v r="$round" -v s="$side" -v m="$mode" -v rps="$rps" -v n="$n" -v dt=$((t1 - t0)) -v hz="$hz" \
      -v c0="$c0" -v c1="$c1" 'BEGIN { printf "%d %s %s %d %.1f %.1f\n", r, s, m, rps, dt / hz / n * 1e6, (c1 - c0) / n * 1e6 }' |
      tee -a "$lines"
  done
done
python3 - "$lines" "$SCENARIO" <<'PY'
import statistics as st, sys
sc = sys.argv[2]
rows = {}
for line in open(sys.argv[1]):
    r, side, mode, rps, demo, server = line.split()
    rows.setdefault(int(r), {})[(side, mode)] = (int(rps), float(demo), float(server))
print("| run | requests/s (median; rounds) | demo CPU per request | server CPU per request |")
print("|---|---|---:|---:|")
for key in [("A", sc), ("B", sc), ("A", "limit_" + sc), ("B", "limit_" + sc)]:
    v = [rows[r][key] for r in sorted(rows)]
    print(f"| {key[0]} {key[1]} | {st.median(x[0] for x in v):,.0f} ({', '.join(str(x[0]) for x in v)}) "
          f"| {st.median(x[1] for x in v):.1f} µs | {st.median(x[2] for x in v):.1f} µs |")
for side in "AB":
    ratios = [rows[r][(side, sc)][0] / st.mean(rows[r][(s, "limit_" + sc)][0] for s in "AB") for r in sorted(rows)]
    print(f"{side} {sc} / limit, per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {st.median(ratios):.3f}")
ab = [rows[r][("B", sc)][0] / rows[r][("A", sc)][0] for r in sorted(rows)]
print(f"B {sc} / A {sc}, per round: {', '.join(f'{x:.2f}' for x in ab)}; median {st.median(ab):.3f}")
PY
