"""The Redis Lua scripts of token limits and budgets: reserve (all scopes or none) and settle.

Token windows are fixed windows (minute, UTC day) named by Redis' clock (TIME), so every
process shares them; a counter holds what was reserved and settled in its window. A budget
`bg:{scope}:{id}` is a hash (limit, unit, period) with, per period, `:s` (spent, settled),
`:r` (reserved now), `:h` (request id -> its reservation) and `:z` (request id by expiry):
a reservation whose proxy died is released by the next script call after its expiry.

RESERVE  KEYS: nw window bases, then nb budget bases.
         ARGV: nw, nb, request id, tokens, micro-USD, reservation ttl ms, then per window
         its seconds and limit.
         Returns {allowed (1, 0, or -1: budgets not loaded into Redis), denied index, then per
         key: concrete key ('' for a scope without a budget), count after, limit, reset s,
         unit}.
SETTLE   KEYS: the concrete window keys, then the budget period prefixes RESERVE returned.
         ARGV: nw, nb, request id, window delta (actual - reserved tokens), then per budget
         the actual spend in its unit. Returns the budgets' spent values.
"""

from __future__ import annotations

from typing import Final

_PERIODS = """
local function dfc(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function period(p, days)
  if p == 'day' then return days, days + 1 end
  if p == 'week' then
    local s = days - ((days + 3) % 7)  -- 1970-01-01 was a Thursday; weeks start on Monday
    return s, s + 7
  end
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return dfc(y, m, 1), dfc(ny, nm, 1)
end
local function release_expired(prefix, now_ms)
  local z = prefix .. ':z'
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now_ms, 'LIMIT', 0, 100)
  for _, id in ipairs(gone) do
    local amt = redis.call('HGET', prefix .. ':h', id)
    if amt then
      redis.call('DECRBY', prefix .. ':r', amt)
      redis.call('HDEL', prefix .. ':h', id)
    end
    redis.call('ZREM', z, id)
  end
end
"""

RESERVE_LUA: Final = _PERIODS + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = math.floor(now_ms / 1000)
local nw, nb = tonumber(ARGV[1]), tonumber(ARGV[2])
local rid, tokens, usd = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
if nb > 0 and redis.call('EXISTS', 'bg:loaded') == 0 then return {-1, 0} end
local out = {1, 0}
local plan = {}
local allowed = 1
for i = 1, nw do
  local win = tonumber(ARGV[5 + 2 * i])
  local limit = tonumber(ARGV[6 + 2 * i])
  local w = math.floor(now_s / win)
  local key = KEYS[i] .. ':' .. w
  local cur = tonumber(redis.call('GET', key)) or 0
  local reset = (w + 1) * win - now_s
  if cur + tokens > limit then
    if allowed == 1 then out[2] = i end
    allowed = 0
  end
  plan[i] = {key, cur, limit, reset, 'tokens', tokens, win * 2000}
end
local days = math.floor(now_s / 86400)
for j = 1, nb do
  local base = KEYS[nw + j]
  local def = redis.call('HMGET', base, 'limit', 'unit', 'period')
  if not def[1] then
    plan[nw + j] = {'', 0, 0, 0, ''}
  else
    local limit = tonumber(def[1])
    local s, e = period(def[3], days)
    local prefix = base .. ':' .. s
    release_expired(prefix, now_ms)
    local cur = (tonumber(redis.call('GET', prefix .. ':s')) or 0)
      + (tonumber(redis.call('GET', prefix .. ':r')) or 0)
    local amount = def[2] == 'usd' and usd or tokens
    if cur + amount > limit then
      if allowed == 1 then out[2] = nw + j end
      allowed = 0
    end
    plan[nw + j] = {prefix, cur, limit, e * 86400 - now_s, def[2], amount,
                    (e * 86400 - now_s + 86400) * 1000}
  end
end
out[1] = allowed
for i = 1, nw + nb do
  local p = plan[i]
  local cur = p[2]
  if allowed == 1 and p[1] ~= '' then
    if i <= nw then
      cur = redis.call('INCRBY', p[1], p[6])
      redis.call('PEXPIRE', p[1], p[7])
    else
      cur = cur + p[6]
      redis.call('HINCRBY', p[1] .. ':h', rid, p[6])
      redis.call('INCRBY', p[1] .. ':r', p[6])
      redis.call('ZADD', p[1] .. ':z', now_ms + ttl, rid)
      for _, suffix in ipairs({':h', ':r', ':z'}) do
        redis.call('PEXPIRE', p[1] .. suffix, p[7])
      end
    end
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = p[1], cur, p[3], p[4], p[5]
end
return out
"""

SETTLE_LUA: Final = """
local nw, nb = tonumber(ARGV[1]), tonumber(ARGV[2])
local rid, delta = ARGV[3], tonumber(ARGV[4])
for i = 1, nw do
  -- An expired window stays gone: a refund must not create a negative counter.
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
local out = {}
for j = 1, nb do
  local prefix = KEYS[nw + j]
  local amt = redis.call('HGET', prefix .. ':h', rid)
  if amt then
    redis.call('DECRBY', prefix .. ':r', amt)
    redis.call('HDEL', prefix .. ':h', rid)
    redis.call('ZREM', prefix .. ':z', rid)
  end
  local spent = redis.call('INCRBY', prefix .. ':s', tonumber(ARGV[4 + j]))
  local ttl = redis.call('PTTL', prefix .. ':z')
  if ttl < 0 then ttl = redis.call('PTTL', prefix .. ':r') end
  if ttl < 0 then ttl = 40 * 86400 * 1000 end
  redis.call('PEXPIRE', prefix .. ':s', ttl)
  out[j] = spent
end
return out
"""

# Reads one budget's period: {limit, unit, period, prefix, spent, reserved, resets in s}.
STATUS_LUA: Final = _PERIODS + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = math.floor(now_ms / 1000)
local def = redis.call('HMGET', KEYS[1], 'limit', 'unit', 'period')
if not def[1] then return {} end
local s, e = period(def[3], math.floor(now_s / 86400))
local prefix = KEYS[1] .. ':' .. s
release_expired(prefix, now_ms)
return {def[1], def[2], def[3], prefix,
        tonumber(redis.call('GET', prefix .. ':s')) or 0,
        tonumber(redis.call('GET', prefix .. ':r')) or 0, e * 86400 - now_s, e * 86400}
"""
