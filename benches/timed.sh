#!/usr/bin/env bash
# Time per request for in-process paths of `benches/layer.rs`, by wall clock, paired with the
# bare handler round by round: each path runs in the bench's counting mode (`LAYER_COUNT`)
# twice, N1 and N2 requests, and the difference of the two runs' times divided by N2-N1 is one
# request's time (start-up, set-up and prefill out). Each round times the bare handler and then
# every path, so a path's "added to bare" is read against the bare run of its own round, a few
# seconds apart; the table gives every round and the medians.
#
#   benches/timed.sh                         # bare_handler, passthrough_no_key, replay, replay_decoding
#   ROUNDS=9 benches/timed.sh replay first_request_fresh_key_full_store
#   BIN=/path/to/layer-bench benches/timed.sh replay    # a saved binary (A/B: run both)
#
# Why next to criterion: on this shared machine criterion's intervals move by half between runs
# of the same binary minutes apart (BENCHMARKS.md); the paired difference of long runs moves
# less. It is wall time of a current-thread runtime on one core, so it holds what instructions
# leave out (clock reads, atomics, cache misses). Targets are read from it, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=(${@:-passthrough_no_key replay replay_decoding})
N1=${N1:-20000}
N2=${N2:-420000}
ROUNDS=${ROUNDS:-5}
source benches/layer_bin.sh
# Nanoseconds one run of `path` with `n` requests takes.
run_ns() {
  local start end
  start=$(date +%s%N)
  LAYER_COUNT="$1:$2" "$BIN" >/dev/null 2>&1
  end=$(date +%s%N)
  echo $((end - start))
}
# A fresh key on a store that is not full must stay below its capacity (the bench's 64 MiB hold
# about 39,000 of its records): past it every request evicts, which is the full-store path.
per_request() {
  local n1=$N1 n2=$N2
  case "$1" in first_request_fresh_key | boxed_fresh) n1=${FRESH_N1:-2000} n2=${FRESH_N2:-32000} ;; esac
  echo $(( ($(run_ns "$1" "$n2") - $(run_ns "$1" "$n1")) / (n2 - n1) ))
}
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
for round in $(seq "$ROUNDS"); do
  for path in bare_handler "${PATHS[@]}"; do
    echo "$round $path $(per_request "$path")" | tee -a "$lines"
  done
done
python3 - "$lines" <<'PY'
import statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    r, path, ns = line.split()
    rows.setdefault(path, {})[int(r)] = int(ns)
bare = rows["bare_handler"]
print("| path | ns per request, by round | median | added to bare, by round | median |")
print("|---|---|---:|---|---:|")
for path, by_round in rows.items():
    rounds = sorted(by_round)
    added = [by_round[r] - bare[r] for r in rounds]
    print(f"| {path} | {', '.join(str(by_round[r]) for r in rounds)} | {st.median(by_round.values()):.0f} "
          f"| {', '.join(f'{a:+d}' for a in added)} | {st.median(added):+.0f} |")
PY
