#!/usr/bin/env bash
# Streamed answers over loopback (benches/stream.py): the demo in release mode on one store,
# time to first byte and throughput of keyless, original, replayed and joined streams; on a
# shared store, a second demo for duplicates that join from another instance ("remote").
#   benches/stream.sh                        # the memory store
#   STORE=redis://127.0.0.1:6390 benches/stream.sh
#   benches/http_all.sh with SCRIPT=benches/stream.sh runs it on every store, servers included.
# ROUNDS, JOINERS, TOKENS_PACED, INTERVAL_MS, TOKENS_BULK: see benches/stream.py. DEMO=path runs
# another build of the demo. The demo runs with `--on-conflict join` when it takes it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${DEMO:-}" ]; then
  cargo build -q --release --example demo_server
  DEMO=target/release/examples/demo_server
fi
out=$(mktemp)
join_flag=()
if "$DEMO" --help 2>&1 | grep -q 'join'; then join_flag=(--on-conflict join); export JOIN=1; fi
"$DEMO" --addr 127.0.0.1:0 ${STORE:+--store "$STORE"} --no-recovery-points "${join_flag[@]}" >"$out" &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
base=$(sed -n 's/^listening on //p' "$out")
[ -n "$base" ] || { echo "demo did not start" >&2; cat "$out" >&2; exit 1; }
other=
if [ -n "${STORE:-}" ]; then
  # A second instance on the same store: duplicates sent to it follow the stream through the store.
  out2=$(mktemp)
  "$DEMO" --addr 127.0.0.1:0 --store "$STORE" --no-recovery-points "${join_flag[@]}" >"$out2" &
  server2=$!
  trap 'kill $server $server2 2>/dev/null; rm -f "$out" "$out2"' EXIT
  for _ in $(seq 100); do grep -q listening "$out2" && break; sleep 0.1; done
  other=$(sed -n 's/^listening on //p' "$out2")
fi
echo "store ${STORE:-memory}; $(nproc) cores shared by the client, the demo${STORE:+s and the store}"
python3 benches/stream.py "$base" $other
