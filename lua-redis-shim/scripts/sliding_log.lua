-- sliding_log.lua: the exact sliding window, a log of admitted requests' times. Time comes from
-- Redis (TIME), not from the gateway. Model: sliding_log in src/algorithms.rs.
--
-- KEYS:  key
-- ARGV:  limit (<= 10 000), window_ms, id (unique per gateway request, no spaces)
-- State: a sorted set, one member per admitted unit of cost: member id..":"..n (n = 1..cost,
--        so a cost above 1 adds distinct members), score = Redis time in ms. PEXPIRE window_ms
--        on every charge: the newest entry is then `now`, and the set is useless after it.
--        Memory (measured, Redis 7, ids of ~25 bytes): ~40 bytes per entry up to 128 entries
--        (listpack), ~120 bytes per entry beyond (skiplist): ~1.2 MB at the limit of 10 000.
-- Check: ZREMRANGEBYSCORE -inf now − window_ms (drop what slid out; not a charge), ZCARD;
--        fits iff count + cost <= limit. Commit: ZADD cost members at now.
-- Reply: count is not reported; remaining = limit − entries; reset_ms = newest entry +
--        window_ms − now (0 when empty); retry_after_ms = when the (count + cost − limit)-th
--        oldest entry slides out.
-- Atomic: see main.lua. Times in ms (~1.7×10^12) and counts are exact as doubles.

-- luacheck: read globals redis
local H = ...
local call = redis.call
local tonumber = tonumber
local unpack = unpack

local M = { keys = 1 }

-- ZADD arguments per call: unpack() is bounded by Lua's C stack (LUAI_MAXCSTACK, 8000).
local ZADD_BATCH = 500

function M.check(k, _, a1, a2, a3, cost, pending)
    local now = H.now_ms()
    local window = tonumber(a2)
    call("ZREMRANGEBYSCORE", k, "-inf", H.int(now - window))
    local count = call("ZCARD", k)
    local pend = pending[k] or 0
    local st = {
        key = k, limit = tonumber(a1), window = window, id = a3, cost = cost,
        now = now, count = count, pend = pend,
    }
    st.fits = count + pend + cost <= st.limit
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    local k, now, id = st.key, H.int(st.now), st.id
    local zargs, n = { k }, 1
    -- Numbered after the entries earlier checks of this request add to the same key.
    for i = st.pend + 1, st.pend + st.cost do
        zargs[n + 1], zargs[n + 2] = now, id .. ":" .. i
        n = n + 2
        if n > 2 * ZADD_BATCH or i == st.pend + st.cost then
            call("ZADD", unpack(zargs, 1, n))
            n = 1
        end
    end
    call("PEXPIRE", k, H.int(st.window))
end

-- ms until the entry at 0-based rank `rank` (oldest first) slides out.
local function expires_in(st, rank, stored)
    if rank >= stored then
        return st.window -- one this request adds, at now
    end
    local e = call("ZRANGE", st.key, rank, rank, "WITHSCORES")
    return tonumber(e[2]) + st.window - st.now
end

function M.result(st, charged, admitted)
    -- What the set holds now: earlier checks of this request are in it once admitted.
    local stored = st.count + (admitted and st.pend or 0)
    local entries = stored + (charged and st.cost or 0)
    local remaining = st.limit - entries
    local reset = 0
    if entries > 0 then
        reset = expires_in(st, entries - 1, stored)
    end
    local retry = 0
    if not st.fits then
        if st.cost > st.limit then
            retry = H.NEVER
        else
            retry = expires_in(st, st.count + st.pend + st.cost - st.limit - 1, stored)
        end
    end
    return -1, remaining > 0 and remaining or 0, reset, retry
end

return M
