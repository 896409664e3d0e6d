"""The Redis Lua script: sliding-window-counter checks for a batch of requests, every scope of
every request, in one script call and one network round trip.

KEYS: the scope key bases of all requests, concatenated ("rl:ip:1.2.3.4", "rl:user:u1", ...).
ARGV: window seconds, request count, then per request its scope count and one limit per scope.
Each request is decided atomically on its own, in order: all its scopes pass or none is
counted (a rejected request does not consume quota). Redis' own clock (TIME) names the window,
so processes with skewed clocks still share windows. Per-window counter keys are derived inside
the script, which is fine on a single Redis (not Redis Cluster).

Returns "elapsed_ms|r1;r2;..." with ri = "allowed,cur_1,prev_1,cur_2,prev_2,...": the counts of
the current and previous window per scope, the current one including the request when allowed.
One string because the client then parses one reply per batch instead of one per value.
"""

from __future__ import annotations

from typing import Final

SLIDING_WINDOW_LUA: Final = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win_ms = tonumber(ARGV[1]) * 1000
local w = math.floor(now_ms / win_ms)
local elapsed = now_ms - w * win_ms
local weight = (win_ms - elapsed) / win_ms
local ttl = 2 * win_ms + 1000
local out = {}
local k = 0
local a = 3
for r = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local names = {}
  for i = 1, n do
    names[2 * i - 1] = KEYS[k + i] .. ':' .. w
    names[2 * i] = KEYS[k + i] .. ':' .. (w - 1)
  end
  local counts = redis.call('MGET', unpack(names))
  local cur = {}
  local prev = {}
  local allowed = 1
  for i = 1, n do
    cur[i] = tonumber(counts[2 * i - 1]) or 0
    prev[i] = tonumber(counts[2 * i]) or 0
    if prev[i] * weight + cur[i] + 1 > tonumber(ARGV[a + i]) then
      allowed = 0
    end
  end
  if allowed == 1 then
    for i = 1, n do
      cur[i] = redis.call('INCR', names[2 * i - 1])
      if cur[i] == 1 then
        redis.call('PEXPIRE', names[2 * i - 1], ttl)
      end
    end
  end
  local parts = {allowed}
  for i = 1, n do
    parts[2 * i] = cur[i]
    parts[2 * i + 1] = prev[i]
  end
  out[r] = table.concat(parts, ',')
  k = k + n
  a = a + n + 1
end
return elapsed .. '|' .. table.concat(out, ';')
"""
