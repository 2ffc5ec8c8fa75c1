-- gcra.lua: the generic cell rate algorithm (as in redis-cell): up to `burst` back to back
-- from idle, then one per emission interval T = floor(period_ms × 1000 / rate) µs. Time comes
-- from Redis (TIME, µs). Model: gcra in src/algorithms.rs.
--
-- KEYS:  key
-- ARGV:  burst, rate, period_ms
-- State: one string, the theoretical arrival time (TAT) in µs since the epoch; a missing one
--        means idle. Written with PX = ceil((TAT − now) / 1000) + 1000 ms: once TAT has passed,
--        a missing key means the same thing. Memory: one integer string, ~100 bytes with a
--        50-byte key.
-- Check: tat = max(TAT, now); fits iff tat + cost × T − now <= burst × T.
--        Commit: SET tat + cost × T.
-- Reply: count is not reported; limit is burst; remaining = whole emission intervals left in
--        the tolerance; reset_ms = ceil((TAT − now) / 1000); retry_after_ms = ms until
--        tat + cost × T − now would fit the tolerance.
-- Atomic: see main.lua.
-- Precision: µs since the epoch are ~1.7×10^15 < 2^53 (9×10^15), so the arithmetic is exact
-- while TAT − now stays below ~7×10^15 µs (~80 days: burst × period / rate); beyond that TAT
-- is rounded to a few µs. Remaining is computed as burst − ceil(x / T), which never forms the
-- product burst × T for it.

-- luacheck: read globals redis
local H = ...
local call = redis.call
local tonumber = tonumber
local floor = math.floor
local ceil = math.ceil

local M = { keys = 1 }

function M.check(k, _, a1, a2, a3, cost, pending)
    local now = H.now_us()
    local burst, rate, period = tonumber(a1), tonumber(a2), tonumber(a3)
    local t = floor(period * 1000 / rate) -- exact: period × 1000 <= 8.64×10^10
    local tat = tonumber(call("GET", k) or 0)
    if tat < now then
        tat = now
    end
    local pend = pending[k] or 0
    local st = {
        key = k, burst = burst, t = t, tolerance = t * burst, cost = cost, now = now,
        raw = tat, pend = pend,
    }
    st.tat = tat + pend * t
    st.new_tat = st.tat + cost * t
    st.fits = st.new_tat - now <= st.tolerance
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    local px = H.clamp_ms(ceil((st.new_tat - st.now) / 1000) + 1000)
    call("SET", st.key, H.int(st.new_tat), "PX", H.int(px))
end

function M.result(st, charged, admitted)
    local kept = st.raw
    if charged then
        kept = st.new_tat
    elseif admitted then
        kept = st.tat
    end
    local x = kept - st.now
    local remaining = 0
    if st.t > 0 then
        remaining = st.burst - ceil((x < st.tolerance and x or st.tolerance) / st.t)
    end
    local retry = 0
    if not st.fits then
        retry = H.clamp_ms(ceil((st.new_tat - st.now - st.tolerance) / 1000))
    end
    return -1, remaining, H.clamp_ms(ceil(x / 1000)), retry
end

return M
