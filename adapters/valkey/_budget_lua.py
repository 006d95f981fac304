"""The shared provider budget's one server-side script (see :mod:`adapters.valkey._budget`).

One hash per endpoint and hashed API key, ``<prefix>:budget:<id>``, holds both lanes of a
GCRA with no burst, in server milliseconds (``TIME``: the replicas' clocks never matter):

* ``rtat`` / ``ttat``: the next free turn of the requests / tokens lane, paced at the
  strictest limit known (the callers' ``ProviderLimits``, the advertised
  ``x-ratelimit-limit-*``) less the local budget's ``HEADROOM``;
* ``rown`` / ``town``: the same at the callers' own limits alone (what the server *said*
  holds a turn back at most ``max_pause`` beyond them: a lie cannot stall the cluster);
* ``last``: the latest turn handed out (turns are handed out in arrival order: FIFO
  across every replica); ``pause``: until when a 429 paused the endpoint;
* ``radv`` / ``tadv``: the advertised limits, per minute; ``sent``: turns handed out;
* ``clock``: the server's time at the last call (the clock gone back since: every time
  above moves back with it);
* ``wstart``, ``rprev`` / ``rcur``, ``tprev`` / ``tcur``: requests and tokens handed out
  in the minute before ``wstart`` and since (an advertised limit below half of the last
  minute's is not believed);
* ``rcfg`` / ``tcfg`` (and when last given, ``rcfgat`` / ``tcfgat``): the strictest limit
  a caller configured in the last minute, which every caller paces at (replicas
  configured differently for one key do not each pace at their own).

One call does everything a replica has to tell, folded: settle (``dreq`` / ``dtok``
given back, negative: charged more), learn (advertised limits, a lane the server reported
exhausted for ``rwait`` / ``twait`` ms), pause (``pause_ms``), then reserve one turn.
A pause moves every turn already handed out later by as much as it extends the pause, and
is published (``<id> <shift ms> <server ms>``) so that every replica moves its waiters at
once, and a turn handed out before it but heard of after it moves too.

A hash of the wrong type is set aside (``<key>:corrupt``) and the budget begins afresh; a
field that is not a finite number counts as absent; a turn further than a day off is cut
to now.  Idle for ten minutes, the hash expires (what it learned is forgotten).
"""

from __future__ import annotations

from adapters.llm.provider_budget import _SERVED_SLACK, HEADROOM

__all__ = ["BUDGET"]

#: KEYS[1]: the budget hash, KEYS[2]: where a corrupt one is set aside.
#: ARGV: op ('r' reserve, 's' settle only), requests/min and tokens/min configured (0:
#: none), the token estimate, max_pause ms, dreq, dtok, advertised requests/min and
#: tokens/min (0: not reported), rwait ms, twait ms, pause ms, the events channel, the id,
#: by when (server ms) the call should have run (later: the waits are that much spent).
#: Returns {delay µs, tokens charged, requests/min in force (0: none), tokens/min in
#: force, pause left ms, turns handed out, the server's now (µs), the turn (µs)}.
BUDGET = (
    """
local key, aside = KEYS[1], KEYS[2]
local op = ARGV[1]
local rcfg, tcfg = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, max_pause = tonumber(ARGV[4]), tonumber(ARGV[5])
local dreq, dtok = tonumber(ARGV[6]), tonumber(ARGV[7])
local radv_new, tadv_new = tonumber(ARGV[8]), tonumber(ARGV[9])
local rwait, twait, pause_ms = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local channel, id = ARGV[13], ARGV[14]
local HEADROOM = """
    + repr(HEADROOM)
    + """
local DAY = 86400000
local SERVED_SLACK = """
    + repr(_SERVED_SLACK)
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
-- A call run late (the server was stopped, its caller gave up on it): its waits are spent
-- by as much, or a stale 429 would pause the cluster afresh from the server's return.
local late = math.max(0, now - (tonumber(ARGV[15]) or now))
rwait, twait, pause_ms = rwait - late, twait - late, pause_ms - late

local kind = redis.call('TYPE', key)['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('RENAME', key, aside) end
local h = redis.call('HMGET', key, 'rtat', 'rown', 'ttat', 'town', 'last', 'pause',
                     'radv', 'tadv', 'sent', 'rcfg', 'rcfgat', 'tcfg', 'tcfgat',
                     'wstart', 'rprev', 'rcur', 'tprev', 'tcur', 'clock')
local function num(v, lo, hi, default)
  local x = tonumber(v or '')
  if x == nil or x ~= x or x < lo or x > hi then return default end
  return x
end
-- The server's clock went back (a step of NTP, a restored VM) since the clock last read:
-- every time kept moves back with it, or the cluster would wait out the step.
local step = math.min(0, now - num(h[19], 0, now + DAY, now))
local function at(v, default)
  local x = num(v, 0, now + DAY - step, nil)
  if x == nil then return default end
  return x + step
end
local rtat, rown = at(h[1], now), at(h[2], now)
local ttat, town = at(h[3], now), at(h[4], now)
local last, paused = at(h[5], 0), at(h[6], 0)
local radv, tadv = num(h[7], 0, 1e15, 0), num(h[8], 0, 1e15, 0)
local sent = num(h[9], 0, 1e15, 0)
-- What the cluster was served in the last minute (two one-minute buckets, the older one
-- weighted by its share still in the minute): an advertised limit below half of it is not
-- believed, as the local budget does (one poisoned response would pace every replica at a
-- turn per max_pause for as long as the budget is in use).
local wstart = at(h[14], now)
local rprev, rcur = num(h[15], 0, 1e15, 0), num(h[16], 0, 1e15, 0)
local tprev, tcur = num(h[17], 0, 1e15, 0), num(h[18], 0, 1e15, 0)
if wstart > now or now - wstart >= 120000 then
  wstart, rprev, rcur, tprev, tcur = now, 0, 0, 0, 0
elseif now - wstart >= 60000 then
  wstart, rprev, rcur, tprev, tcur = wstart + 60000, rcur, 0, tcur, 0
end
local weight = 1 - (now - wstart) / 60000
if radv_new > 0 and radv_new * SERVED_SLACK >= rcur + rprev * weight then radv = radv_new end
if tadv_new > 0 and tadv_new * SERVED_SLACK >= tcur + tprev * weight then tadv = tadv_new end

-- Replicas configured differently for one key: the strictest limit any of them gave in
-- the last minute holds for every one (a replica that stopped asking for it releases it).
local function agreed(cfg, stored, at)
  if stored > 0 and at + 60000 >= now and (cfg <= 0 or stored < cfg) then
    return stored, at
  end
  if cfg > 0 then return cfg, now end
  return 0, 0
end
local rcfgat, tcfgat
rcfg, rcfgat = agreed(rcfg, num(h[10], 0, 1e15, 0), at(h[11], 0))
tcfg, tcfgat = agreed(tcfg, num(h[12], 0, 1e15, 0), at(h[13], 0))

-- A lane's limit in force (per minute; 0: none) and its pace (units per ms; nil: none).
local function limit(cfg, adv)
  if cfg > 0 and (adv <= 0 or cfg <= adv) then return cfg end
  if adv > 0 then return adv end
  return 0
end
local function pace(per_minute)
  if per_minute <= 0 then return nil end
  return per_minute * (1 - HEADROOM) / 60000
end
local rlim, tlim = limit(rcfg, radv), limit(tcfg, tadv)
local rp, tp, rop, top = pace(rlim), pace(tlim), pace(rcfg), pace(tcfg)

-- Settle: give back (or charge more); never more than a minute of debt ahead.
local function move(tat, units, p)
  if not p or units == 0 then return tat end
  return math.min(tat - units / p, math.max(tat, now + 60000))
end
rtat, rown = move(rtat, dreq, rp), move(rown, dreq, rop)
ttat, town = move(ttat, dtok, tp), move(town, dtok, top)
-- Turns given back (cancelled before they came): the FIFO mark moves back with the lanes.
if dreq > 0 then
  local free = now
  if rp then free = math.max(free, rtat) end
  if tp then free = math.max(free, ttat) end
  last = math.min(last, free)
end
-- Learn: a lane the server reported exhausted is free again only after its reset.
if rwait > 0 then rtat = math.max(rtat, now + math.min(rwait, max_pause)) end
if twait > 0 then ttat = math.max(ttat, now + math.min(twait, max_pause)) end
-- Pause: everything handed out moves later by as much as the pause grows.
if pause_ms > 0 then
  local untl = now + math.min(pause_ms, max_pause)
  local shift = untl - math.max(paused, now)
  if shift > 0 then
    paused = untl
    rtat, ttat = math.max(rtat, now) + shift, math.max(ttat, now) + shift
    if last > now then last = last + shift end
    redis.call('PUBLISH', channel,
               id .. ' ' .. string.format('%.3f', shift) .. ' ' .. string.format('%.3f', now))
  end
end

local t = now
local charged = 0
if op == 'r' then
  -- FIFO: never before a turn handed out earlier.
  local start = math.max(now, last)
  t = math.max(start, paused)
  if rp then t = math.max(t, rtat) end
  if tp then t = math.max(t, ttat) end
  -- What the server said holds a turn back at most max_pause past the turn before it;
  -- the callers' own limits are believed in full.
  local own = start
  if rop then own = math.max(own, rown) end
  if top then own = math.max(own, town) end
  t = math.max(start, math.min(t, math.max(own, start + max_pause)))
  charged = tokens
  if tlim > 0 then charged = math.min(tokens, tlim) end
  local function charge(tat, units, p)
    if not p then return tat end
    return math.min(math.max(tat, t) + units / p, t + 60000)
  end
  rtat, rown = charge(rtat, 1, rp), charge(rown, 1, rop)
  ttat, town = charge(ttat, charged, tp), charge(town, charged, top)
  last = t
  sent = sent + 1
  rcur, tcur = rcur + 1, tcur + charged
end

local function f(x) return string.format('%.3f', x) end
redis.call('HSET', key, 'rtat', f(rtat), 'rown', f(rown), 'ttat', f(ttat), 'town', f(town),
           'last', f(last), 'pause', f(paused), 'radv', f(radv), 'tadv', f(tadv),
           'sent', string.format('%d', sent), 'rlim', f(rlim), 'tlim', f(tlim),
           'rcfg', f(rcfg), 'rcfgat', f(rcfgat), 'tcfg', f(tcfg), 'tcfgat', f(tcfgat),
           'wstart', f(wstart), 'rprev', f(rprev), 'rcur', f(rcur), 'tprev', f(tprev),
           'tcur', f(tcur), 'clock', f(now))
redis.call('PEXPIRE', key, 600000)
return {math.floor((t - now) * 1000), math.floor(charged), math.floor(rlim), math.floor(tlim),
        math.floor(math.max(0, paused - now)), sent, math.floor(now * 1000),
        math.floor(t * 1000)}
"""
)
