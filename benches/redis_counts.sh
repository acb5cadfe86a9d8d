#!/usr/bin/env bash
# What a fresh key costs a Redis-protocol server, deterministically: N fresh keys sent one after
# another (one connection, so nothing is batched) to the demo's keyed route and to its limit
# route (`/limit/fresh/payments`: the claim's `SET NX PX` and the record's `SET PX`, nothing
# else), each build given, on one server of this script's own. Per request: the commands the
# server ran (`INFO commandstats`, which counts a script's `EVALSHA` and each command it runs),
# its reads of client input (about one per round trip, sequential requests), its fsyncs and
# AOF bytes (with DURABLE=1), and its network input bytes (`INFO stats`). The syscalls are
# counted with `strace -c` on the server, which slows it: these are counts, not timings.
# INSTR=1 runs the server under callgrind instead (`--hz 1`, so that its timer adds little) and
# adds the instructions it ran per request (zeroed and dumped with `callgrind_control` around
# each route's requests), in place of the syscall counts.
#
#   DEMOS="/tmp/demo-before target/release/examples/demo_server" benches/redis_counts.sh
#   SERVER=redis-server DURABLE=1 N=500 DEMOS=… benches/redis_counts.sh
#
# SERVER: the server binary (default redis-server), on PORT (6396). DURABLE=1: `appendonly
# yes`, `appendfsync always`. DEMOS: the demo builds, each run against the same server.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DEMOS:?DEMOS=the demo builds to count, separated by spaces}"
PORT=${PORT:-6396}
N=${N:-300}
SERVER=${SERVER:-redis-server}
dir=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
persistence=(--appendonly no)
[ -z "${DURABLE:-}" ] || persistence=(--appendonly yes --appendfsync always)
if [ -n "${INSTR:-}" ]; then
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$SERVER" --port "$PORT" \
    --bind 127.0.0.1 --save '' "${persistence[@]}" --hz 1 --dir "$dir" >"$dir/server.log" 2>&1 &
  pids+=("$!")
else
  "$SERVER" --port "$PORT" --bind 127.0.0.1 --save '' "${persistence[@]}" --daemonize yes \
    --dir "$dir" --logfile "$dir/server.log" >/dev/null
fi
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done
server=$(redis-cli -p "$PORT" info server | tr -d '\r' | sed -n 's/^process_id://p')
echo "$("$SERVER" --version | cut -d' ' -f1-3)${DURABLE:+ (appendonly yes, appendfsync always)}; $N fresh keys, one after another, per route"
counted=("server reads" fsyncs)
[ -z "${INSTR:-}" ] || counted=("server instructions" "")
echo "| demo | route | commands per request | ${counted[0]} | ${counted[1]:-} | AOF bytes | net input bytes |"
echo "|---|---|---|---:|---:|---:|---:|"
info() { redis-cli -p "$PORT" info "$1" | tr -d '\r'; }
field() { info "$1" | sed -n "s/^$2://p"; }
for demo in $DEMOS; do
  "$demo" --addr 127.0.0.1:0 --store "redis://127.0.0.1:$PORT" --no-recovery-points --limit-routes \
    >"$dir/demo.out" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q listening "$dir/demo.out" && break; sleep 0.1; done
  base=$(sed -n 's/^listening on //p' "$dir/demo.out")
  for route in /payments /limit/fresh/payments; do
    # Once unmeasured: the first completion learns whether `SET … IFEQ` is taken, the
    # scripts load.
    python3 benches/sequential_keys.py "$base$route" 3 "warm-$pid-$route" >/dev/null
    redis-cli -p "$PORT" config resetstat >/dev/null
    aof0=$(field persistence aof_current_size) in0=$(field stats total_net_input_bytes)
    if [ -n "${INSTR:-}" ]; then
      callgrind_control -z "$server" >/dev/null 2>&1
      python3 benches/sequential_keys.py "$base$route" "$N" "key-$pid-$route"
      callgrind_control -d "$server" >/dev/null 2>&1
      # shellcheck disable=SC2012
      instructions=$(sed -n 's/^summary: //p' "$(ls -t "$dir"/cg.out.* | head -1)")
    else
      strace -f -c -e trace=read,fdatasync,fsync -o "$dir/strace" -p "$server" 2>/dev/null &
      tracer=$!
      sleep 0.5
      python3 benches/sequential_keys.py "$base$route" "$N" "key-$pid-$route"
      sleep 0.2
      kill -INT "$tracer"
      wait "$tracer" || true
    fi
    aof1=$(field persistence aof_current_size) in1=$(field stats total_net_input_bytes)
    commands=$(info commandstats | python3 -c '
import sys
n = int(sys.argv[1])
calls = {}
for line in sys.stdin:
    if line.startswith("cmdstat_"):
        name, fields = line[8:].strip().split(":", 1)
        if name.split("|")[0] in ("info", "config", "client", "hello"):
            continue
        calls[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
total = sum(calls.values()) / n
print(f"{total:.2f}: " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(calls.items())))
' "$N")
    syscall() { awk -v s="$1" '$NF == s { n = $4 } END { print n + 0 }' "$dir/strace" 2>/dev/null || echo 0; }
    if [ -n "${INSTR:-}" ]; then
      first=$(awk -v i="$instructions" -v n="$N" 'BEGIN { printf "%.0f", i / n }') second=""
    else
      first=$(awk -v r="$(syscall read)" -v n="$N" 'BEGIN { printf "%.2f", r / n }')
      second=$(awk -v f="$(($(syscall fdatasync) + $(syscall fsync)))" -v n="$N" 'BEGIN { printf "%.2f", f / n }')
    fi
    awk -v d="$(basename "$demo")" -v r="$route" -v c="$commands" -v n="$N" -v first="$first" \
      -v second="$second" -v aof=$(( ${aof1:-0} - ${aof0:-0} )) -v input=$((in1 - in0)) \
      'BEGIN { printf "| %s | %s | %s | %s | %s | %.0f | %.0f |\n", d, r, c, first, second, aof / n, input / n }'
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
