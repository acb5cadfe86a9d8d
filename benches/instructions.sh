#!/usr/bin/env bash
# Instructions per request for each in-process path of `benches/layer.rs`, counted by
# cachegrind: deterministic, so an A/B of a small change shows on a noisy shared machine where
# criterion's intervals (±10 %) hide it. Each path runs twice (N1 and N2 requests, set-up
# alike); the difference divided by N2-N1 is what one request costs, set-up and start-up out.
#
#   benches/instructions.sh                 # every path, this checkout
#   BIN=/path/to/layer-bench benches/instructions.sh replay   # a saved binary, one path
#
# Needs valgrind. Instructions are not time (a cache miss costs no instruction, `rep movsb`
# counts per byte moved): read them next to the criterion figures, not instead of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=("${@:-bare_handler passthrough_no_key replay replay_kept_decoded first_request_fresh_key}")
N1=${N1:-2000}
N2=${N2:-12000}
if [[ -z "${BIN:-}" ]]; then
  BIN=$(cargo bench --bench layer --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("target",{}).get("name")=="layer" and m.get("executable"): print(m["executable"])')
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
irs() {
  LAYER_COUNT="$1:$2" valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$tmp/out" \
    "$BIN" 2>&1 | awk '/I *refs:/ { gsub(",", "", $4); print $4 }'
}
bare=""
for path in ${PATHS[@]}; do
  a=$(irs "$path" "$N1")
  b=$(irs "$path" "$N2")
  per=$(( (b - a) / (N2 - N1) ))
  [[ "$path" == bare_handler ]] && bare=$per
  if [[ -n "$bare" && "$path" != bare_handler ]]; then
    printf '%-26s %8d instructions/request (+%d over bare)\n' "$path" "$per" $((per - bare))
  else
    printf '%-26s %8d instructions/request\n' "$path" "$per"
  fi
done
