#!/usr/bin/env bash
# This crate's in-process paths beside the same paths through the `idempotent` crate 2.0's
# layer (issue 24's peer; `benches/peer/`), over the same handler and requests, each paired with
# its own binary's bare handler in the same round: wall time by `benches/timed.sh`, or
# instructions by `benches/instructions.sh` (MODE=instructions). The two binaries alternate
# which goes first, round by round.
#
#   benches/peer.sh                              # passthrough_no_key replay first_request_fresh_key, 5 rounds
#   ROUNDS=9 benches/peer.sh replay
#   MODE=instructions benches/peer.sh replay first_request_fresh_key
#
# The peer declares Rust 1.98 and builds on older toolchains with `--ignore-rust-version`. Its
# memory store is unbounded (a map in a task of its own), so its fresh keys never evict: read
# them against this crate's `first_request_fresh_key` (a store that is not full), not the
# full-store path.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=(${@:-passthrough_no_key replay first_request_fresh_key})
ROUNDS=${ROUNDS:-5}
MODE=${MODE:-timed}
source benches/layer_bin.sh
LAYER=$BIN
(cd benches/peer && cargo build -q --release --ignore-rust-version)
PEER=${CARGO_TARGET_DIR:-$PWD/benches/peer/target}/release/tower-idempotency-peer-bench
if [[ $MODE == instructions ]]; then
  for who in layer peer; do
    echo "== $who"
    BIN=$([[ $who == layer ]] && echo "$LAYER" || echo "$PEER") benches/instructions.sh bare_handler "${PATHS[@]}"
  done
  exit 0
fi
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
for round in $(seq "$ROUNDS"); do
  order=(layer peer)
  (( round % 2 == 0 )) && order=(peer layer)
  for who in "${order[@]}"; do
    bin=$([[ $who == layer ]] && echo "$LAYER" || echo "$PEER")
    ROUNDS=1 BIN=$bin benches/timed.sh "${PATHS[@]}" | awk -v w="$who" -v r="$round" '/^1 / { print w, r, $2, $3 }' | tee -a "$lines"
  done
done
python3 - "$lines" <<'PY'
import statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    who, r, path, ns = line.split()
    rows.setdefault((who, path), {})[int(r)] = int(ns)
print("| crate | path | added to its bare handler, ns, by round | median |")
print("|---|---|---|---:|")
for (who, path), by_round in sorted(rows.items()):
    if path == "bare_handler":
        continue
    bare = rows[(who, "bare_handler")]
    added = [by_round[r] - bare[r] for r in sorted(by_round)]
    print(f"| {who} | {path} | {', '.join(f'{a:+d}' for a in added)} | {st.median(added):+.0f} |")
PY
