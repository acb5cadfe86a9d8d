#!/usr/bin/env bash
# One run of benches/http.sh on every store, one after the other: the memory store, Redis
# without persistence and Redis as a payment service runs it (`appendonly yes`,
# `appendfsync always`: every write synced before it is acknowledged), PostgreSQL and SQLite,
# each against its bare route and its limit route. Starts its own Redis servers and PostgreSQL
# (fsync on, its default) on loopback, in a temporary directory, and stops them and deletes it
# at the end, on failure too.
#
#   benches/http_all.sh                 # ROUNDS=3, 4 s per scenario per round, 32 connections
#   ROUNDS=5 benches/http_all.sh 5 32   # arguments and ROUNDS as for benches/http.sh
#   SCRIPT=benches/stream.sh benches/http_all.sh   # streamed answers on every store instead
#
# Needs redis-server and PostgreSQL's binaries (/usr/lib/postgresql/*/bin); runs PostgreSQL as
# the `postgres` user when started as root. Ports: REDIS_PORT (6390), DURABLE_REDIS_PORT (6391),
# PG_PORT (5499). With a
# `valkey-server` on the PATH (8.1 or later, whose `SET` takes `IFEQ`: the Redis store then
# completes without its script; `.ci/run` shows how to build one), the Redis scenarios also run
# on it, on VALKEY_PORT (6393).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-4}
CONNS=${2:-32}
export ROUNDS=${ROUNDS:-3}
REDIS_PORT=${REDIS_PORT:-6390}
DURABLE_REDIS_PORT=${DURABLE_REDIS_PORT:-6391}
PG_PORT=${PG_PORT:-5499}
VALKEY_PORT=${VALKEY_PORT:-6393}
valkey=$(command -v valkey-server || true)
initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)
initdb=${initdb:-$(command -v initdb)} || { echo "PostgreSQL's initdb not found" >&2; exit 1; }
PG=$(dirname "$initdb")
tmp=$(mktemp -d)
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else sh -c "$*"; fi; }
cleanup() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  redis-cli -p "$DURABLE_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  [ -z "$valkey" ] || redis-cli -p "$VALKEY_PORT" shutdown nosave >/dev/null 2>&1 || true
  as_pg "$PG/pg_ctl -D $tmp/pg -m fast stop" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --dir "$tmp" >/dev/null
mkdir -p "$tmp/durable"
redis-server --port "$DURABLE_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes \
  --appendfsync always --daemonize yes --dir "$tmp/durable" >/dev/null
stores=(memory "redis://127.0.0.1:$REDIS_PORT" "redis://127.0.0.1:$DURABLE_REDIS_PORT")
if [ -n "$valkey" ]; then
  mkdir -p "$tmp/valkey"
  "$valkey" --port "$VALKEY_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$tmp/valkey" >/dev/null
  stores+=("redis://127.0.0.1:$VALKEY_PORT")
fi
stores+=("postgres://postgres@127.0.0.1:$PG_PORT/postgres" "sqlite://$tmp/bench.db")
mkdir -p "$tmp/pg"
[ "$(id -u)" = 0 ] && chown postgres "$tmp" "$tmp/pg"
as_pg "$PG/initdb -D $tmp/pg -A trust -U postgres" >/dev/null
as_pg "$PG/pg_ctl -D $tmp/pg -w -o '-p $PG_PORT -k $tmp -c listen_addresses=127.0.0.1' -l $tmp/pg.log start" >/dev/null
cargo build -q --release --example demo_server
for store in "${stores[@]}"; do
  label=$store
  [ "$store" != "redis://127.0.0.1:$VALKEY_PORT" ] || label="$store ($("$valkey" --version | cut -d' ' -f1-3))"
  [ "$store" != "redis://127.0.0.1:$DURABLE_REDIS_PORT" ] || label="$store (appendonly yes, appendfsync always)"
  echo "=== $label ($(date +%T))"
  if [ "$store" = memory ]; then
    "${SCRIPT:-benches/http.sh}" "$SECS" "$CONNS"
  else
    STORE=$store "${SCRIPT:-benches/http.sh}" "$SECS" "$CONNS"
  fi
done
echo "=== done ($(date +%T))"
