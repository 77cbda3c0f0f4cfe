-- tollgate's Redis script: a batch of limiter operations decided atomically, on Redis time.
--
-- The store prepends a header defining Q, the limiter's rate quotas in order:
--   Q[i] = { algo (1 GCRA, 2 fixed window, 3 sliding window), A (amount), P (period in
--            units), cap (capacity), u (unit in microseconds), fp (the quota's
--            fingerprint, naming its record), shared (bool), mw (the longest the quota
--            may hold a call back, microseconds; -1: no limit of its own) }
-- so the script's SHA names the exact configuration.
--
-- Numbers are Lua doubles: every integer the math produces stays below 2^53 (the store
-- picks each quota's time unit so capacity x period fits with room for reservations), so
-- the arithmetic is exact. Each identity's states live in one string, one 56-byte record
-- per quota (its fingerprint, then six doubles: {a, b, c, max_start, charged, version}).
--   GCRA:    a = tat's whole units, b = tat's fraction x A (0 <= b < A), c = a stamp
--            naming this state's lifetime (refunds apply only to the state they were
--            charged on, never to one created after the key expired)
--   fixed:   a = window index, b = count in it
--   sliding: a = window index, b = previous window's count, c = current window's count
-- charged counts units (mod 2^50) to size safe refunds; version counts changes, so a
-- cancel can restore the exact prior state when nothing changed it since.

local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local spack, sunpack, sub = struct.pack, struct.unpack, string.sub
local rcall = redis.call
local TWO50 = 1125899906842624
local LIMIT = 9007199254740991

local tm = rcall('TIME')
local now_us = tonumber(tm[1]) * 1000000 + tonumber(tm[2])

local function fdiv(x, d)
  -- y - y % 1 is floor(y), exactly, without a function call.
  local q = x / d
  q = q - q % 1
  local r = x - q * d
  if r < 0 then
    q = q - 1
    r = r + d
  elseif r >= d then
    q = q + 1
    r = r - d
  end
  return q, r
end

local function cdiv(x, d)
  local q, r = fdiv(x, d)
  if r > 0 then
    q = q + 1
  end
  return q
end

-- A fresh state's version starts at the time (µs mod 2^40, times 4096: below 2^53 so
-- +1 stays exact), so a state created again later never repeats the versions of an
-- earlier one (that would take more than 4,096 changes per microsecond).
local function fresh()
  return {0, 0, 0, 0, 0, (now_us % 1099511627776) * 4096, fresh = true}
end

local function unpack_state(v)
  if v then
    local a, b, c, m, ch, ver = sunpack('<dddddd', v)
    return {a, b, c, m, ch, ver}
  end
  return fresh()
end

local function pack_state(s)
  return spack('<dddddd', s[1], s[2], s[3], s[4], s[5], s[6])
end

-- GCRA: how far (units x A) tat lies past t; negative when tat < t.
local function lead(s, q, t)
  if s[1] < t then
    return -1
  end
  return (s[1] - t) * q.A + s[2]
end

-- Earliest start (units) at or after now for c units, and whether it is schedulable.
local function earliest(s, q, now, c)
  local e
  if q.algo == 1 then
    local l = 0
    if s[1] >= now then
      l = (s[1] - now) * q.A + s[2]
    end
    if l + c * q.P > LIMIT then
      return now + cdiv(l, q.A), false
    end
    local need = l + (c - q.cap) * q.P
    if need <= 0 then
      e = now
    else
      e = now + cdiv(need, q.A)
    end
    if e < s[4] then
      e = s[4]
    end
    return e, true
  elseif q.algo == 2 then
    local w = max(floor(now / q.P), s[1])
    local used = 0
    if w == s[1] then
      used = s[2]
    end
    if used + c <= q.cap then
      e = max(now, w * q.P)
    else
      e = (w + 1) * q.P
    end
  else
    local w = max(floor(now / q.P), s[1])
    local prev, curr = 0, 0
    if w == s[1] then
      prev, curr = s[2], s[3]
    elseif w == s[1] + 1 then
      prev = s[3]
    end
    local function min_offset(p, room)
      if p <= room then
        return 0
      end
      return q.P - floor(room * q.P / p)
    end
    local ws = w * q.P
    local room = q.cap - (curr + c)
    if room >= 0 then
      e = max(max(now, ws), ws + min_offset(prev, room))
    else
      e = ws + q.P + min_offset(curr, q.cap - c)
    end
  end
  return max(e, s[4]), true
end

-- Charge c units starting at `start` (units); returns the refund snapshot. `first` is
-- the start rounded down (GCRA charges from the start rounded up, which is safe, but
-- later callers may start from the one rounded down: FIFO to within one unit).
local function apply(s, q, start, c, first)
  -- Only when set: in Lua 5.1, assigning nil to an absent key still inserts it (a
  -- table resize and an allocation for every state read from Redis).
  if s.fresh then
    s.fresh = nil
  end
  first = first or start
  if s[4] < first then
    s[4] = first
  end
  local ch = s[5] + c
  if ch >= TWO50 then
    ch = ch % TWO50
  end
  s[5] = ch
  s[6] = s[6] + 1
  if q.algo == 1 then
    if s[3] == 0 then
      s[3] = s[6]
    end
    if s[1] < start or (s[1] == start and s[2] == 0) then
      s[1] = start
      s[2] = 0
    end
    local qq, r = fdiv(s[2] + c * q.P, q.A)
    s[1] = s[1] + qq
    s[2] = r
    return s[5]
  end
  local w = floor(start / q.P)
  if q.algo == 2 then
    if w > s[1] then
      s[1] = w
      s[2] = 0
    end
    s[2] = s[2] + c
  else
    if w > s[1] then
      if w == s[1] + 1 then
        s[2] = s[3]
      else
        s[2] = 0
      end
      s[3] = 0
      s[1] = w
    end
    s[3] = s[3] + c
  end
  return s[1]
end

-- Give back up to `units` of a call charged with snapshot `snap`, never capacity that
-- has refilled since (GCRA), never to a window no longer weighed (windows).
local function refund(s, q, now, units, snap, stamp)
  if units <= 0 or (q.algo == 1 and s[3] ~= stamp) then
    return
  end
  -- Any change ends exact restores of earlier reservations: restoring a state from
  -- before this refund would take it back.
  s[6] = s[6] + 1
  if s.fresh then
    s.fresh = nil
  end
  if q.algo == 1 then
    local after = (s[5] - snap) % TWO50
    -- s[4] is the latest start rounded down; one unit more bounds it from above.
    local b = max(now, s[4] + 1)
    local l = lead(s, q, b)
    if l <= 0 then
      return
    end
    local new = max(l - units * q.P, min(l, after * q.P))
    local qq, r = fdiv(new, q.A)
    s[1] = b + qq
    s[2] = r
  elseif q.algo == 2 then
    if snap == s[1] then
      s[2] = max(0, s[2] - units)
    end
  else
    if snap == s[1] then
      s[3] = max(0, s[3] - units)
    elseif snap + 1 == s[1] then
      s[2] = max(0, s[2] - units)
    end
  end
end

-- Units remaining at now and units until fully replenished.
local function status(s, q, now)
  if q.algo == 1 then
    local l = max(0, lead(s, q, now))
    local level = q.cap * q.P - l
    local rem = 0
    if level > 0 then
      rem = floor(level / q.P)
    end
    return rem, cdiv(l, q.A)
  end
  local w = max(floor(now / q.P), s[1])
  if q.algo == 2 then
    local used = 0
    if w == s[1] then
      used = s[2]
    end
    local reset = 0
    if used > 0 then
      reset = (w + 1) * q.P - now
    end
    return max(0, q.cap - used), reset
  end
  local prev, curr = 0, 0
  if w == s[1] then
    prev, curr = s[2], s[3]
  elseif w == s[1] + 1 then
    prev = s[3]
  end
  local x = max(now, w * q.P) - w * q.P
  local used = cdiv(prev * (q.P - x), q.P) + curr
  local left = 0
  if curr > 0 then
    left = 2
  elseif prev > 0 then
    left = 1
  end
  local reset = 0
  if left > 0 then
    reset = max(0, (w + left) * q.P - now)
  end
  return max(0, q.cap - used), reset
end

-- Microseconds from now until forgetting the state changes nothing.
local function horizon(s, q, now)
  local h
  if q.algo == 1 then
    h = s[1] + 1 - now
  elseif q.algo == 2 then
    h = (s[1] + 1) * q.P - now
  else
    h = (s[1] + 2) * q.P - now
  end
  if h < s[4] - now then
    h = s[4] - now
  end
  return h * q.u
end

-- The quotas an operation covers: part 1 per key, 2 shared, 3 both.
local KQ, SQ, ALL, BYFP = {}, {}, {}, {}
for i = 1, #Q do
  local q = Q[i]
  if q.shared then
    SQ[#SQ + 1] = i
  else
    KQ[#KQ + 1] = i
  end
  ALL[i] = i
  BYFP[q.fp] = i
  q.nf = floor(now_us / q.u)
  q.nc = cdiv(now_us, q.u)
end
local PART = {KQ, SQ, ALL}

-- Each identity (and the shared quotas) is one string: a 56-byte record per quota,
-- {fingerprint, six state numbers}. Records of quotas this configuration does not know
-- (another version of the application, mid-deploy) are kept as they are.
local REC = '<ddddddd'
local cache, order = {}, {}

-- The whole-string format of n records.
local FMT = {}
for n = 1, #Q do
  FMT[n] = '<' .. string.rep('d', 7 * n)
end

-- The states of `group` (KQ or SQ) under `key`, read once per batch.
local function entry(key, group)
  local e = cache[key]
  if e then
    return e
  end
  local st = {}
  e = {st = st, other = '', dirty = false, group = group}
  local v = rcall('GET', key)
  local n = #group
  if v and #v == 56 * n then
    -- The usual case: exactly this configuration's records, in order.
    local r = {sunpack(FMT[n], v)}
    for j = 1, #group do
      local i = group[j]
      local b = 7 * (j - 1)
      if r[b + 1] ~= Q[i].fp then
        r = nil
        break
      end
      st[i] = {r[b + 2], r[b + 3], r[b + 4], r[b + 5], r[b + 6], r[b + 7]}
    end
    if not r then
      st = {}
      e.st = st
    else
      v = nil
    end
  end
  if v then
    local p, others = 1, {}
    while p + 55 <= #v do
      local fp, a, b, c, m, ch, ver, nxt = sunpack(REC, v, p)
      local i = BYFP[fp]
      if i and Q[i].shared == (group == SQ) then
        st[i] = {a, b, c, m, ch, ver}
      else
        others[#others + 1] = sub(v, p, nxt - 1)
      end
      p = nxt
    end
    e.other = table.concat(others)
  end
  for g = 1, #group do
    local i = group[g]
    if not st[i] then
      st[i] = fresh()
    end
  end
  cache[key] = e
  order[#order + 1] = key
  return e
end

-- The states an operation on `part` covers, by quota index.
local function load(kkey, skey, part)
  local own = part ~= 2 and #KQ > 0
  local shared = part ~= 1 and #SQ > 0
  if own and not shared then
    return entry(kkey, KQ).st
  end
  if shared and not own then
    return entry(skey, SQ).st
  end
  local states = {}
  if own then
    for i, st in pairs(entry(kkey, KQ).st) do
      states[i] = st
    end
    for i, st in pairs(entry(skey, SQ).st) do
      states[i] = st
    end
  end
  return states
end

-- Mark the entries an operation on `part` changed, to be written back.
local function touch(kkey, skey, part)
  if part ~= 2 and #KQ > 0 then
    cache[kkey].dirty = true
  end
  if part ~= 1 and #SQ > 0 then
    cache[skey].dirty = true
  end
end

-- Replace quota i's state (an exact restore) wherever it is cached.
local function replace(kkey, skey, i, s)
  local key = kkey
  if Q[i].shared then
    key = skey
  end
  cache[key].st[i] = s
end

-- Write every changed entry back once, expiring when all its states are idle.
local VALS = {}
local function flush()
  for k = 1, #order do
    local key = order[k]
    local e = cache[key]
    if e.dirty then
      local ttl = 1
      local group = e.group
      local st = e.st
      local b = 0
      for g = 1, #group do
        local i = group[g]
        local q, s = Q[i], st[i]
        VALS[b + 1], VALS[b + 2], VALS[b + 3], VALS[b + 4] = q.fp, s[1], s[2], s[3]
        VALS[b + 5], VALS[b + 6], VALS[b + 7] = s[4], s[5], s[6]
        b = b + 7
        local h = horizon(s, q, q.nf)
        if h > ttl then
          ttl = h
        end
      end
      local v = spack(FMT[#group], unpack(VALS, 1, b))
      local ms = ceil(ttl / 1000) + 1000
      if ms > 1099511627776 then
        ms = 1099511627776
      end
      if e.other ~= '' then
        -- Another configuration's records: never expire them sooner than they would.
        v = v .. e.other
        ms = max(ms, rcall('PTTL', key))
      end
      rcall('PSETEX', key, ms, v)
    end
  end
end

-- Each operation is one binary argument: a letter, then little-endian doubles, then any
-- byte strings (whose lengths are among the doubles). One argument per operation keeps
-- Redis from building a Lua string per number.
local op, pos = '', 1
local function num()
  local v
  v, pos = sunpack('<d', op, pos)
  return v
end
local function str(len)
  local v = sub(op, pos, pos + len - 1)
  pos = pos + len
  return v
end
local RFMT = '<' .. string.rep('d', 5 + #Q)

-- R kidx sidx part max_wait_us flags (c_i for each quota); flags: 1 undo, 2 status
-- The reply is one string of little-endian doubles (Redis turns a table of numbers into a
-- nested reply for a sizeable share of the script's time; one string costs next to
-- nothing). Admitted: 1, wait_us, then per quota snap and stamp (-1, 0 when not
-- charged), and with undo also version and the length of the prior packed state (0 when
-- fresh), then with status per quota remaining and reset_us after the charge (-1, -1
-- when not covered); then the prior states' bytes in quota order. Refused: 0, quota,
-- retry_us, remaining, reset_us, naming the first quota that would hold the call back
-- longer than its own mw, else the one that sets the start. A quota the call does not
-- charge (c_i = 0) neither limits nor records it, as in the memory store.
local DFMT = {}
local function doubles(t, n)
  local f = DFMT[n]
  if not f then
    f = '<' .. string.rep('d', n)
    DFMT[n] = f
  end
  return spack(f, unpack(t, 1, n))
end
local function op_reserve()
  local charges = {sunpack(RFMT, op, 2)}
  local kkey, skey, part, maxw, flags = KEYS[charges[1]], KEYS[charges[2]], charges[3], charges[4], charges[5]
  local undo = flags % 2
  for i = 1, #Q do
    charges[i] = charges[i + 5]
  end
  local states = load(kkey, skey, part)
  local covered = PART[part]
  local start_us, bind, ok, over = now_us, 0, true, 0
  for c = 1, #covered do
    local i = covered[c]
    if charges[i] > 0 then
      local q = Q[i]
      local e, sched = earliest(states[i], q, q.nf, charges[i])
      local e_us = e * q.u
      if not sched then
        ok = false
      end
      if e_us > start_us then
        start_us = e_us
        bind = i
      elseif not sched and bind == 0 then
        bind = i
      end
      if over == 0 and q.mw >= 0 and e_us - now_us > q.mw then
        over = i
      end
    end
  end
  if ok and over > 0 then
    bind = over
  end
  if not ok or over > 0 or (maxw >= 0 and start_us - now_us > maxw) then
    local q = Q[bind]
    local rem, reset = status(states[bind], q, q.nf)
    return spack('<ddddd', 0, bind, start_us - now_us, rem, reset * q.u)
  end
  touch(kkey, skey, part)
  local out, n, priors = {1, start_us - now_us}, 2, nil
  for i = 1, #Q do
    local q = Q[i]
    local s = states[i]
    if s and charges[i] > 0 and (part == 3 or (part == 2) == q.shared) then
      local prior = ''
      if undo == 1 and not s.fresh then
        prior = pack_state(s)
      end
      local first, st = start_us, start_us
      if q.u ~= 1 then
        first = floor(start_us / q.u)
        st = first
        if q.algo == 1 then
          st = cdiv(start_us, q.u)
        end
      end
      out[n + 1] = apply(s, q, st, charges[i], first)
      out[n + 2] = 0
      if q.algo == 1 then
        out[n + 2] = s[3]
      end
      n = n + 2
      if undo == 1 then
        out[n + 1] = s[6]
        out[n + 2] = #prior
        n = n + 2
        priors = priors or {}
        priors[#priors + 1] = prior
      end
    else
      out[n + 1] = -1
      out[n + 2] = 0
      n = n + 2
      if undo == 1 then
        out[n + 1] = 0
        out[n + 2] = 0
        n = n + 2
      end
    end
  end
  if flags >= 2 then
    for i = 1, #Q do
      local q, s = Q[i], states[i]
      if s then
        local rem, reset = status(s, q, q.nf)
        out[n + 1] = rem
        out[n + 2] = reset * q.u
      else
        out[n + 1] = -1
        out[n + 2] = -1
      end
      n = n + 2
    end
  end
  if priors then
    return doubles(out, n) .. table.concat(priors)
  end
  return doubles(out, n)
end

-- C kidx sidx part (units_i snap_i version_i stamp_i priorlen_i for each quota), priors
local function op_cancel()
  local kkey, skey, part = KEYS[num()], KEYS[num()], num()
  local args = {}
  for i = 1, #Q do
    args[i] = {num(), num(), num(), num(), num()}
  end
  for i = 1, #Q do
    args[i][5] = str(args[i][5])
  end
  local states = load(kkey, skey, part)
  touch(kkey, skey, part)
  local covered = PART[part]
  for c = 1, #covered do
    local i = covered[c]
    local q, a, s = Q[i], args[i], states[i]
    if a[1] == 0 then
      -- not charged by this call
    elseif a[3] > 0 and s[6] == a[3] then
      local r
      if a[5] == '' then
        r = fresh()
      else
        r = unpack_state(a[5])
      end
      replace(kkey, skey, i, r)
    else
      refund(s, q, q.nc, a[1], a[2], a[4])
    end
  end
  return 1
end

-- S kidx sidx part (refund_i extra_i snap_i stamp_i for each quota)
local function op_settle()
  local kkey, skey, part = KEYS[num()], KEYS[num()], num()
  local args = {}
  for i = 1, #Q do
    args[i] = {num(), num(), num(), num()}
  end
  local states = load(kkey, skey, part)
  touch(kkey, skey, part)
  local covered = PART[part]
  for c = 1, #covered do
    local i = covered[c]
    local q, a, s = Q[i], args[i], states[i]
    refund(s, q, q.nc, a[1], a[3], a[4])
    if a[2] > 0 then
      local t = q.nf
      if q.algo == 1 then
        t = q.nc
      end
      apply(s, q, t, a[2], q.nf)
    end
  end
  return 1
end

-- T kidx sidx part: per quota remaining and reset_us (-1, -1 when not covered)
local function op_status()
  local kkey, skey, part = KEYS[num()], KEYS[num()], num()
  local states = load(kkey, skey, part)
  local out = {}
  for i = 1, #Q do
    local q = Q[i]
    local s = states[i]
    if s then
      local rem, reset = status(s, q, q.nf)
      out[#out + 1] = rem
      out[#out + 1] = reset * q.u
    else
      out[#out + 1] = -1
      out[#out + 1] = -1
    end
  end
  return out
end

-- A lease set expires one second after its latest lease (whatever each process's lease).
local function expire_leases(zkey)
  local top = rcall('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if top[2] then
    rcall('PEXPIRE', zkey, max(1, ceil((tonumber(top[2]) - now_us) / 1000)) + 1000)
  end
end

-- L zkey - limit lease_us idlen, id: take a concurrency slot (a lease expiring on Redis time)
local function op_lease()
  local zkey = KEYS[num()]
  num()
  local limit, lease, idlen = num(), num(), num()
  local id = str(idlen)
  rcall('ZREMRANGEBYSCORE', zkey, '-inf', now_us)
  local n = rcall('ZCARD', zkey)
  if rcall('ZSCORE', zkey, id) then
    n = n - 1
  end
  if n >= limit then
    return {0, n}
  end
  rcall('ZADD', zkey, now_us + lease, id)
  expire_leases(zkey)
  return {1, n + 1}
end

-- N zkey - lease_us limit idlen, id: renew a held lease. One lost meanwhile (expired
-- during an outage, or Redis restarted) is taken again if a slot is free: 1 renewed,
-- 2 taken again, 0 lost with every slot held (the call goes on over the limit; logged).
local function op_renew()
  local zkey = KEYS[num()]
  num()
  local lease, limit, idlen = num(), num(), num()
  local id = str(idlen)
  local r = 1
  if rcall('ZADD', zkey, 'XX', 'CH', now_us + lease, id) == 0 then
    rcall('ZREMRANGEBYSCORE', zkey, '-inf', now_us)
    if rcall('ZCARD', zkey) < limit then
      rcall('ZADD', zkey, now_us + lease, id)
      r = 2
    else
      redis.log(redis.LOG_WARNING, 'tollgate: a concurrency lease in ' .. zkey ..
        ' was lost (expired) while its call ran, and every slot is now held')
      r = 0
    end
  end
  expire_leases(zkey)
  return r
end

-- D zkey - idlen, id: give a slot back
local function op_release()
  local zkey = KEYS[num()]
  num()
  local id = str(num())
  return rcall('ZREM', zkey, id)
end

-- F zkey -: free slots now
local function op_free()
  local zkey = KEYS[num()]
  num()
  rcall('ZREMRANGEBYSCORE', zkey, '-inf', now_us)
  return rcall('ZCARD', zkey)
end

local ops = {R = op_reserve, C = op_cancel, S = op_settle, T = op_status, L = op_lease,
  N = op_renew, D = op_release, F = op_free}
local replies, from = {}, 1
if sub(ARGV[1] or '', 1, 1) == '!' then
  -- A cluster batch's id: claimed once, so a batch re-sent after a lost reply is refused
  -- rather than applied twice.
  op, pos = ARGV[1], 2
  if not rcall('SET', KEYS[num()], '1', 'NX', 'PX', 60000) then
    return redis.error_reply('ERR tollgate: this batch was already applied')
  end
  from = 2
end
for k = from, #ARGV do
  op, pos = ARGV[k], 2
  local f = ops[sub(op, 1, 1)]
  if not f then
    return redis.error_reply('tollgate: unknown operation')
  end
  -- One operation's error (a foreign key of another type under the prefix) fails that
  -- operation only; it fails before changing anything, so the others go on.
  local ok, r = pcall(f)
  if ok then
    replies[#replies + 1] = r
  else
    -- A plain string marks it (an error reply inside the array would fail the batch).
    replies[#replies + 1] = 'tollgate error: ' .. tostring(r)
  end
end
flush()
return replies
