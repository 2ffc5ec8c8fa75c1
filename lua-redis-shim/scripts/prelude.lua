-- prelude.lua: helpers shared by the algorithm scripts (see main.lua for how the shim composes
-- prelude, algorithms and main into the one script it loads).
--
-- Returns a table H: now_ms(), now_us(), try_now_ms(), muldiv(), int(), clamp_ms(), grant(), NEVER,
-- and the call's counters: counter(), charge(), pttl(), buckets(), charge_bucket(),
-- flush_counters().
--
-- Time: one Redis `TIME` per script run, read on first use and then shared by every check of
-- every request of the call, so all of them see the same instant (or the instant the shim's
-- test clock names, see H.reset). main.lua reports it to the
-- gateway (try_now_ms), reading it last when no check did (fixed and sliding windows never
-- use it).
--
-- Precision: Lua numbers are doubles, exact for integers below 2^53 (9.007e15). Products that
-- can pass that (a counter times a window in ms, elapsed ms times a rate times 1000) go through
-- muldiv(), exact whenever its result is below 2^53. Values passed to redis.call() go through
-- int() ("%.0f"), since Redis formats a Lua number argument with "%.17g" (1e+17 is not an integer
-- to INCRBY or PEXPIRE). Times that could pass 2^52 ms (only absurd configurations, e.g. a
-- bucket of 10^12 tokens refilled one per day) are capped by clamp_ms().

-- luacheck: read globals redis
local call = redis.call
local pcall_ = redis.pcall
local tonumber = tonumber
local floor = math.floor
local format = string.format
local pairs = pairs
local error = error
local unpack = unpack

local H = {}

-- tollgate.bounds.LEASE_SHARE and COUNTER_GRACE_MS, which the shim passes when it composes
-- the script.
local LEASE_SHARE, COUNTER_GRACE_MS = ...
H.COUNTER_GRACE_MS = COUNTER_GRACE_MS

-- Returned in place of a time when it will never come: a cost above the limit. The shim sends
-- it as 18446744073709551615 (u64::MAX, as the Rust models in src/algorithms.rs do).
H.NEVER = -1

local TWO53 = 9007199254740992
-- The largest TTL or time reported: 2^52 ms (~142,000 years), well inside Redis's limits.
local MAX_MS = 4503599627370496

local clock_ms, clock_us

local function read_clock(t)
    t = t or call("TIME")
    local sec, usec = tonumber(t[1]), tonumber(t[2])
    clock_us = sec * 1000000 + usec
    clock_ms = sec * 1000 + floor(usec / 1000)
end

--- Milliseconds since the epoch, from Redis's clock.
function H.now_ms()
    if not clock_ms then
        read_clock()
    end
    return clock_ms
end

--- H.now_ms(), or nil when Redis refuses TIME to this ACL user. Such a user can still run
-- fixed and sliding windows (they never read the clock); the others fail on H.now_ms().
function H.try_now_ms()
    if not clock_ms then
        local t = pcall_("TIME")
        if t.err then
            return nil
        end
        read_clock(t)
    end
    return clock_ms
end

--- Microseconds since the epoch, from Redis's clock (exact until 2255).
function H.now_us()
    if not clock_us then
        read_clock()
    end
    return clock_us
end

--- floor(a × b / c), or the ceiling when `up`: a, b integers in 0..2^53, c in 1..3×10^15.
-- Exact whenever the result is below 2^53 (a larger result is only approximately right).
function H.muldiv(a, b, c, up)
    local p = a * b
    if p < TWO53 then
        -- p is exact; p / c rounds to within one of the true quotient, so correct it once.
        local q = floor(p / c)
        if q * c > p then
            q = q - 1
        end
        if up and q * c < p then
            q = q + 1
        end
        return q
    end
    -- a × b / c = qa × b + ra × b / c, where a = qa × c + ra; then ra × b / c by long division
    -- over the bits of b, every intermediate below 3c (exact while c < 3×10^15).
    local qa = floor(a / c)
    local ra = a - qa * c
    if ra < 0 then
        qa, ra = qa - 1, ra + c
    end
    local bits, n, rest = {}, 0, b
    while rest > 0 do
        local bit = rest % 2
        n = n + 1
        bits[n] = bit
        rest = (rest - bit) / 2
    end
    local q, r = 0, 0
    for i = n, 1, -1 do
        r = 2 * r + ra * bits[i]
        local d = floor(r / c)
        r = r - d * c
        q = 2 * q + d
    end
    if up and r > 0 then
        q = q + 1
    end
    return qa * b + q
end

--- A Redis command argument from an integer-valued number. "%.0f", not "%d": Lua 5.1 turns a
-- number past 2^63 into INT64_MIN with "%d" (a GCRA TAT of an absurd but valid limit then read
-- back as long past, admitting the whole burst again), where "%.0f" writes its digits.
function H.int(n)
    return format("%.0f", n)
end

-- Counters (the string counters of fixed and sliding windows). A hot key is usually checked
-- by many requests of one call, so each counter is read once per call (GET, and PTTL when a
-- reply needs it) and charged once, at the end (INCRBY of the sum, PEXPIRE if it is new or
-- has no TTL): a few commands per key per call instead of three per check. Checks see the
-- charges of earlier requests of the call in `count`, exactly as if each had been written at
-- once; Redis runs the script to completion, so nobody else can tell the difference.
-- Set by H.reset(), which main.lua calls first on every call.
local counters

--- The call's state of counter `k`: count (charges of this call included), exists, charge.
-- A value that is not an integer (written by someone else) fails the script: a 503.
function H.counter(k)
    local c = counters[k]
    if not c then
        local v = call("GET", k)
        local count = tonumber(v or 0)
        if not count or count ~= floor(count) then
            error("tollgate: " .. k .. " does not hold an integer counter")
        end
        c = { count = count, exists = v ~= false, charge = 0 }
        counters[k] = c
    end
    return c
end

--- Charges `cost` to counter `c` (from H.counter); `ttl_ms` is its lifetime if it is new.
-- Returns the count after the charge.
function H.charge(c, cost, ttl_ms)
    c.count = c.count + cost
    c.charge = c.charge + cost
    c.ttl_ms = c.ttl_ms or ttl_ms
    return c.count
end

--- Counter `k`'s remaining TTL in ms as it stands in Redis (-1: none, -2: no key), read once.
function H.pttl(k, c)
    if not c.exists then
        return -2
    end
    if not c.pttl then
        c.pttl = call("PTTL", k)
    end
    return c.pttl
end

-- Sub-window hashes (sliding_window_bounded): field = sub-window index, value = its count.
-- Like the counters, each is read once per call (HGETALL) and written once, at the end: the
-- call's charges (all in the current sub-window, since every check of a call sees one TIME),
-- and, on the first charge of a sub-window, the sub-windows that have left deleted and the TTL
-- moved to when the new one leaves. Later charges of that sub-window find the TTL already
-- there: the script that created the field set it, and a script's writes replicate together.
local hashes -- H.reset()

--- The call's state of hash `k`: counts (index → count, charges of this call included).
-- A field or value that is not an integer (written by someone else) fails the script: a 503.
function H.buckets(k)
    local b = hashes[k]
    if not b then
        local flat = call("HGETALL", k)
        local counts = {}
        for i = 1, #flat, 2 do
            local idx, v = tonumber(flat[i]), tonumber(flat[i + 1])
            if not idx or not v or idx ~= floor(idx) or v ~= floor(v) then
                error("tollgate: " .. k .. " does not hold sub-window counters")
            end
            counts[idx] = v
        end
        b = { counts = counts, charge = 0, read = {} }
        for i in pairs(counts) do
            b.read[i] = true
        end
        hashes[k] = b
    end
    return b
end

--- Records a charge of `cost` to sub-window `j` of hash `b` (from H.buckets, whose counts the
-- caller has updated): sub-windows before `first` have left; the hash lives `ttl_ms` more.
function H.charge_bucket(b, j, cost, first, ttl_ms)
    b.charge = b.charge + cost
    b.index, b.first, b.ttl_ms = j, first, ttl_ms
end

local function flush_hashes()
    for k, b in pairs(hashes) do
        if b.charge > 0 then
            call("HINCRBY", k, H.int(b.index), H.int(b.charge))
            if not b.read[b.index] then
                -- One HDEL for every sub-window that has left (usually one, or none).
                local gone, n = {}, 0
                for i in pairs(b.counts) do
                    if i < b.first then
                        n = n + 1
                        gone[n] = H.int(i)
                    end
                end
                if n > 0 then
                    call("HDEL", k, unpack(gone))
                end
                call("PEXPIRE", k, H.int(b.ttl_ms))
            end
        end
    end
end

--- Writes the call's charges: one INCRBY per charged counter, and a PEXPIRE for a new one
-- or one without expiry (set by hand, or a PEXPIRE lost in a failover) that would otherwise
-- block its key forever; then the sub-window hashes' (H.buckets above). main.lua calls
-- it once, after the last request.
function H.flush_counters()
    flush_hashes()
    for k, c in pairs(counters) do
        if c.charge > 0 then
            call("INCRBY", k, H.int(c.charge))
            local pttl = H.pttl(k, c)
            if pttl < 0 then
                call("PEXPIRE", k, H.int(c.ttl_ms))
            end
        end
    end
end

--- Forgets the previous call's state (clock reading, counters). A script's body runs afresh on
-- every EVALSHA, but a function library (FCALL) is loaded once and its state lives on: main.lua
-- calls this first, so both run the same. `test_now_ms` (a string of digits, or nil): the
-- instant this call uses instead of TIME; only the shim's test clock (TOLLGATE_TEST_CLOCK)
-- sends one.
function H.reset(test_now_ms)
    clock_ms, clock_us = nil, nil
    if test_now_ms then
        clock_ms = tonumber(test_now_ms)
        clock_us = clock_ms * 1000
    end
    counters = {}
    hashes = {}
end

--- The units a lease may take when `room` is left after the call's requests: at most `want`,
-- and at most 1/LEASE_SHARE of the room (none when less than LEASE_SHARE is left).
function H.grant(room, want)
    local g = floor(room / LEASE_SHARE)
    if g > want then
        g = want
    end
    return g > 0 and g or 0
end

--- A time in ms capped at 2^52 (TTLs and reported times).
function H.clamp_ms(ms)
    if ms > MAX_MS then
        return MAX_MS
    end
    return ms
end

return H
