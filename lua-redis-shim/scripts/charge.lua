-- charge.lua: usage charged after a response ended (POST /v1/charge), for usage rules (the
-- filter checked the request with its reserve; this adds what the response really consumed,
-- or hands back the unused part of the reserve).
--
-- KEYS:  window counters (a fixed window's, or a sliding window's current one)
-- ARGV:  ARGV[i] is "<delta> <ttl_ms>" for KEYS[i]: delta a signed integer, ttl_ms the
--        counter's lifetime if this charge has to create it
-- Reply: the number of counters changed
--
-- A positive delta is INCRBY (and PEXPIRE if the counter had no TTL: it expired while the
-- response streamed); a negative one lowers the counter but never below 0, keeping its TTL,
-- and never creates one. Atomic (one script), so a charge never interleaves with a check.

-- luacheck: read globals redis KEYS ARGV
local call = redis.call
local match = string.match
local tonumber = tonumber

local changed = 0
for i = 1, #KEYS do
    local delta, ttl = match(ARGV[i], "^(%-?%d+) (%d+)$")
    local d = tonumber(delta)
    if d and d > 0 then
        call("INCRBY", KEYS[i], delta)
        if call("PTTL", KEYS[i]) < 0 then
            call("PEXPIRE", KEYS[i], ttl)
        end
        changed = changed + 1
    elseif d and d < 0 then
        local v = tonumber(call("GET", KEYS[i]))
        if v and v > 0 then
            local new = v + d
            if new < 0 then
                new = 0
            end
            call("SET", KEYS[i], string.format("%d", new), "KEEPTTL")
            changed = changed + 1
        end
    end
end
return changed
