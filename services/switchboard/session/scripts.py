"""The Lua scripts of the session store: each write is one atomic script.

Every script takes the session's four keys (meta items order events) as KEYS,
the TTL in ms as ARGV[1], checks that the session exists, and refreshes the TTL
of all four keys before it returns.
"""

# Every write script takes the TTL in ms as ARGV[1] and ends by calling touch().
TOUCH = """
local function touch()
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
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

# KEYS: meta items order events. ARGV: ttl_ms item_id item_bytes previous_item_id.
# previous_item_id: '' appends at the end, 'root' inserts first, else after that id.
# Returns {status, id of the item now before the new one ('' when first)}.
APPEND_ITEM = (
    TOUCH
    + """
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

# KEYS: meta items order events. ARGV: ttl_ms max_events event_bytes...
# Numbers the events after the session's last seq, keeps the newest max_events,
# and returns the new last seq, or -1 when the session does not exist.
APPEND_EVENTS = (
    TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last_event_seq') or '0')
for i = 3, #ARGV do
  seq = seq + 1
  local member = string.format('%d', seq) .. '\\n' .. ARGV[i]
  redis.call('ZADD', KEYS[4], seq, member)
end
redis.call('HSET', KEYS[1], 'last_event_seq', string.format('%d', seq))
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[2])
if excess > 0 then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1) end
touch()
return seq
"""
)
