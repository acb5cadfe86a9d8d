//! The Lua scripts of the Redis store: owner-checked compare-and-set calls, and the claim for
//! servers before Redis 7.0.

use redis::Script;

/// `SET NX PX` takes a free key; otherwise the key's record (anything but a claim, `C`: a
/// damaged value is decoded, and refused, as a record), or the remaining lease.
/// Keys never expire during a script, so the `GET` after a failed `SET NX` always finds one.
pub(super) const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0}
end
local value = redis.call('GET', KEYS[1])
if string.byte(value, 1) ~= 67 then
  return {2, value}
end
return {1, redis.call('PTTL', KEYS[1])}
";

/// Owner-checked calls: compare the stored claim with the caller's (`ARGV[1]`), as written or
/// as a waiting duplicate marked it (followed by `W`), before acting.
pub(super) const RENEW: &str = r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. 'W' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Completion and release publish the key on the store's channel (ARGV's last) when a
/// duplicate marked the claim (it waits, maybe in another process): only then.
/// The key's recovery point (`KEYS[2]`, always) and live stream (`KEYS[3]`, when the caller
/// appended one) are deleted with the claim, in one `DEL`: the record supersedes them (a `DEL`
/// of keys that are not there writes nothing). Completing twice with the same record is a
/// success (a completion retried because replicas had not acknowledged it yet, or after its
/// reply was lost), and ends them too: the record there fences it, as no run can claim the
/// key while it holds one.
pub(super) const COMPLETE: &str = r"
local value = redis.call('GET', KEYS[1])
local waited = value ~= ARGV[1] and value == ARGV[1] .. 'W'
if waited or value == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
  if waited then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
  return 1
end
if value == ARGV[2] then
  if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
  return 1
end
return 0
";

/// Saves a recovery point (`KEYS[2]`) for the owner of the claim on `KEYS[1]` only.
pub(super) const SAVE_POINT: &str = r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. 'W' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The recovery point (`KEYS[2]`), for the owner of the claim on `KEYS[1]` only.
pub(super) const LOAD_POINT: &str = r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. 'W' then
  return {1, redis.call('GET', KEYS[2])}
end
return {0}
";

/// Deletes the claim (and the live stream, `KEYS[2]`, given when the caller appended one).
pub(super) const RELEASE: &str = r"
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] or value == ARGV[1] .. 'W' then
  redis.call('DEL', unpack(KEYS))
  if value ~= ARGV[1] then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
  return 1
end
return 0
";

/// A duplicate about to wait marks the claim it waits for, so that the owner's completion or
/// release publishes the key: a claim of version 2 (`C`, 2, 16 bytes of token) gets `W`
/// appended, its TTL kept (`PTTL` then `PX`: `KEEPTTL` needs Redis 6.0). 1 while the key is
/// in flight (marked now or before, or an earlier release's claim, whose owner publishes every
/// completion and which is left as it is); 0 when it is not (a record, or nothing: claim again).
pub(super) const MARK_WAITED: &str = r"
local value = redis.call('GET', KEYS[1])
if not value or string.byte(value, 1) ~= 67 then
  return 0
end
if string.byte(value, 2) == 2 and #value == 18 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('SET', KEYS[1], value .. 'W', 'PX', ttl)
  end
end
return 1
";

/// Appends chunks to the live stream (`KEYS[2]`, a list) of the claim on `KEYS[1]`, for its
/// owner only (`ARGV[1]`, the claim as written; -1 otherwise). The list's first element is
/// the owner's claim, then chunk 0, 1, …: a list of another owner's (a crashed one's) holds
/// nothing for this one, and is replaced by its chunk 0. The chunks (`ARGV[4..]`) are chunks
/// `ARGV[2]..` of the stream: those it holds already are skipped (a retried append); one past
/// its end is a gap, refused with `-2 - held`. The list is kept `ARGV[3]` ms from now. Returns
/// how many chunks the stream held before.
pub(super) const APPEND_STREAM: &str = r"
local value = redis.call('GET', KEYS[1])
if value ~= ARGV[1] and value ~= ARGV[1] .. 'W' then
  return -1
end
local held = 0
if redis.call('LINDEX', KEYS[2], 0) == ARGV[1] then
  held = redis.call('LLEN', KEYS[2]) - 1
end
local from = tonumber(ARGV[2])
if from > held then
  return -2 - held
end
if held == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
local first = 4 + held - from
while first <= #ARGV do
  local last = math.min(first + 999, #ARGV)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, last))
  first = last + 1
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return held
";

/// Where the key (`KEYS[1]`) and its live stream (`KEYS[2]`) stand, in one script: `{0}`
/// nothing; `{1, value}` a record (or a damaged value, which decoding reports); `{2}` in
/// flight, with no stream of its current owner's; `{3, chunk…}` the owner's chunks from
/// `ARGV[1]` on, while they add up to at most `ARGV[2]` bytes (at least one, when any).
pub(super) const READ_STREAM: &str = r"
local value = redis.call('GET', KEYS[1])
if not value then
  return {0}
end
if string.byte(value, 1) ~= 67 then
  return {1, value}
end
if redis.call('LINDEX', KEYS[2], 0) ~= string.sub(value, 1, 18) then
  return {2}
end
local out = {3}
local at = tonumber(ARGV[1]) + 1
local cap = tonumber(ARGV[2])
local size = 0
while true do
  local batch = redis.call('LRANGE', KEYS[2], at, at + 15)
  for i = 1, #batch do
    local len = #batch[i]
    if #out > 1 and size + len > cap then
      return out
    end
    out[#out + 1] = batch[i]
    size = size + len
  end
  if #batch < 16 then
    return out
  end
  at = at + 16
end
";

/// `GET` and `PTTL` in one round trip, for operators.
pub(super) const INSPECT: &str = r"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";

/// The scripts, loaded once per store (and its clones).
pub(super) struct Scripts {
    /// Whether the server takes `SET … NX GET` (Redis 7.0 and later): then a claim is that one
    /// plain command, not a script. Cleared for good the first time the server refuses it.
    pub(super) plain_claim: std::sync::atomic::AtomicBool,
    /// Whether the server takes `SET … IFEQ` (Valkey 8.1, Redis 8.4 and later): then a
    /// completion is plain commands, not the script (see `RedisStore::complete_conditional`).
    /// Cleared for good the first time the server refuses it; never set on a cluster, where a
    /// pipeline with the keyless `PUBLISH` is routed by the cluster client (not tested).
    pub(super) conditional_set: std::sync::atomic::AtomicBool,
    pub(super) claim: Script,
    pub(super) renew: Script,
    pub(super) complete: Script,
    pub(super) release: Script,
    pub(super) save_point: Script,
    pub(super) load_point: Script,
    pub(super) mark_waited: Script,
    pub(super) append_stream: Script,
    pub(super) read_stream: Script,
}
