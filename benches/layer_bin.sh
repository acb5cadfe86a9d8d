# Sourced by benches/instructions.sh and benches/timed.sh: sets BIN to the `layer` bench's
# executable, built first, unless BIN is set already (a saved binary, for an A/B).
#
# `-p`: the bench package alone, built as a service that depends on this crate builds it.
# From the root (`cargo bench --bench layer`) the root package's dev-dependencies are unified
# in: tokio's `test-util` (its clock read under a mutex) and tracing's `log` fallback (a span
# consults `log` when no subscriber is set), about 300 instructions per replay and 900 to
# 1,500 per Redis request that no production build pays.
if [[ -z "${BIN:-}" ]]; then
  BIN=$(cargo bench -p tower-idempotency-benches --bench layer --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("target",{}).get("name")=="layer" and m.get("executable"): print(m["executable"])')
fi
