-- tollgate.validate: decodes and validates the bodies of `POST /v1/check` and
-- `POST /v1/release` (docs/wire-format.md).
--
-- Pure functions: no ngx API, no I/O. Every error message names the offending field with its
-- path, e.g. `requests[0].checks[2].limit: must be an integer in 1..1000000000000`.

local cjson = require "cjson"
local bounds = require "tollgate.bounds"
local contract = require "tollgate.contract"

local type = type
local pairs = pairs
local next = next
local pcall = pcall
local tostring = tostring
local floor = math.floor
local find = string.find
local sub = string.sub
local gsub = string.gsub
local format = string.format
local sort = table.sort
local concat = table.concat

local _M = { _VERSION = "0.2.0" }

-- The bounds of docs/wire-format.md (tollgate.bounds, which src/bounds.rs mirrors).
local MAX_REQUESTS = bounds.MAX_REQUESTS
local MAX_CHECKS = bounds.MAX_CHECKS
local MAX_TOTAL_CHECKS = bounds.MAX_TOTAL_CHECKS
local MAX_RELEASES = bounds.MAX_RELEASES
local MAX_KEY_BYTES = bounds.MAX_KEY_BYTES
local MAX_ID_BYTES = bounds.MAX_ID_BYTES
local MAX_LIMIT = bounds.MAX_LIMIT
local MAX_RATE_PER_PERIOD_MS = bounds.MAX_RATE_PER_PERIOD_MS
local MAX_MS = bounds.MAX_MS
local MAX_COST = bounds.MAX_COST
local MAX_DEPTH = bounds.MAX_DEPTH
local MAX_LEASE = bounds.MAX_LEASE

-- What each `alg` takes besides `key`, `alg`, `cost` and `shadow` (tollgate.contract), with
-- the bounds named there resolved: { field, "int", lo, hi } (hi may name an earlier field),
-- { field, "key" }, { field, "id" }.
local ALGS, ALG_LIST = {}, {}
do
    local function bound(b)
        if type(b) == "string" and bounds[b] then
            return bounds[b]
        end
        return b
    end
    for i = 1, #contract.ALGS do
        local alg = contract.ALGS[i]
        local spec = {}
        for j = 1, #alg.fields do
            local f = alg.fields[j]
            spec[j] = { f[1], f[2], bound(f[3]), bound(f[4]) }
        end
        ALGS[alg.name] = spec
        ALG_LIST[i] = '"' .. alg.name .. '"'
    end
end
local ALG_NAMES = concat(ALG_LIST, ", ", 1, #ALG_LIST - 1) .. " or " .. ALG_LIST[#ALG_LIST]

local COMMON_FIELDS = { alg = true, key = true, cost = true, shadow = true }
-- Per alg: the fields it accepts. ANY_ALG: the fields some alg accepts.
local ALG_FIELDS, ANY_ALG = {}, {}
for name, spec in pairs(ALGS) do
    local fields = {}
    for k in pairs(COMMON_FIELDS) do
        fields[k], ANY_ALG[k] = true, true
    end
    for i = 1, #spec do
        fields[spec[i][1]], ANY_ALG[spec[i][1]] = true, true
    end
    if contract.BY_NAME[name].lease then
        fields.lease, ANY_ALG.lease = true, true
    end
    ALG_FIELDS[name] = fields
end

-- A private cjson instance, so these settings do not leak into other users of the module.
local json = cjson.new()
json.decode_max_depth(MAX_DEPTH)
-- Reject NaN, Infinity and hex numbers, which plain JSON does not have.
json.decode_invalid_numbers(false)

local function fail(path, msg)
    return nil, path .. ": " .. msg
end

-- Where a value sits in the body, e.g. { "requests[2].checks", 0 } with field "key" for
-- requests[2].checks[0].key. The string is only built for an error message: valid bodies,
-- the hot path, make no path strings at all.
local function fail_at(where, field, msg)
    local path = where[1] .. "[" .. where[2] .. "]"
    return fail(field and path .. "." .. field or path, msg)
end

-- cjson decodes both `[]` and `{}` to an empty table, and objects to tables with string keys.
-- Returns the length of a non-empty JSON array, or nil.
local function array_len(v)
    if type(v) ~= "table" then
        return nil
    end
    local n = #v
    if n == 0 then
        return nil
    end
    local count = 0
    for _ in pairs(v) do
        count = count + 1
    end
    return count == n and n or nil
end

local function is_object(v)
    if type(v) ~= "table" then
        return false
    end
    local k = next(v)
    return k == nil or type(k) == "string"
end

-- The first (in byte order, so errors are reproducible) field of `obj` not in `allowed`.
local function unknown_field(obj, allowed)
    local unknown
    for k in pairs(obj) do
        if not allowed[k] then
            unknown = unknown or {}
            unknown[#unknown + 1] = tostring(k)
        end
    end
    if unknown then
        sort(unknown)
        -- Shown in the error message: keep it short and printable.
        return (gsub(sub(unknown[1], 1, 64), "[^\32-\126]", "?")), unknown[1]
    end
end

local function is_integer_in(v, lo, hi)
    -- cjson decodes every number to a double: 1e12 arrives as 1e+12, 1.5 as 1.5.
    return type(v) == "number" and v == floor(v) and v >= lo and v <= hi
end

-- obj[field] must be an integer in lo..hi; a missing one takes `default`, or is required.
local function check_integer(obj, field, where, lo, hi, default, hi_name)
    local v = obj[field]
    if v == nil then
        if default then
            obj[field] = default
            return true
        end
        return fail_at(where, field, "is required")
    end
    if not is_integer_in(v, lo, hi) then
        return fail_at(where, field, format("must be an integer in %d..%d", lo, hi)
                                     .. (hi_name and " (" .. hi_name .. ")" or ""))
    end
    return true
end

-- 1..max bytes of printable ASCII without space (0x21..0x7e): safe in a Redis script's
-- space-separated ARGV, in logs and in error messages.
local function is_token(v, max)
    return type(v) == "string" and #v > 0 and #v <= max and not find(v, "[^\33-\126]")
end

local function check_key(key, where, field, key_start, key_end)
    if key == nil then
        return fail_at(where, field, "is required")
    end
    if not is_token(key, MAX_KEY_BYTES) then
        return fail_at(where, field, "must be a string of 1.." .. MAX_KEY_BYTES
                                     .. " printable ASCII characters (0x21..0x7e)")
    end
    if sub(key, 1, #key_start) ~= key_start then
        return fail_at(where, field, 'must start with "' .. key_start .. '"')
    end
    if key_end and (#key < #key_start + #key_end or sub(key, -#key_end) ~= key_end) then
        return fail_at(where, field, 'must end with "' .. key_end .. '"')
    end
    return true
end

local function check_id(id, where, field)
    if id == nil then
        return fail_at(where, field, "is required")
    end
    if not is_token(id, MAX_ID_BYTES) then
        return fail_at(where, field, "must be a string of 1.." .. MAX_ID_BYTES
                                     .. " printable ASCII characters (0x21..0x7e)")
    end
    return true
end

-- Redis Cluster hashes only the part between the first `{` and the next `}` when it is not
-- empty. Keys here start with `<prefix>:{`, and the prefix has no braces.
local function hash_tag(key)
    local open = find(key, "{", 1, true)
    local close = open and find(key, "}", open + 1, true)
    if close and close > open + 1 then
        return sub(key, open + 1, close - 1)
    end
end

local function check_one(check, where, key_start)
    if not is_object(check) then
        return fail_at(where, nil, "must be an object")
    end
    local alg = check.alg
    if alg == nil then
        alg = "fixed_window"
        check.alg = alg
    elseif type(alg) ~= "string" or not ALGS[alg] then
        return fail_at(where, "alg", "must be " .. ALG_NAMES)
    end
    local field, raw = unknown_field(check, ALG_FIELDS[alg])
    if field then
        if ANY_ALG[raw] then
            return fail_at(where, field, 'unknown field for alg "' .. alg .. '"')
        end
        return fail_at(where, field, "unknown field")
    end

    local ok, err = check_key(check.key, where, "key", key_start)
    if not ok then
        return nil, err
    end
    local spec = ALGS[alg]
    for i = 1, #spec do
        local name, kind, lo, hi = spec[i][1], spec[i][2], spec[i][3], spec[i][4]
        if kind == "int" then
            if type(hi) == "string" then
                ok, err = check_integer(check, name, where, lo, check[hi], nil, hi)
            else
                ok, err = check_integer(check, name, where, lo, hi)
            end
        elseif kind == "key" then
            ok, err = check_key(check[name], where, name, key_start)
            if ok then
                local tag = hash_tag(check.key)
                if not tag or tag ~= hash_tag(check[name]) then
                    ok, err = fail_at(where, name,
                                      "must carry the same non-empty {hash tag} as key")
                end
            end
        else
            ok, err = check_id(check[name], where, name)
        end
        if not ok then
            return nil, err
        end
    end

    -- GCRA's emission interval is floor(period_ms * 1000 / rate) us (scripts/gcra.lua): a
    -- faster rate makes it 0, a tolerance of 0 and every request admitted.
    if alg == "gcra" and check.rate > check.period_ms * MAX_RATE_PER_PERIOD_MS then
        return fail_at(where, "rate", format("must be an integer in 1..%d (period_ms * %d: at"
                                             .. " most one per microsecond)",
                                             check.period_ms * MAX_RATE_PER_PERIOD_MS,
                                             MAX_RATE_PER_PERIOD_MS))
    end

    -- The script splits the window into sub-windows of window_ms / subwindows whole ms.
    if alg == "sliding_window_bounded" and check.window_ms % check.subwindows ~= 0 then
        return fail_at(where, "subwindows", "must divide window_ms")
    end

    ok, err = check_integer(check, "cost", where, 0, MAX_COST, 1)
    if not ok then
        return nil, err
    end
    if alg == "concurrency" and check.cost ~= 1 then
        return fail_at(where, "cost", 'must be 1 for alg "concurrency" (one slot per request)')
    end
    if ALG_FIELDS[alg].lease then
        ok, err = check_integer(check, "lease", where, 0, MAX_LEASE, 0)
        if not ok then
            return nil, err
        end
    end
    if check.shadow == nil then
        check.shadow = false
    elseif type(check.shadow) ~= "boolean" then
        return fail_at(where, "shadow", "must be a boolean")
    end
    return true
end

-- Decodes a JSON object body whose only field is `top`. Returns the value of `top`, or nil
-- and a message.
local function decode_object(body, top)
    local ok, doc = pcall(json.decode, body)
    if not ok then
        return fail("body", "not valid JSON: " .. tostring(doc))
    end
    -- `[]` decodes like `{}`: look at the text itself to tell them apart.
    if type(doc) ~= "table" or not find(body, "^[ \t\r\n]*{") then
        return fail("body", "must be a JSON object")
    end
    local field = unknown_field(doc, { [top] = true })
    if field then
        return fail(field, "unknown field")
    end
    if doc[top] == nil then
        return fail(top, "is required")
    end
    return doc[top]
end

local function check_args(body, key_prefix, who)
    if type(body) ~= "string" then
        error(who .. ": body must be a string", 3)
    end
    if type(key_prefix) ~= "string" or key_prefix == "" then
        error(who .. ": key_prefix must be a non-empty string", 3)
    end
end

-- Validates requests[i] (path `requests[<i - 1>]`); returns nil, or a message naming the field.
local function check_request(request, path, key_start)
    if not is_object(request) then
        return path .. ": must be an object"
    end
    local field = unknown_field(request, { checks = true })
    if field then
        return path .. "." .. field .. ": unknown field"
    end
    local checks = request.checks
    path = path .. ".checks"
    if checks == nil then
        return path .. ": is required"
    end
    local n = array_len(checks)
    if not n or n > MAX_CHECKS then
        return path .. ": must be an array of 1.." .. MAX_CHECKS .. " checks"
    end
    local where = { path, 0 }
    for j = 1, n do
        where[2] = j - 1
        local ok, err = check_one(checks[j], where, key_start)
        if not ok then
            return err
        end
    end
end

--- Decodes and validates a check body.
-- `key_prefix` is the required first part of every key (`TOLLGATE_KEY_PREFIX`).
-- A problem with the body as a whole (not JSON, not an object, an unknown top-level field,
-- `requests` not an array of 1..MAX_REQUESTS, more than MAX_TOTAL_CHECKS checks listed in all)
-- returns nil and a message naming the field: the caller answers 400. A problem inside
-- `requests[i]` refuses that request alone: it becomes `{ refused = <message naming the
-- field> }` and the others are validated as usual.
-- Returns the list of requests (each `{ checks = { {alg=, key=, cost=, shadow=, ...}, ... } }`,
-- with `alg`, `cost` and `shadow` filled in, or `{ refused = message }`), the number of checks
-- of the requests not refused, and the number of requests refused.
function _M.decode(body, key_prefix)
    check_args(body, key_prefix, "validate.decode")
    local requests, err = decode_object(body, "requests")
    if requests == nil then
        return nil, err
    end
    local nreq = array_len(requests)
    if not nreq or nreq > MAX_REQUESTS then
        return fail("requests", "must be an array of 1.." .. MAX_REQUESTS .. " requests")
    end

    local key_start = key_prefix .. ":{"
    local listed, total, refused = 0, 0, 0
    for i = 1, nreq do
        local request = requests[i]
        -- Every check listed counts against the body's bound, refused or not: it bounds the
        -- work of validating the body.
        local n = type(request) == "table" and array_len(request.checks)
        if n then
            listed = listed + n
            if listed > MAX_TOTAL_CHECKS then
                return fail("requests", "must hold at most " .. MAX_TOTAL_CHECKS
                                        .. " checks in total")
            end
        end
        err = check_request(request, "requests[" .. (i - 1) .. "]", key_start)
        if err then
            requests[i] = { refused = err }
            refused = refused + 1
        else
            total = total + n
        end
    end

    return requests, total, refused
end

--- Decodes and validates a release body: `{"releases": [{"key": ..., "id": ...}, ...]}`.
-- Every key must start with `<key_prefix>:{` and end with `}:conc`.
-- Returns the list of releases, or nil and a message naming the field.
function _M.decode_release(body, key_prefix)
    check_args(body, key_prefix, "validate.decode_release")
    local releases, err = decode_object(body, "releases")
    if releases == nil then
        return nil, err
    end
    local n = array_len(releases)
    if not n or n > MAX_RELEASES then
        return fail("releases", "must be an array of 1.." .. MAX_RELEASES .. " releases")
    end
    local key_start = key_prefix .. ":{"
    local allowed = { key = true, id = true }
    local where = { "releases", 0 }
    for i = 1, n do
        local r = releases[i]
        where[2] = i - 1
        if not is_object(r) then
            return fail_at(where, nil, "must be an object")
        end
        local field = unknown_field(r, allowed)
        if field then
            return fail_at(where, field, "unknown field")
        end
        local ok
        ok, err = check_key(r.key, where, "key", key_start, "}:conc")
        if ok then
            ok, err = check_id(r.id, where, "id")
        end
        if not ok then
            return nil, err
        end
    end
    return releases
end

--- Decodes and validates a charge body:
-- `{"charges": [{"key": ..., "delta": <signed integer>, "ttl_ms": ...}, ...]}`.
-- Every key must start with `<key_prefix>:{`; delta is a non-zero integer in
-- -MAX_LIMIT..MAX_LIMIT, ttl_ms in 1..MAX_MS. Returns the list of charges, or nil and a message
-- naming the field.
function _M.decode_charges(body, key_prefix)
    check_args(body, key_prefix, "validate.decode_charges")
    local charges, err = decode_object(body, "charges")
    if charges == nil then
        return nil, err
    end
    local n = array_len(charges)
    if not n or n > MAX_RELEASES then
        return fail("charges", "must be an array of 1.." .. MAX_RELEASES .. " charges")
    end
    local key_start = key_prefix .. ":{"
    local allowed = { key = true, delta = true, ttl_ms = true }
    local where = { "charges", 0 }
    for i = 1, n do
        local c = charges[i]
        where[2] = i - 1
        if not is_object(c) then
            return fail_at(where, nil, "must be an object")
        end
        local field = unknown_field(c, allowed)
        if field then
            return fail_at(where, field, "unknown field")
        end
        local ok
        ok, err = check_key(c.key, where, "key", key_start)
        if ok then
            ok, err = check_integer(c, "delta", where, -MAX_LIMIT, MAX_LIMIT)
        end
        if ok and c.delta == 0 then
            ok, err = fail_at(where, "delta", "must not be 0")
        end
        if ok then
            ok, err = check_integer(c, "ttl_ms", where, 1, MAX_MS)
        end
        if not ok then
            return nil, err
        end
    end
    return charges
end

return _M
