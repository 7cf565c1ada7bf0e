"""Lua scripts of the session store: each operation is one atomic script on one slot.

Stored turn element: "<tokens>|<u|x>|<json list of messages>", where 'u' marks a turn
whose first message is a user message (a safe cut point, see truncation.py).
"""

from __future__ import annotations

# KEYS: meta, turns. ARGV: ttl_ms.
# Returns nil when the session does not exist, else {meta hash flat, turn elements, pttl}.
READ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ttl = tonumber(ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1), redis.call('PTTL', KEYS[1])}
"""

# KEYS: meta. ARGV: now_ms, ttl_ms, system_json ('' none), system_tokens, metadata_json.
# Returns 1 when created, 0 when the id already exists (never overwrite).
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 0, 'c', ARGV[1], 'u', ARGV[1], 'k', 0, 'st', ARGV[4], 'd', 0,
           'ids', '', 'md', ARGV[5])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 's', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: meta, turns.
# ARGV: [1] expected version ('' = unconditional append), [2] turn id, [3] turn element,
#       [4] turn tokens, [5] 'u' or 'x', [6] new system json ('' = keep), [7] its tokens,
#       [8] replica id ('' = keep), [9] now_ms, [10] ttl_ms, [11] max_turns, [12] max_tokens,
#       [13] target_turns, [14] target_tokens, [15] turn ids remembered for idempotency.
# Returns {status, version, dropped, turns, tokens}: status 1 stored, 2 already stored
# (a retried commit with the same turn id), -1 no such session, -2 version conflict.
COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0, 0, 0} end
local m = KEYS[1]
local v = tonumber(redis.call('HGET', m, 'v'))
local ids = redis.call('HGET', m, 'ids') or ''
if string.find(',' .. ids .. ',', ',' .. ARGV[2] .. ',', 1, true) then
  return {2, v, 0, redis.call('LLEN', KEYS[2]), tonumber(redis.call('HGET', m, 'k')) +
          tonumber(redis.call('HGET', m, 'st'))}
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= v then return {-2, v, 0, 0, 0} end

redis.call('RPUSH', KEYS[2], ARGV[3])
local k = tonumber(redis.call('HGET', m, 'k')) + tonumber(ARGV[4])
local st = tonumber(redis.call('HGET', m, 'st'))
if ARGV[6] ~= '' then
  redis.call('HSET', m, 's', ARGV[6])
  st = tonumber(ARGV[7])
end

-- Truncation (mirror of cluster.sessions.truncation.plan_drop).
local function shape(i)
  local t, f = string.match(redis.call('LINDEX', KEYS[2], i), '^(%d+)|(%a)|')
  return tonumber(t), f
end
local n = redis.call('LLEN', KEYS[2])
local dropped = 0
if n > tonumber(ARGV[11]) or st + k > tonumber(ARGV[12]) then
  local target_turns, target_tokens = tonumber(ARGV[13]), tonumber(ARGV[14])
  local total = st + k
  local drop = 0
  while drop < n - 1 and (n - drop > target_turns or total > target_tokens) do
    local t = shape(drop)
    total = total - t
    drop = drop + 1
  end
  -- Move the cut forward to a turn that starts with a user message, if any is left.
  local cut, cut_total = drop, total
  local t, f = shape(cut)
  while cut < n - 1 and f ~= 'u' do
    cut_total = cut_total - t
    cut = cut + 1
    t, f = shape(cut)
  end
  if f == 'u' then drop, total = cut, cut_total end
  if drop > 0 then redis.call('LTRIM', KEYS[2], drop, -1) end
  dropped = drop
  k = total - st
end

v = v + 1
local keep_ids = tonumber(ARGV[15])
local list = {}
for id in string.gmatch(ids, '[^,]+') do list[#list + 1] = id end
list[#list + 1] = ARGV[2]
while #list > keep_ids do table.remove(list, 1) end
redis.call('HSET', m, 'v', v, 'u', ARGV[9], 'k', k, 'st', st, 'ids', table.concat(list, ','),
           'd', tonumber(redis.call('HGET', m, 'd')) + dropped)
if ARGV[8] ~= '' then redis.call('HSET', m, 'r', ARGV[8]) end
local ttl = tonumber(ARGV[10])
redis.call('PEXPIRE', m, ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, v, dropped, n - dropped, k + st}
"""

# KEYS: meta, turns. Returns the number of keys removed (0: no such session).
DELETE = """
return redis.call('DEL', KEYS[1], KEYS[2])
"""
