-- tollgate.validate: decodes and validates a `POST /v1/check` body (docs/wire-format.md).
--
-- Pure functions: no ngx API, no I/O. Every error message names the offending field with its
-- path, e.g. `requests[0].checks[2].limit: must be an integer in 1..1000000000000`.

local cjson = require "cjson"

local type = type
local pairs = pairs
local next = next
local pcall = pcall
local tostring = tostring
local floor = math.floor
local find = string.find
local sub = string.sub
local gsub = string.gsub
local sort = table.sort
local concat = table.concat

local _M = { _VERSION = "0.1.0" }

-- The bounds of docs/wire-format.md.
local MAX_REQUESTS = 256
local MAX_CHECKS = 32
local MAX_TOTAL_CHECKS = 1024
local MAX_KEY_BYTES = 512
local MAX_LIMIT = 1e12
local MAX_TTL_MS = 86400000
local MAX_COST = 1e9
-- A valid body nests 4 deep; the cap turns a deeply nested body into a 400, not a C stack
-- overflow.
local MAX_DEPTH = 16

_M.MAX_BODY_BYTES = 64 * 1024

-- A private cjson instance, so these settings do not leak into other users of the module.
local json = cjson.new()
json.decode_max_depth(MAX_DEPTH)
-- Reject NaN, Infinity and hex numbers, which plain JSON does not have.
json.decode_invalid_numbers(false)

local ALLOWED_FIELDS = {
    [""] = { requests = true },
    request = { checks = true },
    check = { alg = true, key = true, limit = true, ttl_ms = true, cost = true },
}

local function fail(path, msg)
    return nil, path .. ": " .. msg
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
        return (gsub(sub(unknown[1], 1, 64), "[^\32-\126]", "?"))
    end
end

local function is_integer_in(v, lo, hi)
    -- cjson decodes every number to a double: 1e12 arrives as 1e+12, 1.5 as 1.5.
    return type(v) == "number" and v == floor(v) and v >= lo and v <= hi
end

local function check_integer(obj, field, path, lo, hi, default)
    local v = obj[field]
    if v == nil then
        if default then
            obj[field] = default
            return true
        end
        return fail(path, "is required")
    end
    if not is_integer_in(v, lo, hi) then
        return fail(path, "must be an integer in " .. lo .. ".." .. ("%.0f"):format(hi))
    end
    return true
end

local function check_key(key, path, key_start)
    if key == nil then
        return fail(path, "is required")
    end
    if type(key) ~= "string" or #key == 0 or #key > MAX_KEY_BYTES
        or find(key, "[^\33-\126]")
    then
        return fail(path, "must be a string of 1.." .. MAX_KEY_BYTES
                          .. " printable ASCII characters (0x21..0x7e)")
    end
    if sub(key, 1, #key_start) ~= key_start then
        return fail(path, 'must start with "' .. key_start .. '"')
    end
    return true
end

local function check_one(check, path, key_start)
    if not is_object(check) then
        return fail(path, "must be an object")
    end
    local field = unknown_field(check, ALLOWED_FIELDS.check)
    if field then
        return fail(path .. "." .. field, "unknown field")
    end
    if check.alg ~= nil and check.alg ~= "fixed_window" then
        return fail(path .. ".alg", 'must be "fixed_window"')
    end
    local ok, err = check_key(check.key, path .. ".key", key_start)
    if ok then
        ok, err = check_integer(check, "limit", path .. ".limit", 1, MAX_LIMIT)
    end
    if ok then
        ok, err = check_integer(check, "ttl_ms", path .. ".ttl_ms", 1, MAX_TTL_MS)
    end
    if ok then
        ok, err = check_integer(check, "cost", path .. ".cost", 0, MAX_COST, 1)
    end
    return ok, err
end

--- Decodes and validates a check body.
-- `key_prefix` is the required first part of every key (`TOLLGATE_KEY_PREFIX`).
-- Returns the list of requests (each `{ checks = { {key=, limit=, ttl_ms=, cost=}, ... } }`,
-- `cost` filled in) and the total number of checks, or nil and a message naming the field.
function _M.decode(body, key_prefix)
    if type(body) ~= "string" then
        error("validate.decode: body must be a string", 2)
    end
    if type(key_prefix) ~= "string" or key_prefix == "" then
        error("validate.decode: key_prefix must be a non-empty string", 2)
    end

    local ok, doc = pcall(json.decode, body)
    if not ok then
        return fail("body", "not valid JSON: " .. tostring(doc))
    end
    -- `[]` decodes like `{}`: look at the text itself to tell them apart.
    if type(doc) ~= "table" or not find(body, "^[ \t\r\n]*{") then
        return fail("body", "must be a JSON object")
    end
    local field = unknown_field(doc, ALLOWED_FIELDS[""])
    if field then
        return fail(field, "unknown field")
    end

    local requests = doc.requests
    if requests == nil then
        return fail("requests", "is required")
    end
    local nreq = array_len(requests)
    if not nreq or nreq > MAX_REQUESTS then
        return fail("requests", "must be an array of 1.." .. MAX_REQUESTS .. " requests")
    end

    local key_start = key_prefix .. ":{"
    local total = 0
    for i = 1, nreq do
        local request = requests[i]
        local path = "requests[" .. (i - 1) .. "]"
        if not is_object(request) then
            return fail(path, "must be an object")
        end
        field = unknown_field(request, ALLOWED_FIELDS.request)
        if field then
            return fail(path .. "." .. field, "unknown field")
        end

        local checks = request.checks
        path = path .. ".checks"
        if checks == nil then
            return fail(path, "is required")
        end
        local n = array_len(checks)
        if not n or n > MAX_CHECKS then
            return fail(path, "must be an array of 1.." .. MAX_CHECKS .. " checks")
        end
        total = total + n
        if total > MAX_TOTAL_CHECKS then
            return fail("requests", "must hold at most " .. MAX_TOTAL_CHECKS
                                    .. " checks in total")
        end

        for j = 1, n do
            local err
            ok, err = check_one(checks[j], concat({ path, "[", j - 1, "]" }), key_start)
            if not ok then
                return nil, err
            end
        end
    end

    return requests, total
end

return _M
