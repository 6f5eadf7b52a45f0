"""The Lua scripts behind `RedisCoordination`: each one step, atomic on the Redis server.

Every script starts by checking the namespace's epoch (KEYS[1] must hold ARGV[1]): a Redis that
restarted without persistence, or was flushed, has lost the budget, and must fail the run rather than
start counting from zero. Times come from the server's `TIME` (microseconds), never from a worker's
clock, so workers on different machines agree. Money is in nanodollars (integers, exact in Lua's
doubles up to $9e6); the client rounds reservations and charges up and limits down.

Keys share one hash tag (`{namespace}`), so a Redis Cluster keeps a namespace on one node; scripts that
touch keys they build from a prefix (cache eviction) rely on that.
"""

from __future__ import annotations

_PROLOGUE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function num(x) return tonumber(x) or 0 end
local function int(x) return string.format('%.0f', x) end
"""

# GCRA with zero burst, the arithmetic of `_limiter.RateSchedule`: book the next start slot for every
# worker at once. KEYS: epoch, rate. ARGV: epoch, tokens, ceiling rpm, ceiling tpm (0: none), the most
# microseconds the caller may wait (-1: no bound). Returns {0, wait_us, effective rpm, effective tpm},
# or {1, wait_us, ...} without booking when the slot is further away than the caller may wait.
ACQUIRE = (
    _PROLOGUE
    + """
local now = now_us()
local tokens, rpm, tpm = num(ARGV[2]), num(ARGV[3]), num(ARGV[4])
local s = redis.call('HMGET', KEYS[2], 'req', 'tok', 'pause', 'lrpm', 'ltpm', 'low_until')
local req, tok, pause = num(s[1]), num(s[2]), num(s[3])
if num(s[6]) > now then
  local lr, lt = num(s[4]), num(s[5])
  if lr > 0 and rpm > 0 and lr < rpm then rpm = lr end
  if lt > 0 and tpm > 0 and lt < tpm then tpm = lt end
end
local slot = math.max(now, req, tok, pause)
local most = num(ARGV[5])
if most >= 0 and slot - now > most then return {1, int(slot - now), tostring(rpm), tostring(tpm)} end
if rpm > 0 then req = math.ceil(slot + 60000000 / rpm) end
if tpm > 0 then tok = math.ceil(slot + tokens * 60000000 / tpm) end
redis.call('HSET', KEYS[2], 'req', int(req), 'tok', int(tok))
redis.call('PEXPIRE', KEYS[2], math.ceil((math.max(req, tok, pause, now) - now) / 1000) + 120000)
return {0, int(slot - now), tostring(rpm), tostring(tpm)}
"""
)

# One worker's news for all: lowered limits (from rate-limit headers) that hold for ttl_us, and a pause
# (a 429's Retry-After). KEYS: epoch, rate. ARGV: epoch, rpm, tpm (0: unchanged), ttl_us, pause_us.
ADJUST = (
    _PROLOGUE
    + """
local now = now_us()
local rpm, tpm, ttl, pause_us = num(ARGV[2]), num(ARGV[3]), num(ARGV[4]), num(ARGV[5])
if rpm > 0 then redis.call('HSET', KEYS[2], 'lrpm', tostring(rpm), 'low_until', int(now + ttl)) end
if tpm > 0 then redis.call('HSET', KEYS[2], 'ltpm', tostring(tpm), 'low_until', int(now + ttl)) end
if pause_us > 0 then
  local s = redis.call('HMGET', KEYS[2], 'req', 'tok', 'pause')
  local p = now + pause_us
  if p > num(s[3]) then
    redis.call('HSET', KEYS[2], 'pause', int(p), 'req', int(math.max(num(s[1]), p)),
      'tok', int(math.max(num(s[2]), p)))
  end
end
redis.call('PEXPIRE', KEYS[2], math.ceil(math.max(ttl, pause_us) / 1000) + 120000)
return {0}
"""
)

# The budget. KEYS: epoch, state (hash), leases (zset id -> expiry us), reservations (hash id -> "t:n").
# Every budget script returns {status, totals}, totals comma-separated in this order ('' when unset):
TOTALS = ("st", "sn", "rt", "rn", "in", "out", "cached", "unknown", "requests", "expired", "lt", "ln")
_BUDGET = (
    _PROLOGUE
    + """
local function totals()
  -- one comma-separated string: a dozen array elements would cost the client more to parse
  local v = redis.call('HMGET', KEYS[2], 'st', 'sn', 'rt', 'rn', 'in', 'out', 'cached', 'unknown',
    'requests', 'expired', 'lt', 'ln')
  for i = 1, #v do if not v[i] then v[i] = '' end end
  return table.concat(v, ',')
end
local function incr(field, v)
  -- "%d", not tostring: a negative zero would be "-0", which HINCRBY refuses
  if v ~= 0 then redis.call('HINCRBY', KEYS[2], field, string.format('%d', v)) end
end
local function close(id, mode, i, o, c, n)
  local r = redis.call('HGET', KEYS[4], id)
  if not r then return false end
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[3], id)
  local sep = string.find(r, ':', 1, true)
  local t, rn = tonumber(string.sub(r, 1, sep - 1)), tonumber(string.sub(r, sep + 1))
  incr('rt', -t)
  incr('rn', -rn)
  if mode == 'settle' then
    incr('st', i + o)
    incr('sn', n)
    incr('in', i)
    incr('out', o)
    incr('cached', c)
    incr('requests', 1)
  elseif mode == 'charge' or mode == 'expire' then
    incr('st', t)
    incr('sn', rn)
    incr('unknown', t)
    incr('requests', 1)
    if mode == 'expire' then incr('expired', 1) end
  end
  return true
end
-- A reservation whose lease ran out belongs to a worker that died (or stalled): charge it in full.
local function sweep(now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 512)
  for _, id in ipairs(dead) do
    if not close(id, 'expire', 0, 0, 0, 0) then redis.call('ZREM', KEYS[3], id) end
  end
end
"""
)

# Store the namespace's limits the first time, then hand back what is stored (the caller compares).
# ARGV: epoch, limit tokens, limit nano ('' = none, -1 = unlimited).
BUDGET_INIT = (
    _BUDGET
    + """
if ARGV[2] ~= '' then
  redis.call('HSETNX', KEYS[2], 'lt', ARGV[2])
  redis.call('HSETNX', KEYS[2], 'ln', ARGV[3])
end
sweep(now_us())
return {0, totals()}
"""
)

# ARGV: epoch, id, tokens, nano, lease_us. Status 0: reserved; 1: wait (in flight holds the room);
# 2: never (even with nothing in flight it does not fit).
RESERVE = (
    _BUDGET
    + """
local now = now_us()
sweep(now)
local t, n = num(ARGV[3]), num(ARGV[4])
local s = redis.call('HMGET', KEYS[2], 'st', 'sn', 'rt', 'rn', 'lt', 'ln')
local st, sn, rt, rn = num(s[1]), num(s[2]), num(s[3]), num(s[4])
local lt, ln = tonumber(s[5]) or -1, tonumber(s[6]) or -1
if (lt >= 0 and st + t > lt) or (ln >= 0 and sn + n > ln) then return {2, totals()} end
if (lt >= 0 and st + rt + t > lt) or (ln >= 0 and sn + rn + n > ln) then return {1, totals()} end
incr('rt', t)
incr('rn', n)
redis.call('HSET', KEYS[4], ARGV[2], int(t) .. ':' .. int(n))
redis.call('ZADD', KEYS[3], now + num(ARGV[5]), ARGV[2])
return {0, totals()}
"""
)

# ARGV: epoch, id, mode (settle | release | charge), input, output, cached, nano.
# Status 0: closed now; 3: already closed (its lease expired and it was charged in full).
CLOSE = (
    _BUDGET
    + """
local ok = close(ARGV[2], ARGV[3], num(ARGV[4]), num(ARGV[5]), num(ARGV[6]), num(ARGV[7]))
return {ok and 0 or 3, totals()}
"""
)

# ARGV: epoch, lease_us, ids... Extends the leases of reservations still open.
RENEW = (
    _BUDGET
    + """
local until_ = now_us() + num(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[3], 'XX', until_, ARGV[i]) end
return {0, totals()}
"""
)

# The cache. KEYS: epoch, value, flight. ARGV: epoch, owner, lease_ms, claim (1/0).
# Status 1: hit (value follows); 2: this owner computes it; 3: another owner is computing it; 0: miss.
LOOKUP = (
    _PROLOGUE
    + """
local v = redis.call('GET', KEYS[2])
if v then return {1, v} end
if ARGV[4] ~= '1' then return {0} end
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2} end
if redis.call('GET', KEYS[3]) == ARGV[2] then return {2} end
return {3}
"""
)

# KEYS: epoch, value, flight, index. ARGV: epoch, owner, value, ttl_ms, max entries, digest, prefix.
# The cap is exact: the index (zset digest -> insertion ms) evicts the oldest entries first.
PUT = (
    _PROLOGUE
    + """
local now = math.floor(now_us() / 1000)
local ttl = num(ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
redis.call('ZADD', KEYS[4], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
local extra = redis.call('ZCARD', KEYS[4]) - num(ARGV[5])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[4], extra)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[7] .. old[i]) end
end
redis.call('PEXPIRE', KEYS[4], ttl)
return {0}
"""
)

# KEYS: epoch. ARGV: epoch, owner, lease_ms (0: give the claims up), flight prefix, digests...
CLAIMS = (
    _PROLOGUE
    + """
for i = 5, #ARGV do
  local k = ARGV[4] .. ARGV[i]
  if redis.call('GET', k) == ARGV[2] then
    if ARGV[3] == '0' then redis.call('DEL', k) else redis.call('PEXPIRE', k, ARGV[3]) end
  end
end
return {0}
"""
)

SCRIPTS = {
    "acquire": ACQUIRE,
    "adjust": ADJUST,
    "budget_init": BUDGET_INIT,
    "reserve": RESERVE,
    "close": CLOSE,
    "renew": RENEW,
    "lookup": LOOKUP,
    "put": PUT,
    "claims": CLAIMS,
}
