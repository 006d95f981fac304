"""The server-side scripts: every read-modify-write of shared state is one atomic Lua call.

Time is the server's (``TIME``), so the clocks of the machines using it never matter.
Each script is loaded once per connection by ``EVALSHA`` (coredis falls back to
``EVAL`` after a server restart flushed its script cache).

Shared capacity, keys ``<name>:leases`` (sorted set: lease -> expiry, ms),
``<name>:queue`` (sorted set: waiting lease -> ticket, FIFO), ``<name>:waiting``
(sorted set: waiting lease -> deadline, ms), ``<name>:ticket`` (the ticket counter) and
``<name>:epoch`` (when these books began, ms), then where each of those five is set aside
if it is found corrupt.  Every script first *checks the books*: a key of the wrong type
(or a counter that is not a sane integer) is renamed aside, and the books count as lost.
Books without an epoch (new, flushed, restarted without persistence, set aside) begin a
new one: for one lease period from its start (the *grace*) nothing new is admitted, so
that every process still running agents re-asserts its leases first (lock servers do the
same after a restart).  Then every script *reclaims*: leases past their expiry, and
waiters that stopped renewing (a process that died in the queue), are dropped; an expiry
or deadline beyond the longest lease (a corrupt score, e.g. ``inf``) is cut to one lease
from now, so it cannot hold a slot forever.  Outside the grace, slots are handed to
waiters by the script that frees them (*pump*): FIFO, and each grant is published on the
grants channel (lease ids, space-separated), so waiting costs no polling.

Every capacity reply begins ``{epoch, grace left (ms), corrupt keys set aside}``.

Halt: the state key holds a small JSON document; its history is a list beside it; a
change is published on the events channel with the new document.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "ACQUIRE_BATCH",
    "CAPACITY_CLAIM",
    "HALT",
    "HALT_CLEAR",
    "HALT_READ",
    "MAX_LEASE_MS",
    "RESERVE",
    "RESERVE_EACH",
    "SYNC",
]

#: The longest lease (``lease_s`` is at most a day): no legitimate expiry lies further off.
MAX_LEASE_MS = 86_400_000

_CAPACITY_PRELUDE = (
    """
local leases, queue, waiting, ticket, epoch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local capacity, lease_ms, channel = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local MAX_LEASE_MS = """
    + str(MAX_LEASE_MS)
    + """

-- Check the books: a key of the wrong type, or a counter that is not a sane integer,
-- is set aside (for forensics) and the books count as lost.
local corrupt = {}
local shapes = {'zset', 'zset', 'zset', 'string', 'string'}
for i, shape in ipairs(shapes) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  local bad = found ~= 'none' and found ~= shape
  if found == 'string' and not bad then
    -- Digits only, as INCR writes them (at most 15: exact in Lua's doubles).
    local value = redis.call('STRLEN', KEYS[i]) <= 15 and redis.call('GET', KEYS[i])
    bad = not (value and string.match(value, '^%d+$'))
  end
  if bad then
    redis.call('RENAME', KEYS[i], KEYS[i + 5])
    corrupt[#corrupt + 1] = KEYS[i] .. '=' .. found
  end
end
if #corrupt > 0 then redis.call('DEL', epoch) end

-- The epoch: books without one are new or were lost; one that starts in the future
-- (a corrupt value, or the server's clock went back) starts now.
local began = tonumber(redis.call('GET', epoch) or '')
if not began or began > now then
  began = now
  redis.call('SET', epoch, string.format('%d', now))
end
local grace = math.max(0, began + lease_ms - now)

-- Reclaim what nobody renews: leases of a process that died, waiters that left.
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', waiting, '-inf', now)
for _, lease in ipairs(gone) do
  redis.call('ZREM', queue, lease)
  redis.call('ZREM', waiting, lease)
end
-- Cut what no process could have written (an expiry beyond the longest lease).
local horizon = string.format('(%d', now + MAX_LEASE_MS)
for _, key in ipairs({leases, waiting}) do
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', key, horizon, '+inf')) do
    redis.call('ZADD', key, now + lease_ms, member)
  end
end

-- Every reply starts with where the books stand.
local function reply(...)
  return {began, grace, table.concat(corrupt, ' '), ...}
end

-- Hand free slots to the head of the queue, in ticket order, and tell the waiters
-- (never during the grace).  A granted lease lives at least until its waiter's own
-- deadline, so a waiter whose process renews less often than this one's still renews
-- it in time.
local function pump()
  if grace > 0 then return end
  local free = capacity - redis.call('ZCARD', leases)
  local granted = {}
  while free > 0 do
    local head = redis.call('ZPOPMIN', queue)
    if #head == 0 then break end
    local lease = head[1]
    local deadline = tonumber(redis.call('ZSCORE', waiting, lease) or 0)
    redis.call('ZREM', waiting, lease)
    redis.call('ZADD', leases, math.max(now + lease_ms, deadline), lease)
    granted[#granted + 1] = lease
    free = free - 1
  end
  if #granted > 0 then
    redis.call('PUBLISH', channel, table.concat(granted, ' '))
  end
end

local function enqueue(lease)
  redis.call('ZADD', queue, redis.call('INCR', ticket), lease)
  redis.call('ZADD', waiting, now + lease_ms, lease)
end
"""
)

#: ARGV[4..]: the leases.  All or nothing; refused while anyone waits (FIFO: a batch in
#: reject mode never jumps the queue) and during the grace.  A lease already held counts
#: once (a retried call).  Returns {epoch, grace, corrupt, 1 | 0, in use, queued}.
RESERVE = (
    _CAPACITY_PRELUDE
    + """
pump()
local queued = redis.call('ZCARD', queue)
local in_use = redis.call('ZCARD', leases)
if queued > 0 or grace > 0 then return reply(0, in_use, queued) end
local new = 0
for i = 4, #ARGV do
  if not redis.call('ZSCORE', leases, ARGV[i]) then new = new + 1 end
end
if in_use + new > capacity then return reply(0, in_use, 0) end
for i = 4, #ARGV do
  redis.call('ZADD', leases, now + lease_ms, ARGV[i])
end
return reply(1, in_use + new, 0)
"""
)

#: ARGV[4..]: leases of different callers (hedge calls due at once), each taken alone:
#: granted in order while a slot is free, else refused; all refused while anyone waits
#: (FIFO: a hedge never jumps the queue) and during the grace.  A lease already held
#: counts once (a retried call).  Returns {epoch, grace, corrupt, in use, queued, one
#: status per lease ('g' granted, 'r' refused)}.
RESERVE_EACH = (
    _CAPACITY_PRELUDE
    + """
pump()
local queued = redis.call('ZCARD', queue)
local in_use = redis.call('ZCARD', leases)
local status = {}
for i = 4, #ARGV do
  local lease = ARGV[i]
  if redis.call('ZSCORE', leases, lease) then
    redis.call('ZADD', leases, 'GT', now + lease_ms, lease)
    status[#status + 1] = 'g'
  elseif queued == 0 and grace == 0 and in_use < capacity then
    redis.call('ZADD', leases, now + lease_ms, lease)
    in_use = in_use + 1
    status[#status + 1] = 'g'
  else
    status[#status + 1] = 'r'
  end
end
return reply(in_use, queued, unpack(status))
"""
)

#: ARGV[4]: the lease.  Granted now if nobody waits, a slot is free and the grace is over,
#: else queued (idempotent: a lease already held or queued keeps its place).
#: Returns {epoch, grace, corrupt, 1 (granted) | 0 (queued), in use, place in the queue}.
ACQUIRE = (
    _CAPACITY_PRELUDE
    + """
local lease = ARGV[4]
pump()
if redis.call('ZSCORE', leases, lease) then
  redis.call('ZADD', leases, 'GT', now + lease_ms, lease)
  return reply(1, redis.call('ZCARD', leases), 0)
end
if redis.call('ZSCORE', queue, lease) then
  redis.call('ZADD', waiting, now + lease_ms, lease)
  return reply(0, redis.call('ZCARD', leases), redis.call('ZRANK', queue, lease) + 1)
end
local in_use = redis.call('ZCARD', leases)
if redis.call('ZCARD', queue) == 0 and in_use < capacity and grace == 0 then
  redis.call('ZADD', leases, now + lease_ms, lease)
  return reply(1, in_use + 1, 0)
end
enqueue(lease)
return reply(0, in_use, redis.call('ZCARD', queue))
"""
)

#: ARGV[4..]: the leases of one batch, in order.  Each is granted now while nobody waits,
#: a slot is free and the grace is over, else queued behind whoever waits (FIFO: once one
#: is queued, the rest queue behind it); one already held or queued keeps its place (a
#: retried call).  Grants made here are not published: the caller reads them in the reply.
#: Returns {epoch, grace, corrupt, in use, queued, one status per lease ('g' granted,
#: 'w' waiting)}.
ACQUIRE_BATCH = (
    _CAPACITY_PRELUDE
    + """
pump()
local in_use = redis.call('ZCARD', leases)
-- Granted only while nobody waits: once one of the batch is queued, so is the rest.
local open = grace == 0 and redis.call('ZCARD', queue) == 0
local status = {}
for i = 4, #ARGV do
  local lease = ARGV[i]
  if redis.call('ZSCORE', leases, lease) then
    redis.call('ZADD', leases, 'GT', now + lease_ms, lease)
    status[#status + 1] = 'g'
  elseif redis.call('ZSCORE', queue, lease) then
    redis.call('ZADD', waiting, now + lease_ms, lease)
    status[#status + 1] = 'w'
  elseif open and in_use < capacity then
    redis.call('ZADD', leases, now + lease_ms, lease)
    in_use = in_use + 1
    status[#status + 1] = 'g'
  else
    enqueue(lease)
    open = false
    status[#status + 1] = 'w'
  end
end
return reply(in_use, redis.call('ZCARD', queue), unpack(status))
"""
)

#: ARGV[4]: how many releases, ARGV[5]: how many held leases, then the releases, the held
#: leases and the waiting leases of one process.  Releases (idempotent), renews what it
#: holds, keeps its waiters in the queue (re-queued at the back if the store lost them),
#: then hands out free slots.  A held lease the store lost is re-added during the grace
#: (its holder re-asserts it: the store must count what runs), or after it if there is
#: room; else it is lost, and its holder must stop its agent.  Returns {epoch, grace,
#: corrupt, in use, queued, one status per held lease ('h' renewed, 'r' re-added, 'l'
#: lost), one per waiting lease ('g' granted, 'w' waiting, 'q' re-queued)}.
SYNC = (
    _CAPACITY_PRELUDE
    + """
local n_release, n_held = tonumber(ARGV[4]), tonumber(ARGV[5])
local first_held = 6 + n_release
local first_waiting = first_held + n_held
for i = 6, first_held - 1 do
  redis.call('ZREM', leases, ARGV[i])
  redis.call('ZREM', queue, ARGV[i])
  redis.call('ZREM', waiting, ARGV[i])
end
local status = {}
for i = first_held, first_waiting - 1 do
  if redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, 'GT', now + lease_ms, ARGV[i])
    status[#status + 1] = 'h'
  elseif grace > 0 or redis.call('ZCARD', leases) < capacity then
    redis.call('ZADD', leases, now + lease_ms, ARGV[i])
    status[#status + 1] = 'r'
  else
    status[#status + 1] = 'l'
  end
end
local requeued = {}
for i = first_waiting, #ARGV do
  local lease = ARGV[i]
  if redis.call('ZSCORE', leases, lease) then
    redis.call('ZADD', leases, 'GT', now + lease_ms, lease)
  elseif redis.call('ZSCORE', queue, lease) then
    redis.call('ZADD', waiting, now + lease_ms, lease)
  else
    enqueue(lease)
    requeued[lease] = true
  end
end
pump()
for i = first_waiting, #ARGV do
  local lease = ARGV[i]
  if redis.call('ZSCORE', leases, lease) then
    status[#status + 1] = 'g'
  elseif requeued[lease] then
    status[#status + 1] = 'q'
  else
    status[#status + 1] = 'w'
  end
end
return reply(redis.call('ZCARD', leases), redis.call('ZCARD', queue), unpack(status))
"""
)

#: KEYS[1]: the halt key; ARGV[1]: the largest value read.  Returns {type} for anything
#: but a string, {'string', value}, or {'toolarge', length}.
HALT_READ = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' then return {kind} end
local length = redis.call('STRLEN', KEYS[1])
if length > tonumber(ARGV[1]) then return {'toolarge', length} end
return {kind, redis.call('GET', KEYS[1])}
"""

_HALT_HISTORY = """
local function record(history, aside, entry, max_history)
  local kind = redis.call('TYPE', history)['ok']
  if kind ~= 'list' and kind ~= 'none' then redis.call('RENAME', history, aside) end
  redis.call('RPUSH', history, entry)
  redis.call('LTRIM', history, -max_history, -1)
end
"""

#: KEYS: state, history, where to keep an unreadable state, where to keep an unreadable
#: history.  ARGV: the halted document, its history record, the events channel, the
#: history's length limit, the largest value read, '1' if the caller last read the state
#: as unreadable.  Keeps a halt already raised (returns 0) unless the caller read it as
#: unreadable (cjson is more lenient than the caller's codec: a "halted" document it
#: accepts may be one the caller refuses, and would then be neither halted again nor
#: cleared); over anything that is not a halt document for either (any type, any
#: content), keeps that aside and writes the halt (returns 2); else writes the halt
#: (returns 1).  ARGV[7]: the signer files (JSON) the caller read the document as
#: recording, or ''; a readable document that records others is not written over
#: (returns 3: the caller reads again), so no writer drops what it records.  Publishes
#: the new document.
HALT = (
    _HALT_HISTORY
    + """
local state, history = KEYS[1], KEYS[2]
local kind = redis.call('TYPE', state)['ok']
local doc = nil
if kind == 'string' and redis.call('STRLEN', state) <= tonumber(ARGV[5]) then
  local ok, decoded = pcall(cjson.decode, redis.call('GET', state))
  if ok and type(decoded) == 'table' and decoded['schema'] == 'conclave.halt/1'
      and type(decoded['halted']) == 'boolean' then
    doc = decoded
  end
end
if doc and doc['halted'] == true and ARGV[6] ~= '1' then return 0 end
local recorded = doc and ARGV[6] ~= '1' and doc['signed_clears']
if type(recorded) == 'table' then
  local assumed = {}
  if ARGV[7] ~= '' then assumed = cjson.decode(ARGV[7]) end
  if assumed['allowed_signers'] ~= recorded['allowed_signers']
      or assumed['revoked'] ~= recorded['revoked'] then
    return 3
  end
end
local kept = 0
if kind ~= 'none' and (not doc or ARGV[6] == '1') then
  redis.call('RENAME', state, KEYS[3])
  kept = 1
end
redis.call('SET', state, ARGV[1])
record(history, KEYS[4], ARGV[2], tonumber(ARGV[4]))
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1 + kept
"""
)

#: KEYS: state, history, where to keep an unreadable history.  ARGV: the value read
#: before ('' for no key), the cleared document, its history record, the events channel,
#: the history's length limit.  Compare and set: writes only if the state is still what
#: the approvers saw (returns 1), else changes nothing (returns 0).
HALT_CLEAR = (
    _HALT_HISTORY
    + """
local state, history = KEYS[1], KEYS[2]
local kind = redis.call('TYPE', state)['ok']
if ARGV[1] == '' then
  if kind ~= 'none' then return 0 end
elseif kind ~= 'string' or redis.call('STRLEN', state) ~= #ARGV[1]
    or redis.call('GET', state) ~= ARGV[1] then
  return 0
end
redis.call('SET', state, ARGV[2])
record(history, KEYS[3], ARGV[3], tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""
)

#: KEYS[1]: where the capacity is recorded, KEYS[2]: where to set it aside if it is not a
#: string; ARGV[1]: this process's.  Records it if none is, and returns {the recorded one,
#: the type set aside or ''} (processes configured differently are warned).
CAPACITY_CLAIM = """
local found = redis.call('TYPE', KEYS[1])['ok']
local corrupt = ''
if found ~= 'none' and found ~= 'string' then
  redis.call('RENAME', KEYS[1], KEYS[2])
  corrupt = found
end
local recorded = redis.call('GET', KEYS[1])
if not recorded then
  redis.call('SET', KEYS[1], ARGV[1])
  return {ARGV[1], corrupt}
end
return {recorded, corrupt}
"""
