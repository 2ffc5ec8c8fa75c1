-- main.lua: the check script's entry point. Decides the checks of one or several gateway
-- requests, each all-or-nothing on its own, in order, whatever algorithms they mix
-- (docs/wire-format.md).
--
-- Composition. The shim builds ONE script from these files at start-up and loads it by SHA
-- (EVALSHA; SCRIPT LOAD and one retry on NOSCRIPT), so one HTTP call is one EVALSHA. Where
-- Redis has functions (7.0+, and an ACL user allowed FCALL and FUNCTION LOAD) the same parts
-- are loaded once as a function library instead, and a call is one FCALL: the prelude and the
-- algorithms are then instantiated once per library load, not on every call, and main.lua's
-- KEYS and ARGV are the function's arguments (see compose() in lib/tollgate/shim.lua):
--
--     local H = (function(...) <prelude.lua> end)()
--     local LOAD = {}
--     LOAD.fixed_window = function() return (function(...) <fixed_window.lua> end)(H) end
--     ...                                 (sliding_window, sliding_window_bounded,
--                                          sliding_log, token_bucket, gcra, concurrency)
--     local ALG = setmetatable({}, ...)   ALG[name]: LOAD[name]() on first use, then kept
--     return (function(...) <main.lua> end)(ALG, H)
--
-- Each file is a plain Lua chunk (`...` are its arguments), so each lints on its own and its
-- locals stay its own: the composed script creates no globals (Redis 7 forbids it). Line
-- numbers in a script error refer to the composed source; the shim logs where each file
-- starts in it (at notice level). An algorithm file returns:
--
--     keys                                 how many KEYS one check takes
--     check(k, k2, a1, a2, a3, cost, pending)
--                                          reads the state of key k (and k2, when it takes two
--                                          KEYS) with the check's ARGV a1..a3; returns `st` with
--                                          st.fits. When it fits, records its charge in
--                                          `pending` (one table per request) so a later check
--                                          of the same request on the same key counts it.
--     commit(st)                           charges it (request admitted, check fits, cost > 0)
--     result(st, charged, admitted)        count (-1: not reported), remaining, reset_ms,
--                                          retry_after_ms (H.NEVER: never)
--     lease(st, want)                      (fixed and sliding windows) after every request of
--                                          the call: reserves up to `want` more units of the
--                                          key, never more than 1/LEASE_SHARE of what is left
--                                          then, and charges them; returns the units granted
--                                          and for how many ms from now they may be spent
--
-- KEYS:  every check's keys, request after request, check after check (as many as its
--        algorithm takes: sliding_window 2, the others 1)
-- ARGV:  [1] R, the number of requests; then for each request: n, its number of checks; then
--        one ARGV per check, space-separated: "<alg> <cost> <shadow 0|1> <lease> <args...>"
--        (the algorithm's ARGV, as its file says; keys and ids have no spaces); with the
--        shim's test clock only (TOLLGATE_TEST_CLOCK, never in production), a last ARGV
--        "clock <ms>": the instant to use instead of Redis's TIME
-- Reply: flat array; for each request: admitted (1|0), then for each of its checks (REPLY_WIDTH
--        in tollgate.contract): fits (1|0), count, remaining, reset_ms, retry_after_ms,
--        lease (units granted), lease_ms (how long they may be spent); last, Redis's TIME in ms
--        (-1 when this ACL user may not run TIME): the instant every check of the call used,
--        which the gateway compares with its own clock to measure its skew. Last, so that a
--        reader walking the requests needs not know about it.
--
-- A request is admitted iff every check that is not shadow fits; then every check that fits
-- (shadow ones included) is charged, and a denied request charges nothing. Requests are
-- decided in order, so a later one sees the charges of earlier ones.
--
-- Leases. A check of an admitted request may ask `lease` units more for its gateway to spend
-- locally (docs/wire-format.md). Grants come after every request of the call, so the call's
-- own requests are decided first and a lease never takes what one of them needed; per key and
-- call only the last check that asked is granted (by its algorithm's lease()); the others
-- answer 0.
--
-- Atomic because Redis runs a script to completion without interleaving other commands: the
-- reads of a request's checks, then its charges, see no other writer. The only writes of a
-- check phase drop entries that have already expired (sliding_log, concurrency). Counter
-- charges (fixed and sliding windows) are written once per key at the end of the call
-- (H.flush_counters); later checks of the call see them already. An error (a key of another
-- type, a corrupt value) aborts the script; the charges of earlier requests of the call that
-- other algorithms wrote stay made, counter charges are not written; the shim answers 503.

-- luacheck: read globals redis KEYS ARGV
local ALG, H = ...
local tonumber = tonumber
local tostring = tostring
local error = error
local match = string.match

-- No check's ARGV starts with "clock": an alg name comes first.
H.reset(match(ARGV[#ARGV], "^clock (%d+)$"))
local reply, out = {}, 0
local argi = 2 -- next ARGV to read
local keyi = 0 -- KEYS read so far
-- Leases asked by checks of admitted requests: per key the last ask { st, want, at } (at: where
-- its check's answer starts in the reply), and the keys in the order first asked.
local asks, asked = {}, {}

for _ = 1, tonumber(ARGV[1]) do
    local n = tonumber(ARGV[argi])
    argi = argi + 1

    -- Check all.
    local pending, checks = {}, {}
    local admitted = true
    for j = 1, n do
        -- One match, no table: the algorithms take at most three arguments.
        local name, cost, shadow, lease, a1, a2, a3 =
            match(ARGV[argi], "^(%S+) (%d+) ([01]) (%d+) ?(%S*) ?(%S*) ?(%S*)$")
        argi = argi + 1
        local alg = ALG[name]
        if not alg then
            error("tollgate: bad check " .. tostring(ARGV[argi - 1]))
        end
        cost = tonumber(cost)
        local st = alg.check(KEYS[keyi + 1], KEYS[keyi + 2], a1, a2, a3, cost, pending)
        keyi = keyi + alg.keys
        if not st.fits and shadow ~= "1" then
            admitted = false
        end
        -- The algorithm's own fields, and these three, in one table per check.
        st.alg, st.charged, st.want = alg, st.fits and cost > 0, tonumber(lease)
        checks[j] = st
    end

    -- Charge all (only if admitted), then report: after the charges, so a reading of the state
    -- sees all of this request's.
    if admitted then
        for j = 1, n do
            local c = checks[j]
            if c.charged then
                c.alg.commit(c)
            end
        end
    end
    out = out + 1
    reply[out] = admitted and 1 or 0
    for j = 1, n do
        local c = checks[j]
        local count, remaining, reset, retry = c.alg.result(c, admitted and c.charged, admitted)
        reply[out + 1] = c.fits and 1 or 0
        reply[out + 2] = count
        reply[out + 3] = remaining
        reply[out + 4] = reset
        reply[out + 5] = retry
        reply[out + 6] = 0
        reply[out + 7] = 0
        if admitted and c.want > 0 and c.alg.lease then
            local k = c.key
            if not asks[k] then
                asked[#asked + 1] = k
            end
            asks[k] = { st = c, want = c.want, at = out + 6 }
        end
        out = out + 7
    end
end

-- Leases, once every request of the call is decided.
for i = 1, #asked do
    local a = asks[asked[i]]
    local granted, ms = a.st.alg.lease(a.st, a.want)
    if granted > 0 then
        reply[a.at], reply[a.at + 1] = granted, ms
    end
end

-- The counters' charges, written once per key (prelude.lua).
H.flush_counters()
reply[out + 1] = H.try_now_ms() or -1
return reply
