#!/usr/bin/env bash
# Instructions per request for each in-process path of `benches/layer.rs`, counted by
# cachegrind: deterministic, so an A/B of a small change shows on a noisy shared machine where
# criterion's intervals (±10 %) hide it. Each path runs twice (N1 and N2 requests, set-up
# alike); the difference divided by N2-N1 is what one request costs, set-up and start-up out.
#
#   benches/instructions.sh                 # every path, this checkout
#   BIN=/path/to/layer-bench benches/instructions.sh replay   # a saved binary, one path
#
#   CACHESIM=1 benches/instructions.sh first_request_fresh_key first_request_fresh_key_full_store
#                                           # also simulated D1 and last-level data misses
#   PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 benches/instructions.sh replay
#                                           # on another allocator (LD_PRELOAD), to tell what a
#                                           # change costs from where glibc happens to carve it
#
# Needs valgrind. Instructions are not time (a cache miss costs no instruction, `rep movsb`
# counts per byte moved): read them next to the criterion figures, not instead of them.
# CACHESIM=1 has cachegrind simulate this machine's caches (as it reads them), which shows
# what a path costs in misses, the part of its time that instructions leave out.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=("${@:-bare_handler passthrough_no_key replay replay_decoding first_request_fresh_key}")
N1=${N1:-2000}
N2=${N2:-12000}
source benches/layer_bin.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sim=no
[[ -n "${CACHESIM:-}" ]] && sim=yes
# Prints "instructions D1-misses LLd-misses" (misses 0 without CACHESIM).
irs() {
  LAYER_COUNT="$1:$2" ${PRELOAD:+env LD_PRELOAD=$PRELOAD} valgrind --tool=cachegrind --cache-sim=$sim --cachegrind-out-file="$tmp/out" \
    "$BIN" 2>&1 | awk '
      { for (i = 1; i <= NF; i++) gsub(",", "", $i) }
      /I *refs:/ { ir = $4 } /D1 *misses:/ { d1 = $4 } /LLd *misses:/ { ll = $4 }
      END { print ir, d1 + 0, ll + 0 }'
}
bare=""
for path in ${PATHS[@]}; do
  read -r a ad1 all < <(irs "$path" "$N1")
  read -r b bd1 bll < <(irs "$path" "$N2")
  per=$(( (b - a) / (N2 - N1) ))
  if [[ $sim == yes ]]; then
    awk -v p="$path" -v d="$((bd1 - ad1))" -v l="$((bll - all))" -v n="$((N2 - N1))" \
      'BEGIN { printf "%-26s %8.1f D1 misses/request, %6.1f last-level data misses/request\n", p, d / n, l / n }' 
  fi
  [[ "$path" == bare_handler ]] && bare=$per
  if [[ -n "$bare" && "$path" != bare_handler ]]; then
    printf '%-26s %8d instructions/request (+%d over bare)\n' "$path" "$per" $((per - bare))
  else
    printf '%-26s %8d instructions/request\n' "$path" "$per"
  fi
done
