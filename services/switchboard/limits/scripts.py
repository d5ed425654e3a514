"""The Lua scripts of the tenant limits: every check-and-update is one atomic script.

Each script touches the keys of one tenant only, all declared in KEYS and sharing
the hash tag `{<tenant_id>}`, so it runs on one Redis Cluster node. Times arrive
as integer milliseconds in ARGV (the limiter's clock; docs/limits.md says why).
Lua numbers are doubles and Redis truncates them to integers on return, so every
value a script computes or returns is an integral number of ms or tokens.

A script that a client retries after a lost reply never lets a tenant exceed a
limit: admissions and reservations are keyed by an id the caller picked before
the first attempt, so the retry finds its own earlier write instead of adding a
second one.
"""

from __future__ import annotations

# Requests per minute: an exact sliding window of this length.
WINDOW_MS = 60_000
# Tokens per minute: the window is summed from buckets of this size...
BUCKET_MS = 1_000
# ...the current one and the SPAN before it, so a token leaves the window
# between WINDOW_MS and WINDOW_MS + BUCKET_MS after it was reserved (never early).
SPAN = WINDOW_MS // BUCKET_MS
DAY_MS = 86_400_000
# Keys live this much longer than their contents need, so a replica whose clock
# runs a little behind Redis's (TTLs run on Redis's clock) never loses live state.
TTL_SLACK_MS = 60_000

_CONSTANTS = f"""
local WINDOW_MS, BUCKET_MS, SPAN, DAY_MS = {WINDOW_MS}, {BUCKET_MS}, {SPAN}, {DAY_MS}
local TTL_SLACK_MS = {TTL_SLACK_MS}
"""

# KEYS: requests (zset member -> admission ms). ARGV: now_ms limit member.
# Returns {allowed 0|1, admissions in the window after this call, retry_after_ms}.
# The window is (now - WINDOW_MS, now]: an admission at t stops counting at
# exactly t + WINDOW_MS, and the set never holds more than `limit` members.
ADMIT_REQUEST = (
    _CONSTANTS
    + """
local now, limit, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - WINDOW_MS)
local count = redis.call('ZCARD', KEYS[1])
-- A retry of an admission that already happened must not take a second slot.
if redis.call('ZSCORE', KEYS[1], member) then return {1, count, 0} end
if count < limit then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], WINDOW_MS + TTL_SLACK_MS)
  return {1, count + 1, 0}
end
-- The next slot frees when the oldest admission leaves the window.
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then return {0, count, tonumber(oldest[2]) + WINDOW_MS - now} end
return {0, count, WINDOW_MS}  -- limit 0: nothing will ever free
"""
)

# Concurrent slots: zset holder -> lease end ms. A lease that ended at or before
# now is dropped before counting, so a crashed replica's slots free themselves.
_LEASES = """
local function keep_key_for_longest_lease(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', key, tonumber(last[2]) - now + TTL_SLACK_MS) end
end
"""

# KEYS: slots. ARGV: now_ms limit lease_ms holder.
# Returns {allowed 0|1, slots held after this call, retry_after_ms}. A holder that
# already holds a slot keeps it (its lease restarts), so retries are harmless.
ACQUIRE = (
    _CONSTANTS
    + _LEASES
    + """
local now, limit, lease, holder = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], holder)
local count = redis.call('ZCARD', KEYS[1])
if held or count < limit then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  keep_key_for_longest_lease(KEYS[1], now)
  if not held then count = count + 1 end
  return {1, count, 0}
end
-- The earliest a slot frees by itself is when the first lease ends.
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return {0, count, tonumber(first[2]) - now} end
return {0, count, lease}  -- limit 0
"""
)

# KEYS: slots. ARGV: now_ms lease_ms holder. Returns 1 when the lease was
# extended, 0 when the holder holds no live slot (never acquired, released, or
# its lease ended: a slot that may already be someone else's is not revived).
RENEW = (
    _CONSTANTS
    + _LEASES
    + """
local now, lease, holder = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local ends = redis.call('ZSCORE', KEYS[1], holder)
if not ends then return 0 end
if tonumber(ends) <= now then
  redis.call('ZREM', KEYS[1], holder)
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, holder)
keep_key_for_longest_lease(KEYS[1], now)
return 1
"""
)

# Tokens: `minute` is a hash bucket (now_ms // BUCKET_MS) -> tokens, `day` a hash
# UTC day (now_ms // DAY_MS) -> tokens. Both hold reserved tokens until they are
# settled and the real usage after.
_TOKENS = """
-- Tokens in the buckets still in the window and those buckets, oldest first.
-- With trim, buckets that left the window are deleted (so the hash stays at most
-- SPAN + 1 fields and each call costs O(SPAN)).
local function minute_window(key, current, trim)
  local flat = redis.call('HGETALL', key)
  local total, live = 0, {}
  for i = 1, #flat, 2 do
    local bucket, tokens = tonumber(flat[i]), tonumber(flat[i + 1])
    if bucket < current - SPAN then
      if trim then redis.call('HDEL', key, flat[i]) end
    else
      total = total + tokens
      live[#live + 1] = {bucket, tokens}
    end
  end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  return total, live
end

-- When a bucket stops counting, in ms from now.
local function leaves_in(bucket, now)
  return (bucket + SPAN + 1) * BUCKET_MS - now
end

-- Add delta (possibly negative) to a counter; a counter never goes below zero.
local function add(key, field, delta)
  if delta == 0 then return end
  if redis.call('HINCRBY', key, field, delta) <= 0 then redis.call('HDEL', key, field) end
end

local function keep_keys()
  redis.call('PEXPIRE', KEYS[1], WINDOW_MS + BUCKET_MS + TTL_SLACK_MS)
  redis.call('PEXPIRE', KEYS[2], 3 * DAY_MS)
end
"""

# KEYS: minute day reservation. ARGV: now_ms tokens per_minute per_day ttl_ms
# (a limit of -1 is unlimited). Returns {allowed 0|1, minute tokens, today's tokens,
# retry_after_ms, refused by: 0 none, 1 the minute limit, 2 the day budget}; the
# token counts include this reservation when it was admitted.
RESERVE_TOKENS = (
    _CONSTANTS
    + _TOKENS
    + """
local now, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local per_minute, per_day, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local current, today = math.floor(now / BUCKET_MS), math.floor(now / DAY_MS)
local minute_used, live = minute_window(KEYS[1], current, true)
-- Keep yesterday and the day before: a reservation settled after midnight
-- still corrects the day it was charged to.
for _, day in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(day) < today - 2 then redis.call('HDEL', KEYS[2], day) end
end
local day_used = tonumber(redis.call('HGET', KEYS[2], today) or '0')
-- A retried reservation is already counted: admit it again, charge nothing.
if redis.call('EXISTS', KEYS[3]) == 1 then return {1, minute_used, day_used, 0, 0} end
if per_day >= 0 and day_used + tokens > per_day then
  return {0, minute_used, day_used, DAY_MS - now % DAY_MS, 2}
end
if per_minute >= 0 and minute_used + tokens > per_minute then
  -- Wait until the oldest buckets that must leave for this reservation to fit
  -- have left; a reservation larger than the limit waits for an empty window.
  local excess, retry = minute_used + tokens - per_minute, WINDOW_MS
  for _, entry in ipairs(live) do
    excess = excess - entry[2]
    retry = leaves_in(entry[1], now)
    if excess <= 0 then break end
  end
  return {0, minute_used, day_used, retry, 1}
end
redis.call('HINCRBY', KEYS[1], current, tokens)
redis.call('HINCRBY', KEYS[2], today, tokens)
keep_keys()
-- The record lets any replica settle this reservation against the right buckets.
redis.call('HSET', KEYS[3], 'minute', current, 'day', today, 'tokens', tokens)
redis.call('PEXPIRE', KEYS[3], ttl)
return {1, minute_used + tokens, day_used + tokens, 0, 0}
"""
)

# KEYS: minute day reservation. ARGV: now_ms actual_tokens settled_ttl_ms.
# Returns 1 when the reservation was settled now, 0 when there was nothing to
# settle (unknown, expired, or settled before: settling twice changes nothing).
SETTLE_TOKENS = (
    _CONSTANTS
    + _TOKENS
    + """
local record = redis.call('HMGET', KEYS[3], 'minute', 'day', 'tokens', 'settled')
if not record[1] or record[4] then return 0 end
local now, actual = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket, day, reserved = tonumber(record[1]), tonumber(record[2]), tonumber(record[3])
local delta = actual - reserved
if bucket >= math.floor(now / BUCKET_MS) - SPAN then
  add(KEYS[1], bucket, delta)
elseif delta > 0 then
  -- The reservation has left the window; tokens it ran over are charged now,
  -- tokens it did not use no longer hold anything back.
  add(KEYS[1], math.floor(now / BUCKET_MS), delta)
end
add(KEYS[2], day, delta)
keep_keys()
-- Keep the record a while as 'settled' so a retried settle or reserve is a no-op.
redis.call('HSET', KEYS[3], 'tokens', actual, 'settled', 1)
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""
)

# KEYS: requests minute. ARGV: now_ms. Reads only.
# Returns {admissions in the window, ms until the window holds none,
#          tokens in the window, ms until it holds none}.
USAGE = (
    _CONSTANTS
    + _TOKENS
    + """
local now = tonumber(ARGV[1])
local requests = redis.call('ZCOUNT', KEYS[1], '(' .. (now - WINDOW_MS), '+inf')
local requests_reset = 0
if requests > 0 then
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  requests_reset = tonumber(newest[2]) + WINDOW_MS - now
end
local tokens, live = minute_window(KEYS[2], math.floor(now / BUCKET_MS), false)
local tokens_reset = 0
if #live > 0 then tokens_reset = leaves_in(live[#live][1], now) end
return {requests, requests_reset, tokens, tokens_reset}
"""
)
