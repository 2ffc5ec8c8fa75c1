-- sliding_window.lua: two fixed-window counters, the previous one weighted by how much of it
-- is still inside the slide. The gateway names both windows (key, prev_key: same {hash tag})
-- and computes weight_ms from its clock. Model: sliding_window in src/algorithms.rs.
--
-- KEYS:  key (this window's counter), prev_key (the previous window's)
-- ARGV:  limit, window_ms, weight_ms (1..window_ms: ms of the previous window still inside)
-- State: two string counters; this script writes only key, with PEXPIRE weight_ms + window_ms
--        when it is created (it must outlive its own window by a whole one, to be read as the
--        previous window then), and when it is found without a TTL. Memory: ~100 bytes per
--        window with a 50-byte key, two windows alive at a time.
-- Check: GET both; estimate = ceil(prev × weight_ms / window_ms) + cur; fits iff
--        estimate + cost <= limit. Commit: INCRBY key cost. Both through the call's counters
--        (prelude.lua): each key read once and written once per call.
-- Reply: count = cur (after the charge, or as it stands), remaining = limit − estimate,
--        reset_ms = weight_ms (+ window_ms unless cur = 0), retry_after_ms: when the estimate
--        will have decayed enough, or a point in the next window if cur alone is too much.
-- Atomic: see main.lua.
-- Precision: prev × weight_ms reaches 10^12 × 8.64×10^7 > 2^53, so every such product goes
-- through H.muldiv, exact whatever the counters (its results stay below the counters and
-- window_ms); everything else stays below 2^53.

local H = ...
local tonumber = tonumber
local muldiv = H.muldiv

local M = { keys = 2 }

-- ms until estimate + cost <= limit holds again (sliding_retry_after in the model).
local function retry_after(prev, cur, cost, limit, weight, window)
    if cost > limit then
        return H.NEVER
    end
    local room = limit - cost -- the estimate must fall to this
    if cur <= room then
        -- Still in this window: need ceil(prev × weight' / window) <= room − cur.
        local max_weight = window
        if prev > 0 then
            max_weight = muldiv(room - cur, window, prev)
        end
        return weight > max_weight and weight - max_weight or 0
    end
    -- In the next window, cur becomes the previous one: need ceil(cur × weight'' / W) <= room.
    return weight + window - muldiv(room, window, cur)
end

function M.check(k, k2, a1, a2, a3, cost, pending)
    local counter = H.counter(k)
    local cur = counter.count
    local prev = H.counter(k2).count
    local pend = pending[k] or 0
    local st = {
        key = k, counter = counter, limit = tonumber(a1), window = tonumber(a2),
        weight = tonumber(a3), cost = cost, cur = cur, pend = pend, prev = prev,
    }
    st.weighted = muldiv(prev, st.weight, st.window, true)
    st.fits = st.weighted + cur + pend + cost <= st.limit
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    st.after = H.charge(st.counter, st.cost, st.weight + st.window)
end

function M.result(st, charged, admitted)
    local cur = st.cur
    if charged then
        cur = st.after
    elseif admitted then
        cur = cur + st.pend
    end
    local remaining = st.limit - (st.weighted + cur)
    local reset = cur == 0 and st.weight or st.weight + st.window
    local retry = 0
    if not st.fits then
        retry = retry_after(st.prev, st.cur + st.pend, st.cost, st.limit, st.weight, st.window)
    end
    return cur, remaining > 0 and remaining or 0, reset, retry
end

--- A lease (main.lua): up to `want` more units of the current window, spendable until it
-- ends (the gateway names the window in the key, so they can only be spent in it).
function M.lease(st, want)
    local c = st.counter
    local granted = H.grant(st.limit - (st.weighted + c.count), want)
    if granted > 0 then
        H.charge(c, granted, st.weight + st.window)
    end
    return granted, st.weight
end

return M
