#!/usr/bin/env bash
# Atomic read-modify-writes per request for one in-process path of `benches/layer.rs`: the
# `lock`-prefixed instructions (and `xchg` with memory) that `objdump` finds in the bench's
# binary, counted by callgrind at two request counts (N1, N2) and divided by the difference,
# like benches/instructions.sh, then listed by the function that executes them. An uncontended
# atomic costs 2–5 ns here, far more than the one instruction cachegrind counts for it.
#
#   benches/atomics.sh replay
#   BIN=/path/to/layer-bench benches/atomics.sh first_request_fresh_key
#
# Needs valgrind and objdump. Counts the bench binary's own code (the library, moka, bytes,
# tokio …), not glibc's.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH_NAME=${1:?a path of benches/layer.rs, e.g. replay}
N1=${N1:-2000}
N2=${N2:-12000}
source benches/layer_bin.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
objdump -d --no-show-raw-insn "$BIN" |
  awk '/^ +[0-9a-f]+:\t(lock |xchg .*\(%)/ { sub(":", "", $1); print $1 }' >"$tmp/locks"
for n in "$N1" "$N2"; do
  LAYER_COUNT="$PATH_NAME:$n" valgrind --tool=callgrind --dump-instr=yes --compress-pos=no \
    --compress-strings=no --callgrind-out-file="$tmp/out.$n" "$BIN" >/dev/null 2>&1
done
python3 - "$tmp/locks" "$tmp/out.$N1" "$tmp/out.$N2" "$((N2 - N1))" "$BIN" <<'PY'
import collections, sys
locks = {int(a, 16) for a in open(sys.argv[1])}
binary = sys.argv[5]
def count(path):
    # callgrind's format: `ob=`/`fn=` name the object and function of the cost lines after
    # them ("0xADDR LINE COUNT"); the line after `calls=` is a call's inclusive cost, skipped.
    ob = fn = None
    skip = False
    by_fn = collections.Counter()
    for line in open(path):
        if line.startswith("ob="):
            ob = line[3:].strip()
        elif line.startswith("fn="):
            fn = line[3:].strip()
        elif line.startswith("calls="):
            skip = True
        elif line.startswith("0x"):
            if skip:
                skip = False
                continue
            addr, _line, cost = (line.split() + ["0"])[:3]
            # A PIE binary: valgrind reports its addresses as objdump does (file-relative).
            if ob == binary and int(addr, 16) in locks:
                by_fn[fn] += int(cost)
    return by_fn
a, b, n = count(sys.argv[2]), count(sys.argv[3]), int(sys.argv[4])
rows = sorted(((b[k] - a[k]) / n, k) for k in set(a) | set(b))
print(f"{sum(v for v, _ in rows):.1f} atomic read-modify-writes per request")
for v, k in reversed(rows):
    if v >= 0.05:
        print(f"{v:6.2f}  {k[:140]}")
PY
