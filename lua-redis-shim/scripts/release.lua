-- release.lua: frees concurrency slots (POST /v1/release), the end of a request that
-- concurrency.lua admitted.
--
-- KEYS:  every release's key (a concurrency set, "<prefix>:{...}:conc")
-- ARGV:  the matching ids: ARGV[i] is the slot to free in KEYS[i]
-- Reply: the number of slots removed (an id already expired or released counts 0, no error)
--
-- ZREM leaves the TTL alone, and Redis deletes a set once it is empty. Atomic (one script), so
-- a release never interleaves with the check of another request on the same set.

-- luacheck: read globals redis KEYS ARGV
local call = redis.call

local removed = 0
for i = 1, #KEYS do
    removed = removed + call("ZREM", KEYS[i], ARGV[i])
end
return removed
