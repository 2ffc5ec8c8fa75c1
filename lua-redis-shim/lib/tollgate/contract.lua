-- tollgate.contract: what each algorithm's check carries on the wire (docs/wire-format.md),
-- said once. validate.lua checks bodies against it, shim.lua builds each script call's KEYS and
-- ARGV from it, and a Rust unit test (src/wire.rs) holds the filter's encoder equal to it: the
-- same algorithms, the same fields, bounds named in tollgate.bounds.
--
-- Every check also has `alg`, `key`, `cost` and `shadow`, and, on an algorithm with
-- `lease = true`, an optional `lease` (0..MAX_LEASE). An algorithm's `fields`, in wire order:
--   { name, "int", lo, hi }  an integer in lo..hi; a bound is a number or the name of one in
--                            tollgate.bounds; hi may also name an earlier field of the check
--   { name, "key" }          another key, with the same {hash tag} as `key` (a KEYS entry)
--   { name, "id" }           a request id (1..MAX_ID_BYTES printable ASCII)
-- The script's KEYS for a check are `key` and its "key" fields; its ARGV the other fields, in
-- order (each algorithm's script says so atop its file). `limit` names the field the reply
-- reports as `limit`; `count`: whether the reply reports `count`.
--
-- `lease`: whether a check may ask a lease. Each check's answer in the script's reply is
-- REPLY_WIDTH numbers (scripts/main.lua).
--
-- Keep one field per line and `name = "..."` on the line that opens an algorithm: the Rust
-- test reads this file line by line.

local _M = { _VERSION = "0.1.0" }

_M.REPLY_WIDTH = 7

_M.ALGS = {
    { name = "fixed_window", limit = "limit", count = true, lease = true, fields = {
        { "limit", "int", 1, "MAX_LIMIT" },
        { "ttl_ms", "int", 1, "MAX_MS" },
    } },
    { name = "sliding_window", limit = "limit", count = true, lease = true, fields = {
        { "prev_key", "key" },
        { "limit", "int", 1, "MAX_LIMIT" },
        { "window_ms", "int", "MIN_WINDOW_MS", "MAX_MS" },
        { "weight_ms", "int", 1, "window_ms" },
    } },
    { name = "sliding_window_bounded", limit = "limit", count = true, lease = true, fields = {
        { "limit", "int", 1, "MAX_LIMIT" },
        { "window_ms", "int", "MIN_WINDOW_MS", "MAX_MS" },
        { "subwindows", "int", 1, "MAX_SUBWINDOWS" },
    } },
    { name = "sliding_log", limit = "limit", count = false, fields = {
        { "limit", "int", 1, "MAX_LOG_LIMIT" },
        { "window_ms", "int", "MIN_WINDOW_MS", "MAX_MS" },
        { "id", "id" },
    } },
    { name = "token_bucket", limit = "burst", count = false, fields = {
        { "burst", "int", 1, "MAX_LIMIT" },
        { "rate", "int", 1, "MAX_RATE" },
        { "period_ms", "int", 1, "MAX_MS" },
    } },
    { name = "gcra", limit = "burst", count = false, fields = {
        { "burst", "int", 1, "MAX_LIMIT" },
        { "rate", "int", 1, "MAX_RATE" },
        { "period_ms", "int", 1, "MAX_MS" },
    } },
    { name = "concurrency", limit = "limit", count = false, fields = {
        { "limit", "int", 1, "MAX_LIMIT" },
        { "ttl_ms", "int", "MIN_SLOT_TTL_MS", "MAX_MS" },
        { "id", "id" },
    } },
}

-- By name, and each algorithm's KEYS fields and ARGV fields, derived once.
_M.BY_NAME = {}
for i = 1, #_M.ALGS do
    local alg = _M.ALGS[i]
    local keys, args = { "key" }, {}
    for j = 1, #alg.fields do
        local f = alg.fields[j]
        if f[2] == "key" then
            keys[#keys + 1] = f[1]
        else
            args[#args + 1] = f[1]
        end
    end
    alg.keys, alg.args = keys, args
    _M.BY_NAME[alg.name] = alg
end

return _M
