-- fixed_window.lua: a counter per window; the gateway names the window in the key and says how
-- long it has left (ttl_ms). Model: fixed_window in src/algorithms.rs.
--
-- KEYS:  key (this window's counter)
-- ARGV:  limit, ttl_ms
-- State: a string counter under key, PEXPIRE ttl_ms + COUNTER_GRACE_MS when it is created (and
--        when it is found without a TTL, e.g. set by hand), so it dies with its window, and a
--        check built in the window that reaches Redis after it ended (a slow call) still
--        counts in it rather than creating the counter afresh. Memory: ~100 bytes with
--        a 50-byte key.
-- Check: GET; fits iff count + cost <= limit. Commit: INCRBY cost. Both through the call's
--        counters (prelude.lua): a key is read once and written once per call, however many
--        requests of the call check it.
-- Reply: count (after the charge, or as it stands), remaining = limit − count,
--        reset_ms = PTTL − COUNTER_GRACE_MS, at least 0 (ttl_ms if the key does not exist),
--        retry_after_ms = reset_ms when it does not fit.
-- Atomic: see main.lua. Counts stay far below 2^53 (limit <= 10^12), so all of it is exact.
-- A counter that is not an integer (written by someone else) fails the script: a 503.

local H = ...
local tonumber = tonumber

local M = { keys = 1 }

function M.check(k, _, a1, a2, _, cost, pending)
    local counter = H.counter(k)
    -- The cost of earlier checks of this request on the same key: a key listed twice cannot be
    -- charged past its limit.
    local pend = pending[k] or 0
    local st = {
        key = k, counter = counter, limit = tonumber(a1), ttl_ms = tonumber(a2),
        cost = cost, count = counter.count, pend = pend,
    }
    st.fits = st.count + pend + cost <= st.limit
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    st.after = H.charge(st.counter, st.cost, st.ttl_ms + H.COUNTER_GRACE_MS)
end

-- Until the window ends: the key's PTTL without its grace (ttl_ms when it does not exist yet).
local function window_left(st)
    local pttl = H.pttl(st.key, st.counter)
    if pttl < 0 then
        return st.ttl_ms
    end
    pttl = pttl - H.COUNTER_GRACE_MS
    return pttl > 0 and pttl or 0
end

function M.result(st, charged, admitted)
    local count = st.count
    if charged then
        count = st.after
    elseif admitted then
        count = count + st.pend
    end
    -- A counter this call creates (or finds without expiry) gets its TTL when it is written.
    local reset = window_left(st)
    local remaining = st.limit - count
    return count, remaining > 0 and remaining or 0, reset, st.fits and 0 or reset
end

--- A lease (main.lua): up to `want` more units of this window, spendable until it ends.
function M.lease(st, want)
    local c = st.counter
    local granted = H.grant(st.limit - c.count, want)
    if granted > 0 then
        H.charge(c, granted, st.ttl_ms + H.COUNTER_GRACE_MS)
    end
    return granted, window_left(st)
end

return M
