#!/usr/bin/env bash
# Load over loopback: the demo server in release mode, driven by wrk, in one run:
#   bare     POST /bare/payments   the same handler and auth, without the layer
#   keyless  POST /payments        through the layer, no Idempotency-Key (passthrough)
#   fresh    POST /payments        a new key on every request (claim, run, store)
#   replay   POST /payments        the same key on every request (replays)
# and, on a store with round trips (STORE=redis://, postgres://, sqlite://), the store's limit:
#   limit_fresh   POST /limit/fresh/payments    the handler plus one claim write and one
#                                               completion write, raw (the demo's limit.rs)
#   limit_replay  POST /limit/replay/payments   one raw read of the stored bytes
# On the memory store (no round trip) the limit routes are the bare route sent the same requests
# as fresh and replay, key header included: what the load generator's own work costs.
# The layer's fresh and replay are reported as ratios of the bare route and of their limit.
# Prints requests/s, p50 and p99 latency per scenario and the ratio to the bare route, the CPU
# time the demo and wrk spent per request, and the store calls per request (shared stores).
# The memory store is filled to capacity first (every measured fresh request evicts).
# The scenarios run in turn, ROUNDS times (default 3), in a different order each round, so that
# drift of a shared machine, and what ran just before, hit them all alike; the table gives the
# median of the rounds. Each layered scenario runs next to its reference (fresh beside
# limit_fresh, replay beside limit_replay, keyless beside bare; which of the two goes first
# alternates by round), and the table also gives the ratio of each such pair, round by round
# (median, lowest and highest): two runs a few seconds apart share the machine's state, which
# the rounds' spread on a shared machine (often a third) does not cancel.
# Usage: benches/http.sh [seconds-per-scenario-per-round=5] [connections=32]
# STORE=redis://…, postgres://… or sqlite://PATH[?synchronous=full] runs the demo on that store
# (default: the memory store; give SQLite a fresh file);
# FILL=seconds of fresh keys that fill the memory store first (default 4); THREADS=wrk threads
# (default 2); DEMO=path runs another build of the demo (for before/after figures); POINTS=1
# keeps the demo's recovery points on (a point load and save per fresh request).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
CONNS=${2:-32}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}

if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq wrk >/dev/null; else sudo apt-get install -y -qq wrk >/dev/null; fi
fi

# DEMO=path runs another build of the demo (for before/after figures); default: this tree's.
if [ -z "${DEMO:-}" ]; then
  cargo build -q --release --example demo_server
  DEMO=target/release/examples/demo_server
fi
out=$(mktemp)
# The demo's handler saves a recovery point after its simulated charge (a load and a save per
# fresh request); the comparisons measure the layer, so that is off unless POINTS=1.
points_flag=--no-recovery-points
[ "${POINTS:-0}" = 1 ] && points_flag=
limit_flag=
case "${STORE:-}" in redis://*|postgres://*|postgresql://*|sqlite://*) limit_flag=--limit-routes ;; esac
"$DEMO" --addr 127.0.0.1:0 ${STORE:+--store "$STORE"} $points_flag $limit_flag >"$out" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
base=$(sed -n 's/^listening on //p' "$out")
[ -n "$base" ] || { echo "demo did not start" >&2; exit 1; }

# Prime the replayed key (and the limit route's).
for path in /payments ${limit_flag:+/limit/replay/payments}; do
  curl -s -o /dev/null -X POST "$base$path" -H 'Authorization: Bearer bench' \
    -H 'Content-Type: application/json' -H 'Idempotency-Key: replayed-key' -d '{"amount":1000,"currency":"usd"}'
done
modes="bare keyless fresh replay"
[ -z "$limit_flag" ] || modes="$modes limit_fresh limit_replay"
if [ -z "${STORE:-}" ]; then modes="$modes limit_fresh limit_replay"; export LIMIT_BARE=1; fi

# The memory store at capacity: FILL seconds (default 4) of fresh keys, several times what its
# 64 MiB hold (the demo's records are ~1 KiB as charged, so ~65,000), so that every measured
# fresh request evicts a record, as it would in production. Shared stores have no capacity to reach.
fill=""
if [ -z "${STORE:-}" ]; then
  RUN=fill-$(date +%s%N) MODE=fresh wrk -t"$THREADS" -c"$CONNS" -d"${FILL:-4}s" -s benches/http.lua "$base" >/dev/null
  fill=$(curl -s "$base/stats")
  echo "filled the store: $fill" >&2
fi

# CPU time of a process so far, in clock ticks (user + system).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# Store calls so far: Redis commands (INFO commandstats, which also counts the commands a script
# runs), or PostgreSQL transactions of the database (each store statement is its own).
store_calls() {
  case "${STORE:-}" in
    redis://*) redis-cli -u "$STORE" info commandstats | python3 -c '
import sys
print(sum(int(part.split("=")[1]) for line in sys.stdin if line.startswith("cmdstat_")
          and not line.startswith(("cmdstat_info", "cmdstat_subscribe", "cmdstat_config"))
          for part in line.split(":")[1].split(",") if part.startswith("calls=")))' ;;
    postgres://*|postgresql://*) psql "$STORE" -Atc "select xact_commit + xact_rollback from pg_stat_database where datname = current_database()" ;;
    *) echo 0 ;;
  esac
}

results=()
run() {
  # 1 s of warm-up, then the measured run.
  RUN=$(date +%s%N) MODE=$1 wrk -t"$THREADS" -c"$CONNS" -d1s -s benches/http.lua "$base" >/dev/null
  local line server0 calls0 wrk_cpu
  server0=$(ticks "$server"); calls0=$(store_calls)
  line=$( { TIMEFORMAT='%U %S'; time RUN=$(date +%s%N) MODE=$1 wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -s benches/http.lua "$base" | grep '^RESULT'; } 2>"$cpu")
  wrk_cpu=$(awk '{print $1 + $2}' "$cpu")
  line="$line $(( $(ticks "$server") - server0 )) $wrk_cpu $(( $(store_calls) - calls0 )) $round"
  results+=("$line")
  echo "round $round: $line" >&2
}
cpu=$(mktemp)
trap 'kill $server 2>/dev/null; rm -f "$out" "$cpu"' EXIT
# Pairs: a layered scenario and its reference, run back to back. The first round runs the
# pairs in the order below; every later one in a shuffled order (seeded by the round, so
# reproducible), so that no pair always follows the same one: a run just after fresh keys is
# slower (benches/ab_fresh.sh measured about 5 %).
case " $modes " in
  *" limit_fresh "*) pairs="fresh:limit_fresh replay:limit_replay keyless:bare" ;;
  *) pairs="keyless:bare fresh replay" ;;
esac
for round in $(seq "$ROUNDS"); do
  order=$pairs
  [ "$round" = 1 ] || order=$(printf '%s\n' $pairs | shuf --random-source=<(yes "$round"))
  for pair in $order; do
    first=${pair%%:*} second=${pair#*:}
    [ "$round" = 1 ] || (( round % 2 )) || { first=${pair#*:} second=${pair%%:*}; }
    run "$first"
    [ "$second" = "$first" ] || run "$second"
  done
done
stats=$(curl -s "$base/stats")

echo
echo "wrk -t$THREADS -c$CONNS; $ROUNDS rounds of ${SECS}s per scenario (after 1s of warm-up each), scenarios interleaved;"
echo "$(nproc) cores shared by wrk and the server${STORE:+ and the store}; store ${STORE:-memory}; demo $stats"
[ -z "$fill" ] || echo "the memory store was filled first (fresh keys until $fill; it holds ~65,000), so every fresh request evicts"
echo "CPU per request: the demo's (user + system, from /proc) and wrk's, over the measured runs."
case "${STORE:-}" in
  redis://*) echo "Store calls: Redis commands per request (INFO commandstats; a script counts once plus the commands it runs)." ;;
  postgres*) echo "Store calls: PostgreSQL transactions per request (pg_stat_database; each store statement is one; the statistics lag by up to a second)." ;;
  sqlite*) echo "Store calls: not counted (SQLite runs in the demo's process; its CPU is in the demo's)." ;;
  *) echo "Store calls: none (the memory store is in process)." ;;
esac
echo
printf '%s\n' "${results[@]}" | HZ=$hz python3 -c '
import os, statistics, sys
hz = int(os.environ["HZ"])
rows = {}
for line in sys.stdin:
    _, mode, rps, p50, p99, total, errors, server, wrk, calls, round_ = line.split()
    n = int(total)
    rows.setdefault(mode, []).append((float(rps), float(p50), float(p99), int(errors),
        int(server) / hz / n * 1e6, float(wrk) / n * 1e6, int(calls) / n, int(round_)))
rps = lambda mode: statistics.median(r[0] for r in rows[mode])
bare = rps("bare")
# The ratio of a scenario to its reference run beside it, round by round.
def paired(mode, reference):
    if reference not in rows:
        return "–"
    ref = {x[7]: x[0] for x in rows[reference]}
    ratios = sorted(x[0] / ref[x[7]] for x in rows[mode] if x[7] in ref)
    if not ratios:
        return "–"
    return f"**{statistics.median(ratios):.3f}** ({ratios[0]:.3f}–{ratios[-1]:.3f})"
print("| scenario | requests/s (median) | ratio to bare | ratio to the limit | paired with its reference: median (range) | p50 | p99 | rounds (requests/s) | demo CPU per request | wrk CPU per request | store calls per request | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
for mode in ["bare", "keyless", "fresh", "replay", "limit_fresh", "limit_replay"]:
    if mode not in rows:
        continue
    r = rows[mode]
    med = lambda i: statistics.median(x[i] for x in r)
    each = ", ".join(f"{x[0]:.0f}" for x in r)
    limit = f"limit_{mode}" if f"limit_{mode}" in rows else None
    to_limit = f"{med(0) / rps(limit):.3f}" if limit else "–"
    reference = limit or ("bare" if mode == "keyless" else None)
    pair = paired(mode, reference) if reference else "–"
    print(f"| {mode} | {med(0):.0f} | {med(0) / bare:.3f} | {to_limit} | {pair} | {med(1):.0f} µs | {med(2):.0f} µs | {each} | {med(4):.1f} µs | {med(5):.1f} µs | {med(6):.2f} | {sum(x[3] for x in r)} |")
'
