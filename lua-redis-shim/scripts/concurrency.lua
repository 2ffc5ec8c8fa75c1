-- concurrency.lua: at most `limit` requests in flight. Each admitted request holds a slot named
-- by its id until the filter releases it (POST /v1/release, release.lua) or ttl_ms passes (a
-- gateway that died mid-request must not hold slots forever). Time comes from Redis (TIME).
--
-- KEYS:  key (ends in "}:conc")
-- ARGV:  limit, ttl_ms (slot lifetime), id (unique per gateway request, no spaces); cost is 1
-- State: a sorted set, member id, score = the slot's expiry (Redis time in ms + ttl_ms). The
--        key's TTL is kept at least ttl_ms (the larger of its PTTL and ttl_ms), so it outlives
--        its latest slot. Memory (ids of ~25 bytes): ~40 bytes per slot up to 128 slots
--        (listpack), ~120 bytes per slot beyond (skiplist).
-- Check: ZREMRANGEBYSCORE -inf now (drop expired slots), ZCARD, ZSCORE id; fits iff the slots
--        after adding this one (an id already present counts once) are <= limit.
--        Commit: ZADD now + ttl_ms id (re-adding an id refreshes its expiry).
-- Reply: count is not reported; remaining = limit − slots; reset_ms = ms until the earliest
--        slot expires (0 when none); retry_after_ms = min(1000, that) when it does not fit:
--        slots are normally released when their request ends, well before they expire.
-- Atomic: see main.lua. Times in ms and counts are exact as doubles.

-- luacheck: read globals redis
local H = ...
local call = redis.call
local tonumber = tonumber

local M = { keys = 1 }

-- How long to tell a denied request to wait at most (ms): a slot frees when a request ends.
local RETRY_MS = 1000

function M.check(k, _, a1, a2, a3, _, pending)
    local now = H.now_ms()
    local id = a3
    call("ZREMRANGEBYSCORE", k, "-inf", H.int(now))
    -- Slots earlier checks of this request add to the same set (pending[k]) count too.
    local held = call("ZCARD", k) + (pending[k] or 0)
    local present = call("ZSCORE", k, id) or pending[k .. " " .. id]
    local st = {
        key = k, limit = tonumber(a1), ttl_ms = tonumber(a2), id = id, now = now,
    }
    st.fits = held + (present and 0 or 1) <= st.limit
    if st.fits and not present then
        -- Keys and ids have no spaces: "key id" names this slot and cannot collide with a key.
        pending[k] = (pending[k] or 0) + 1
        pending[k .. " " .. id] = true
    end
    return st
end

function M.commit(st)
    local k, ttl = st.key, st.ttl_ms
    call("ZADD", k, H.int(st.now + ttl), st.id)
    if call("PTTL", k) < ttl then
        call("PEXPIRE", k, H.int(ttl))
    end
end

function M.result(st)
    -- Read after this request's charges, so both count what the set holds now.
    local held = call("ZCARD", st.key)
    local first = call("ZRANGE", st.key, 0, 0, "WITHSCORES")
    local reset = first[2] and tonumber(first[2]) - st.now or 0
    local retry = 0
    if not st.fits then
        retry = (reset > 0 and reset < RETRY_MS) and reset or RETRY_MS
    end
    local remaining = st.limit - held
    return -1, remaining > 0 and remaining or 0, reset, retry
end

return M
