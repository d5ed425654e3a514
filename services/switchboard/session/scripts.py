"""The Lua scripts of the session store: each write is one atomic script.

Every write script takes the session's four keys (meta items order events) as
its first KEYS, the TTL in ms as ARGV[1], checks that the session exists, and
refreshes the TTL of those four keys before it returns; APPEND_EVENTS takes
them (and the lease's owner key) per append of its batch, and refreshes them
when they were last refreshed over a second ago. The lease scripts take the
lease keys, which expire with the lease.
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

# Appends of events, each to one session: one script for a whole batch of them
# (on a cluster, whose scripts see one slot, a batch of one).
# KEYS: meta items order events owner of each append, in order.
# ARGV: ttl_ms max_events, then per append: holder lease_ms open_response ('-'
# keeps it) open_response_seq broker_response ('' keeps it) broker_address
# release event_count, then seq event_bytes per event.
# An append with release '1' only frees the lease if the holder has it (as
# RELEASE_SESSION) and returns 0.
# Each append is applied on its own, as if by a script of its own (an append
# that fails writes nothing and the others go on). With a holder, it is refused
# (-2) unless the lease is free or the holder's, and renews it. Seq 0 numbers an
# event after the last; others must be increasing and above the last (-3
# otherwise). Keeps the newest max_events. Its TTLs are refreshed when they were
# last over a second ago (the events key's tells: every write refreshes all
# four keys at once, and a new events key has none). Returns per append the new
# last seq, or -1 when the session does not exist.
APPEND_EVENTS = """
local ttl, max_events = tonumber(ARGV[1]), tonumber(ARGV[2])
local results = {}
local a = 3
for n = 1, (#KEYS / 5) do
  local k = 5 * (n - 1)
  local meta, events, owner = KEYS[k + 1], KEYS[k + 4], KEYS[k + 5]
  local holder, release, count = ARGV[a], ARGV[a + 6], tonumber(ARGV[a + 7])
  local first = a + 8
  a = first + 2 * count
  local result
  local last = release == '0' and redis.call('HGET', meta, 'last_event_seq')
  if release ~= '0' then
    if redis.call('GET', owner) == holder then redis.call('DEL', owner) end
    result = 0
  elseif not last and redis.call('EXISTS', meta) == 0 then result = -1
  elseif holder ~= '' and (redis.call('GET', owner) or holder) ~= holder then result = -2
  else
    local seq = tonumber(last or '0')
    local added = {}
    for i = first, a - 1, 2 do
      local given = tonumber(ARGV[i])
      if given == 0 then seq = seq + 1
      elseif given <= seq then result = -3; break
      else seq = given end
      added[#added + 1] = seq
      added[#added + 1] = string.format('%d', seq) .. '\\n' .. ARGV[i + 1]
    end
    if not result then
      for i = 1, #added, 200 do
        redis.call('ZADD', events, unpack(added, i, math.min(i + 199, #added)))
      end
      if holder ~= '' then redis.call('SET', owner, holder, 'PX', ARGV[first - 7]) end
      local fields = {'last_event_seq', string.format('%d', seq)}
      if ARGV[first - 6] ~= '-' then
        fields[3], fields[4] = 'open_response', ARGV[first - 6]
        fields[5], fields[6] = 'open_response_seq', ARGV[first - 5]
      end
      if ARGV[first - 4] ~= '' then
        fields[#fields + 1], fields[#fields + 2] = 'broker_response', ARGV[first - 4]
        fields[#fields + 1], fields[#fields + 2] = 'broker', ARGV[first - 3]
      end
      redis.call('HSET', meta, unpack(fields))
      if seq > max_events then
        local excess = redis.call('ZCARD', events) - max_events
        if excess > 0 then
          local gone = redis.call('ZRANGE', events, excess - 1, excess - 1, 'WITHSCORES')
          redis.call('HSET', meta, 'trimmed_seq', gone[2])
          redis.call('ZREMRANGEBYRANK', events, 0, excess - 1)
        end
      end
      if redis.call('PTTL', events) < ttl - 1000 then
        for i = 1, 4 do redis.call('PEXPIRE', KEYS[k + i], ttl) end
      end
      result = seq
    end
  end
  results[n] = result
end
return results
"""

# claim(meta, owner, wanted, holder, lease_ms): takes (or renews) the lease when
# it is free or the holder's; otherwise marks it wanted by the holder, which the
# owner learns at its next renewal. Returns claimed, handoff_requested,
# last_event_seq; claimed -1: no session.
_CLAIM = """
local function claim(meta, owner, wanted, holder, lease_ms)
  if redis.call('EXISTS', meta) == 0 then return -1, 0, 0 end
  local last = tonumber(redis.call('HGET', meta, 'last_event_seq') or '0')
  local held = redis.call('GET', owner)
  local waiting = redis.call('GET', wanted)
  if held and held ~= holder then
    redis.call('SET', wanted, holder, 'PX', lease_ms)
    return 0, 0, last
  end
  redis.call('SET', owner, holder, 'PX', lease_ms)
  if waiting == holder then
    redis.call('DEL', wanted)
    waiting = false
  end
  return 1, waiting and 1 or 0, last
end
"""

# KEYS: meta owner wanted. ARGV: holder lease_ms.
# Returns {claimed, handoff_requested, last_event_seq} (see _CLAIM).
CLAIM_SESSION = _CLAIM + "return {claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])}\n"

# Claims of several sessions, each on its own, in one run (on a cluster, whose
# scripts see one slot, a run of one). KEYS: meta owner wanted of each claim.
# ARGV: holder lease_ms of each claim. Returns the three values of each claim,
# in order, in one flat list.
CLAIM_SESSIONS = (
    _CLAIM
    + """
local results = {}
for n = 1, #KEYS / 3 do
  local claimed, handoff, last =
    claim(KEYS[3 * n - 2], KEYS[3 * n - 1], KEYS[3 * n], ARGV[2 * n - 1], ARGV[2 * n])
  results[#results + 1] = claimed
  results[#results + 1] = handoff
  results[#results + 1] = last
end
return results
"""
)

# KEYS: owner. ARGV: holder. Frees the lease if the holder has it.
RELEASE_SESSION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
