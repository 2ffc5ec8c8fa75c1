-- sliding_window_bounded.lua: the window split into n sub-windows of window_ms / n, each with
-- its own count; a check counts the n + 1 sub-windows the last window_ms touches, the partly
-- expired oldest one in full. Model: sliding_window_bounded in src/algorithms.rs; the bound and
-- its proof: docs/algorithms.md.
--
-- KEYS:  key (a hash: field = sub-window index ⌊now / sub⌋, value = what it admitted)
-- ARGV:  limit, window_ms, subwindows (n; window_ms is a multiple of n, validate.lua)
-- Time:  Redis TIME (H.now_ms), so every gateway counts in the same sub-window whatever its
--        clock: the bound holds across gateways.
-- State: the hash, read once per call (H.buckets, prelude.lua); a charge HINCRBYs the current
--        sub-window; the first charge of a sub-window also HDELs the sub-windows that have left
--        and sets PEXPIRE to when the new one leaves ((j + n + 1) × sub − now): at most n + 2
--        fields, gone when idle.
-- Check: count = the sum of sub-windows j − n … j (j: the current one); fits iff
--        count + cost <= limit. Why in full: the oldest sub-window's admissions may all lie in
--        its last millisecond, still inside the window; weighting it by the part still inside
--        (as sliding_window does with its previous window) lets up to 2 × limit through.
-- Reply: count (after the charge, or as it stands), remaining = limit − count,
--        reset_ms = until the newest counted sub-window has left (0 when count is 0),
--        retry_after_ms = until enough of the oldest sub-windows have left for cost to fit.
-- Atomic: see main.lua. Counts stay below 2^53 (limit <= 10^12, n <= 100), and sub-window
-- indices too (now / 10 ms), so all of it is exact.

local H = ...
local tonumber = tonumber
local floor = math.floor
local pairs = pairs

local M = { keys = 1 }

-- What sub-windows first .. j of `counts` hold (indices past j, after Redis's clock stepped
-- back, count too: counting more only denies more).
local function sum_from(counts, first)
    local sum = 0
    for i, v in pairs(counts) do
        if i >= first then
            sum = sum + v
        end
    end
    return sum
end

function M.check(k, _, a1, a2, a3, cost, pending)
    local b = H.buckets(k)
    local n = tonumber(a3)
    local sub = tonumber(a2) / n
    local now = H.now_ms()
    local j = floor(now / sub)
    local pend = pending[k] or 0
    local st = {
        key = k, b = b, limit = tonumber(a1), n = n, sub = sub, now = now, j = j,
        cost = cost, count = sum_from(b.counts, j - n), pend = pend,
    }
    st.fits = st.count + pend + cost <= st.limit
    if st.fits then
        pending[k] = pend + cost
    end
    return st
end

function M.commit(st)
    local b, j, n = st.b, st.j, st.n
    b.counts[j] = (b.counts[j] or 0) + st.cost
    H.charge_bucket(b, j, st.cost, j - n, (j + n + 1) * st.sub - st.now)
    st.after = sum_from(b.counts, j - n)
end

function M.result(st, charged, admitted)
    local count = st.count
    if charged then
        count = st.after
    elseif admitted then
        count = count + st.pend
    end
    local counts, first, n, sub, now = st.b.counts, st.j - st.n, st.n, st.sub, st.now
    -- Sub-window i leaves the window at (i + n + 1) × sub.
    local reset, newest = 0, nil
    for i, v in pairs(counts) do
        if i >= first and v > 0 and (not newest or i > newest) then
            newest = i
        end
    end
    if newest then
        reset = (newest + n + 1) * sub - now
    end
    local retry = 0
    if not st.fits then
        if st.cost > st.limit then
            retry = H.NEVER
        else
            -- The oldest sub-windows must take `need` with them.
            local need = st.count + st.pend + st.cost - st.limit
            local i, freed = first - 1, 0
            repeat
                i = i + 1
                freed = freed + (counts[i] or 0)
            until freed >= need or i >= st.j
            retry = (i + n + 1) * sub - now
        end
    end
    local remaining = st.limit - count
    return count, remaining > 0 and remaining or 0, reset, retry
end

--- A lease (main.lua): up to `want` more units, charged to the current sub-window and
-- spendable only until it ends: a unit spent then counts exactly as if it had been charged
-- when spent, so the bound holds.
function M.lease(st, want)
    local b, j, n = st.b, st.j, st.n
    local granted = H.grant(st.limit - sum_from(b.counts, j - n), want)
    if granted > 0 then
        b.counts[j] = (b.counts[j] or 0) + granted
        H.charge_bucket(b, j, granted, j - n, (j + n + 1) * st.sub - st.now)
    end
    return granted, (j + 1) * st.sub - st.now
end

return M
