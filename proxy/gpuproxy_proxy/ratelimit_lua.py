"""The Redis Lua script: a sliding-window-counter check over every scope in one round trip.

KEYS[i] are scope key bases ("rl:ip:1.2.3.4", ...); ARGV[1] is the window in seconds and
ARGV[i+1] the limit of scope i. Redis' own clock (TIME) names the window, so processes with
skewed clocks still share windows. All scopes must pass or none is counted (a rejected
request does not consume quota). Per-window counter keys are derived inside the script,
which is fine on a single Redis (not Redis Cluster).

Returns "allowed,elapsed_ms,cur_1,prev_1,cur_2,prev_2,...": counts of the current and previous
windows, the current one including this request when allowed. One string instead of an array
because the client parses one reply instead of 2n + 2.
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
local n = #KEYS
local names = {}
for i = 1, n do
  names[2 * i - 1] = KEYS[i] .. ':' .. w
  names[2 * i] = KEYS[i] .. ':' .. (w - 1)
end
local counts = redis.call('MGET', unpack(names))
local cur = {}
local prev = {}
local allowed = 1
for i = 1, n do
  cur[i] = tonumber(counts[2 * i - 1]) or 0
  prev[i] = tonumber(counts[2 * i]) or 0
  if prev[i] * weight + cur[i] + 1 > tonumber(ARGV[i + 1]) then
    allowed = 0
  end
end
if allowed == 1 then
  for i = 1, n do
    cur[i] = redis.call('INCR', names[2 * i - 1])
    if cur[i] == 1 then
      redis.call('PEXPIRE', names[2 * i - 1], 2 * win_ms + 1000)
    end
  end
end
local out = {allowed, elapsed}
for i = 1, n do
  out[2 * i + 1] = cur[i]
  out[2 * i + 2] = prev[i]
end
return table.concat(out, ',')
"""
