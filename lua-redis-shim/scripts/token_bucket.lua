-- token_bucket.lua: `burst` tokens, refilled at `rate` per `period_ms`, in thousandths of a
-- token so slow rates keep their fractions. Time comes from Redis (TIME). Model: token_bucket
-- in src/algorithms.rs.
--
-- KEYS:  key
-- ARGV:  burst, rate, period_ms
-- State: a hash {t = milli-tokens, ts = Redis time in ms of t}; a missing bucket is full.
--        PEXPIRE on every charge: the time until it is full again + 1000 ms, after which a
--        missing bucket means the same thing. Memory: one small hash (listpack), ~140 bytes
--        with a 50-byte key.
-- Check: tokens = min(t + floor(elapsed × rate × 1000 / period_ms), burst × 1000);
--        fits iff tokens >= cost × 1000. Commit: HSET t tokens − cost × 1000, ts now.
-- Reply: count is not reported; limit is burst; remaining = whole tokens left; reset_ms = ms
--        until full; retry_after_ms = ms until cost tokens are there (never if cost > burst).
-- Atomic: see main.lua.
-- Precision: milli-tokens stay below 10^15 < 2^53; elapsed × rate × 1000 and the refill times
-- go through H.muldiv (exact below 2^53). Only absurd buckets (e.g. 10^12 tokens at one per
-- day) have a time to full above 2^52 ms; it is capped there.

-- luacheck: read globals redis
local H = ...
local call = redis.call
local tonumber = tonumber
local muldiv = H.muldiv

local M = { keys = 1 }

-- ms until `missing` milli-tokens have been refilled.
local function time_for(st, missing)
    return H.clamp_ms(muldiv(missing, st.period, st.rate * 1000, true))
end

function M.check(k, _, a1, a2, a3, cost, pending)
    local now = H.now_ms()
    local st = {
        key = k, burst = tonumber(a1), rate = tonumber(a2),
        period = tonumber(a3), cost = cost, now = now,
    }
    local full = st.burst * 1000
    local tokens = full
    local h = call("HMGET", k, "t", "ts")
    if h[1] and h[2] then
        local elapsed = now - tonumber(h[2])
        if elapsed < 0 then
            elapsed = 0 -- Redis's clock went back (a failover): no refill, no debt
        end
        tokens = tonumber(h[1]) + muldiv(elapsed, st.rate * 1000, st.period)
        if tokens > full then
            tokens = full
        end
    end
    -- Earlier checks of this request on the same bucket take their tokens first.
    local pend = pending[k] or 0
    st.raw = tokens
    tokens = tokens - pend * 1000
    if tokens < 0 then
        tokens = 0
    end
    st.full, st.tokens, st.need, st.pend = full, tokens, cost * 1000, pend
    st.fits = tokens >= st.need
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    local after = st.tokens - st.need
    call("HSET", st.key, "t", H.int(after), "ts", H.int(st.now))
    call("PEXPIRE", st.key, H.int(H.clamp_ms(time_for(st, st.full - after) + 1000)))
end

function M.result(st, charged, admitted)
    local after = st.raw
    if charged then
        after = st.tokens - st.need
    elseif admitted then
        after = st.tokens
    end
    local retry = 0
    if not st.fits then
        retry = st.need > st.full and H.NEVER or time_for(st, st.need - st.tokens)
    end
    return -1, (after - after % 1000) / 1000, time_for(st, st.full - after), retry
end

return M
