"""The Lua scripts of the session store: each write is one atomic script.

Every write script takes the session's four keys (meta items order events) as
its first KEYS, the TTL in ms as ARGV[1], checks that the session exists, and
refreshes the TTL of those four keys before it returns. The lease scripts take
the lease keys, which expire with the lease.
"""

# Every write script takes the TTL in ms as ARGV[1] and ends by calling touch().
TOUCH = """
local function touch()
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
"""

# KEYS: meta items order events. ARGV: ttl_ms config.
# Returns the meta hash as a flat list, or nil when the session does not exist.
UPDATE_CONFIG = (
    TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'config', ARGV[2])
touch()
return redis.call('HGETALL', KEYS[1])
"""
)

# The append of APPEND_ITEM and APPEND_ITEM_AND_LOAD, as a Lua function.
# KEYS: meta items order events. ARGV: ttl_ms item_id item_bytes previous_item_id.
# previous_item_id: '' appends at the end, 'root' inserts first, else after that id.
# Returns {status, id of the item now before the new one ('' when first)}.
_APPEND = (
    TOUCH
    + """
local function append()
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_session', ''} end
  local id, previous = ARGV[2], ARGV[4]
  if redis.call('HEXISTS', KEYS[2], id) == 1 then return {'duplicate', ''} end
  local before = ''
  if previous == '' then
    before = redis.call('LINDEX', KEYS[3], -1) or ''
    redis.call('RPUSH', KEYS[3], id)
  elseif previous == 'root' then
    redis.call('LPUSH', KEYS[3], id)
  else
    if redis.call('HEXISTS', KEYS[2], previous) == 0 then return {'no_previous', ''} end
    redis.call('LINSERT', KEYS[3], 'AFTER', previous, id)
    before = previous
  end
  redis.call('HSET', KEYS[2], id, ARGV[3])
  touch()
  return {'ok', before}
end
"""
)

# KEYS, ARGV and return value: as `append` above.
APPEND_ITEM = _APPEND + "return append()\n"

# APPEND_ITEM, then, when it appended, what `load_conversation` reads, in the same
# atomic step: {'ok', before, HGETALL meta, PTTL meta, LRANGE order, HGETALL items}.
APPEND_ITEM_AND_LOAD = (
    _APPEND
    + """
local appended = append()
if appended[1] ~= 'ok' then return appended end
return {'ok', appended[2], redis.call('HGETALL', KEYS[1]), redis.call('PTTL', KEYS[1]),
        redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: meta items order events. ARGV: ttl_ms item_id. Returns a status.
DELETE_ITEM = (
    TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'no_session' end
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then return 'no_item' end
redis.call('LREM', KEYS[3], 1, ARGV[2])
touch()
return 'ok'
"""
)

# KEYS: meta items order events owner.
# ARGV: ttl_ms max_events holder lease_ms open_response ('-' keeps it)
# open_response_seq broker_response ('' keeps it) broker_address, then seq
# event_bytes per event.
# With a holder, refuses (-2) unless the lease is free or the holder's, and renews
# it. Seq 0 numbers an event after the last; others must be increasing and above
# the last (-3 otherwise, nothing written). Keeps the newest max_events and
# returns the new last seq, or -1 when the session does not exist.
APPEND_EVENTS = (
    TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local holder = ARGV[3]
if holder ~= '' then
  local owner = redis.call('GET', KEYS[5])
  if owner and owner ~= holder then return -2 end
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_event_seq') or '0')
local seqs = {}
local seq = last
for i = 9, #ARGV, 2 do
  local given = tonumber(ARGV[i])
  if given == 0 then seq = seq + 1
  elseif given <= seq then return -3
  else seq = given end
  seqs[#seqs + 1] = seq
end
for n, s in ipairs(seqs) do
  local member = string.format('%d', s) .. '\\n' .. ARGV[8 + 2 * n]
  redis.call('ZADD', KEYS[4], s, member)
end
if holder ~= '' then redis.call('SET', KEYS[5], holder, 'PX', ARGV[4]) end
if ARGV[5] ~= '-' then
  redis.call('HSET', KEYS[1], 'open_response', ARGV[5], 'open_response_seq', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'broker_response', ARGV[7], 'broker', ARGV[8])
end
redis.call('HSET', KEYS[1], 'last_event_seq', string.format('%d', seq))
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[2])
if excess > 0 then
  local gone = redis.call('ZRANGE', KEYS[4], excess - 1, excess - 1, 'WITHSCORES')
  redis.call('HSET', KEYS[1], 'trimmed_seq', gone[2])
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1)
end
touch()
return seq
"""
)

# KEYS: meta owner wanted. ARGV: holder lease_ms.
# Takes (or renews) the lease when it is free or the holder's; otherwise marks it
# wanted by the holder, which the owner learns at its next renewal.
# Returns {claimed, handoff_requested, last_event_seq}; claimed -1: no session.
CLAIM_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_event_seq') or '0')
local owner = redis.call('GET', KEYS[2])
local wanted = redis.call('GET', KEYS[3])
if owner and owner ~= ARGV[1] then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  return {0, 0, last}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if wanted == ARGV[1] then
  redis.call('DEL', KEYS[3])
  wanted = false
end
return {1, wanted and 1 or 0, last}
"""

# KEYS: owner. ARGV: holder. Frees the lease if the holder has it.
RELEASE_SESSION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
