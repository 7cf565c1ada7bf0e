"""Lua scripts of the tenant limiter: each decision is one atomic script on one slot
(every key of a tenant carries the tenant as its hash tag).

Buckets are token buckets refilled continuously at limit/60 s per second up to `limit`,
stored as a hash {t: tokens, ts: ms}; a missing key is a full bucket (keys expire once
they would be full again). Time is Redis's own (TIME), so gateways' clocks never disagree.
"""

from __future__ import annotations

# KEYS: requests bucket, tokens bucket, concurrency zset (lease id -> expiry ms).
# ARGV: [1] requests/min (0: none), [2] tokens/min (0: none), [3] max concurrent (0: none),
#       [4] tokens to reserve, [5] lease id, [6] lease ms.
# Returns {allowed, reason, retry_ms, req_left, req_reset_ms, tok_left, tok_reset_ms, in_flight}
# where reason is '' | 'requests' | 'tokens' | 'too_large' | 'concurrency'.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function bucket(key, limit)
  if limit <= 0 then return 0 end
  local h = redis.call('HMGET', key, 't', 'ts')
  local tokens, ts = tonumber(h[1]), tonumber(h[2])
  if tokens == nil then return limit end
  return math.min(limit, tokens + math.max(0, now - ts) * limit / 60000)
end
local function reset_ms(tokens, limit)
  if limit <= 0 then return 0 end
  return math.ceil(math.max(0, limit - tokens) * 60000 / limit)
end
local rl, tl, cl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local r, tk = bucket(KEYS[1], rl), bucket(KEYS[2], tl)
local n = 0
if cl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  n = redis.call('ZCARD', KEYS[3])
end
local reason, retry = '', 0
if cl > 0 and n >= cl then
  reason, retry = 'concurrency', 1000
elseif rl > 0 and r < 1 then
  reason, retry = 'requests', math.ceil((1 - r) * 60000 / rl)
elseif tl > 0 and cost > tl then
  reason, retry = 'too_large', 60000
elseif tl > 0 and tk < cost then
  reason, retry = 'tokens', math.ceil((cost - tk) * 60000 / tl)
end
if reason == '' then
  if rl > 0 then
    r = r - 1
    redis.call('HSET', KEYS[1], 't', tostring(r), 'ts', now)
    redis.call('PEXPIRE', KEYS[1], reset_ms(r, rl) + 1000)
  end
  if tl > 0 then
    tk = tk - cost
    redis.call('HSET', KEYS[2], 't', tostring(tk), 'ts', now)
    redis.call('PEXPIRE', KEYS[2], reset_ms(tk, tl) + 1000)
  end
  if cl > 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
    n = n + 1
  end
end
return {reason == '' and 1 or 0, reason, retry, math.floor(math.max(0, r)), reset_ms(r, rl),
        math.floor(math.max(0, tk)), reset_ms(tk, tl), n}
"""

# KEYS: tokens bucket, concurrency zset, usage hash of the day.
# ARGV: [1] tokens/min (0: none), [2] tokens to give back (negative: charge more),
#       [3] lease id ('' none), [4] prompt, [5] completion, [6] cached tokens, [7] usage ttl s.
# The correction at the end of a request: reserved minus used goes back into the bucket,
# the concurrency slot is freed and the real usage is counted for chargeback.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tl, back = tonumber(ARGV[1]), tonumber(ARGV[2])
if tl > 0 and back ~= 0 then
  local h = redis.call('HMGET', KEYS[1], 't', 'ts')
  local tokens, ts = tonumber(h[1]), tonumber(h[2])
  if tokens == nil then tokens, ts = tl, now end
  tokens = math.min(tl, math.min(tl, tokens + math.max(0, now - ts) * tl / 60000) + back)
  redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(0, tl - tokens) * 60000 / tl) + 1000)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
redis.call('HINCRBY', KEYS[3], 'requests', 1)
redis.call('HINCRBY', KEYS[3], 'prompt_tokens', tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[3], 'completion_tokens', tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[3], 'cached_tokens', tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
return 1
"""
