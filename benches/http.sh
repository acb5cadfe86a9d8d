#!/usr/bin/env bash
# Load over loopback: the demo server in release mode, driven by wrk, in one run:
#   bare     POST /bare/payments   the same handler and auth, without the layer
#   keyless  POST /payments        through the layer, no Idempotency-Key (passthrough)
#   fresh    POST /payments        a new key on every request (claim, run, store)
#   replay   POST /payments        the same key on every request (replays)
# Prints requests/s, p50 and p99 latency per scenario and the ratio to the bare route.
# Usage: benches/http.sh [seconds-per-scenario=10] [connections=32]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONNS=${2:-32}
THREADS=${THREADS:-2}

if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq wrk >/dev/null; else sudo apt-get install -y -qq wrk >/dev/null; fi
fi

cargo build -q --release --example demo_server
out=$(mktemp)
target/release/examples/demo_server --addr 127.0.0.1:0 >"$out" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
base=$(sed -n 's/^listening on //p' "$out")
[ -n "$base" ] || { echo "demo did not start" >&2; exit 1; }

# Prime the replayed key.
curl -s -o /dev/null -X POST "$base/payments" -H 'Authorization: Bearer bench' \
  -H 'Content-Type: application/json' -H 'Idempotency-Key: replayed-key' -d '{"amount":1000,"currency":"usd"}'

results=()
run() {
  # 2 s of warm-up, then the measured run.
  MODE=$1 wrk -t"$THREADS" -c"$CONNS" -d2s -s benches/http.lua "$base" >/dev/null
  local line
  line=$(MODE=$1 wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -s benches/http.lua "$base" | grep '^RESULT')
  results+=("$line")
  echo "$line" >&2
}
# The bare route runs first and last: the two runs bound the drift of the machine over the run,
# and the ratios use their mean.
for mode in bare keyless fresh replay bare; do run "$mode"; done
stats=$(curl -s "$base/stats")

echo
echo "wrk -t$THREADS -c$CONNS, ${SECS}s per scenario after 2s of warm-up; $(nproc) cores; demo $stats"
echo
echo "| scenario | requests/s | ratio to bare | p50 | p99 | errors |"
echo "|---|---:|---:|---:|---:|---:|"
bare_rps=$(printf '%s\n' "${results[0]}" "${results[4]}" | awk '{s += $3} END {print s / 2}')
for line in "${results[@]}"; do
  printf '%s\n' "$line" | awk -v bare="$bare_rps" '{
    printf "| %s | %d | %.3f | %.0f µs | %.0f µs | %d |\n", $2, $3, $3 / bare, $4, $5, $7 }'
done
echo
echo "Ratios are to the mean of the two bare runs ($bare_rps requests/s)."
