-- fixed_window.lua: fixed-window counters for the checks of one or several gateway requests,
-- each request decided all-or-nothing on its own, in order (docs/wire-format.md).
--
-- KEYS:  every check's key, request after request (the order of the JSON)
-- ARGV:  [1] R, the number of requests; then for each request: n, its number of checks;
--        then for each of its checks: limit, ttl_ms, cost
-- Reply: flat array; for each request: allowed (1 or 0), then for each of its checks: count, pttl
--
-- Atomic because Redis runs a script to completion without interleaving other commands:
-- the GETs (check all), then the INCRBY + PEXPIRE (count all) of a request see no other writer.
--
-- count is the counter after the request if it was admitted, else as it stands; pttl is PTTL
-- (-2 when the key does not exist). Keys carry a {hash tag} so each counter's windows share a
-- Redis Cluster slot. The shim validated every ARGV number; a counter that is not an integer
-- (written by someone else) fails the script, which the shim reports as backend_unavailable.

-- luacheck: read globals redis KEYS ARGV
local call = redis.call
local tonumber = tonumber

local reply = {}
local arg = 2 -- next ARGV index to read
local key = 0 -- KEYS index of the last check read

for _ = 1, tonumber(ARGV[1]) do
    local n = tonumber(ARGV[arg])
    arg = arg + 1

    -- Check all. `pending` adds the cost of earlier checks of this request on the same key, so
    -- a key listed twice cannot be charged past its limit.
    local counts, pending = {}, {}
    local admitted = true
    for j = 1, n do
        local k = KEYS[key + j]
        local limit, cost = tonumber(ARGV[arg + 3 * j - 3]), tonumber(ARGV[arg + 3 * j - 1])
        local current = tonumber(call("GET", k) or 0)
        counts[j] = current
        if current + (pending[k] or 0) + cost > limit then
            admitted = false
        end
        pending[k] = (pending[k] or 0) + cost
    end

    reply[#reply + 1] = admitted and 1 or 0

    -- Count all (only if admitted), and report each counter with its TTL.
    for j = 1, n do
        local k = KEYS[key + j]
        local ttl_ms, cost = ARGV[arg + 3 * j - 2], tonumber(ARGV[arg + 3 * j - 1])
        local count, pttl = counts[j]
        if admitted and cost > 0 then
            count = call("INCRBY", k, cost)
            if count == cost then
                -- Just created: expire at the end of its window.
                call("PEXPIRE", k, ttl_ms)
                pttl = tonumber(ttl_ms)
            else
                pttl = call("PTTL", k)
                if pttl == -1 then
                    -- Safety net: a counter without expiry (set by hand, or a PEXPIRE lost
                    -- with a failover) would block its key forever.
                    call("PEXPIRE", k, ttl_ms)
                    pttl = tonumber(ttl_ms)
                end
            end
        else
            pttl = call("PTTL", k)
        end
        reply[#reply + 1] = count
        reply[#reply + 1] = pttl
    end

    arg = arg + 3 * n
    key = key + n
end

return reply
