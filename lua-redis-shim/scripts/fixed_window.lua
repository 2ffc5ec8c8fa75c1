-- fixed_window.lua: a counter per window; the gateway names the window in the key and says how
-- long it has left (ttl_ms). Model: fixed_window in src/algorithms.rs.
--
-- KEYS:  key (this window's counter)
-- ARGV:  limit, ttl_ms
-- State: a string counter under key, PEXPIRE ttl_ms when it is created (and when it is found
--        without a TTL, e.g. set by hand), so it dies with its window. Memory: ~100 bytes with
--        a 50-byte key.
-- Check: GET; fits iff count + cost <= limit. Commit: INCRBY cost.
-- Reply: count (after the charge, or as it stands), remaining = limit − count,
--        reset_ms = PTTL (ttl_ms if the key does not exist), retry_after_ms = reset_ms when it
--        does not fit.
-- Atomic: see main.lua. Counts stay far below 2^53 (limit <= 10^12), so all of it is exact.
-- A counter that is not an integer (written by someone else) fails the script: a 503.

-- luacheck: read globals redis
local H = ...
local call = redis.call
local tonumber = tonumber

local M = { keys = 1 }

function M.check(keys, args, cost, pending)
    local k = keys[1]
    local count = tonumber(call("GET", k) or 0)
    -- The cost of earlier checks of this request on the same key: a key listed twice cannot be
    -- charged past its limit.
    local pend = pending[k] or 0
    local st = {
        key = k, limit = tonumber(args[1]), ttl_ms = args[2], cost = cost,
        count = count, pend = pend,
    }
    st.fits = count + pend + cost <= st.limit
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    local k = st.key
    st.after = call("INCRBY", k, H.int(st.cost))
    local pttl = st.after ~= st.cost and call("PTTL", k) or -1
    if pttl == -1 then
        -- New (the INCRBY created it), or a counter without expiry (set by hand, or a PEXPIRE
        -- lost in a failover) that would otherwise block its key forever.
        call("PEXPIRE", k, st.ttl_ms)
        pttl = tonumber(st.ttl_ms)
    end
    st.pttl = pttl
end

function M.result(st, charged, admitted)
    local count = st.count
    if charged then
        count = st.after
    elseif admitted then
        count = count + st.pend
    end
    local pttl = st.pttl or call("PTTL", st.key)
    local reset = pttl >= 0 and pttl or tonumber(st.ttl_ms)
    local remaining = st.limit - count
    return count, remaining > 0 and remaining or 0, reset, st.fits and 0 or reset
end

return M
