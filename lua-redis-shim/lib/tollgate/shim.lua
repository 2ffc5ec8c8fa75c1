-- tollgate.shim: the lua-redis-shim's HTTP handlers (contract: docs/wire-format.md).
--
-- init(dir) runs in init_by_lua: it reads the configuration from the environment and the Redis
-- scripts from <dir>/scripts, and raises on a bad setting so nginx refuses to start.
-- check(), healthz(), not_found() and too_large() are content handlers.

local cjson = require "cjson"
local validate = require "tollgate.validate"
local redis_pool = require "tollgate.redis_pool"
local new_tab = require "table.new"

-- luacheck: globals ngx
local ngx = ngx
local ngx_log = ngx.log
local ngx_print = ngx.print
local ngx_header = ngx.header
local ngx_sha1_bin = ngx.sha1_bin
local ngx_ERR = ngx.ERR
local ngx_NOTICE = ngx.NOTICE
local req_get_method = ngx.req.get_method
local req_read_body = ngx.req.read_body
local req_get_body_data = ngx.req.get_body_data
local req_get_body_file = ngx.req.get_body_file
local type = type
local error = error
local tostring = tostring
local tonumber = tonumber
local unpack = unpack
local loadstring = loadstring
local io_open = io.open
local os_getenv = os.getenv
local format = string.format
local byte = string.byte
local gsub = string.gsub
local find = string.find
local lower = string.lower
local match = string.match
local concat = table.concat

local _M = { _VERSION = "0.1.0" }

local conf     -- the settings, from the environment (init)
local pool     -- tollgate.redis_pool for conf.redis (init)
local script   -- fixed_window.lua: { name, source, sha } (init)

--------------------------------------------------------------------------------------------
-- Configuration (init phase only: a bad value raises, and nginx does not start)

local function env(name, default)
    local v = os_getenv(name)
    if v == nil or v == "" then
        return default
    end
    return v
end

local function env_integer(name, default, lo, hi)
    local v = env(name)
    if v == nil then
        return default
    end
    local n = match(v, "^%d+$") and tonumber(v)
    if not n or n < lo or n > hi then
        error(format("%s=%s: must be an integer in %d..%d", name, v, lo, hi), 0)
    end
    return n
end

local function read_config()
    local prefix = env("TOLLGATE_KEY_PREFIX", "tollgate")
    if #prefix > 64 or not match(prefix, "^[%w_.-]+$") then
        error("TOLLGATE_KEY_PREFIX=" .. prefix .. ": must match [A-Za-z0-9_.-]{1,64}", 0)
    end
    return {
        key_prefix = prefix,
        redis = {
            host = env("REDIS_HOST", "127.0.0.1"),
            port = env_integer("REDIS_PORT", 6379, 1, 65535),
            user = env("REDIS_USER"),
            password = env("REDIS_PASSWORD"),
            db = env_integer("REDIS_DB", 0, 0, 1000000),
            connect_timeout_ms = env_integer("REDIS_CONNECT_TIMEOUT_MS", 50, 1, 600000),
            send_timeout_ms = env_integer("REDIS_SEND_TIMEOUT_MS", 50, 1, 600000),
            read_timeout_ms = env_integer("REDIS_READ_TIMEOUT_MS", 100, 1, 600000),
            pool_size = env_integer("REDIS_POOL_SIZE", 32, 1, 100000),
            keepalive_ms = env_integer("REDIS_KEEPALIVE_MS", 60000, 0, 86400000),
        },
    }
end

local function to_hex(s)
    return (gsub(s, ".", function(c) return format("%02x", byte(c)) end))
end

-- Reads a script file; its SHA1 is what EVALSHA names, its source is kept for SCRIPT LOAD.
local function load_script(dir, name)
    local path = dir .. "/scripts/" .. name
    local f, err = io_open(path, "rb")
    if not f then
        return nil, err
    end
    local source = f:read("*a")
    f:close()
    -- Syntax errors show at startup rather than as a 503 on the first request.
    local ok
    ok, err = loadstring(source or "", "=" .. path)
    if not ok then
        return nil, err
    end
    return { name = name, source = source, sha = to_hex(ngx_sha1_bin(source)) }
end

--- init_by_lua: reads the environment and the scripts under `dir` (the shim's directory).
function _M.init(dir)
    if type(dir) ~= "string" then
        error("shim.init: dir must be the shim's directory", 2)
    end
    conf = read_config()
    pool = redis_pool.new(conf.redis)
    local err
    script, err = load_script(dir, "fixed_window.lua")
    if not script then
        error("cannot load the Redis script: " .. tostring(err), 0)
    end
end

--- init_worker_by_lua: says once per worker what it runs with.
function _M.init_worker()
    local r = conf.redis
    ngx_log(ngx_NOTICE, "tollgate shim ", _M._VERSION, ": Redis client ", redis_pool.client,
            ", redis ", r.host, ":", r.port, " db ", r.db, ", pool ", r.pool_size,
            " per worker, script ", script.name, " ", script.sha)
end

--------------------------------------------------------------------------------------------
-- Replies

local function send(status, body)
    ngx.status = status
    ngx_header["Content-Type"] = "application/json"
    ngx_header["Content-Length"] = #body
    ngx_print(body)
end

-- A private cjson instance; OpenResty's cjson can leave "/" unescaped, Debian's cannot.
local json = cjson.new()
if json.encode_escape_forward_slash then
    json.encode_escape_forward_slash(false)
end

local function send_error(status, code, message)
    return send(status, json.encode({ error = code, message = message }))
end

-- Counters reach 10^12 + 10^9, more digits than cjson prints without an exponent (Debian's
-- cjson 2.1.0 caps encode_number_precision at 14), so integers are formatted here.
local function int(n)
    return format("%d", n)
end

-- ARGV of fixed_window.lua: KEYS first, then R, then per request n and limit, ttl_ms, cost.
local function script_args(requests, total)
    local args, n = new_tab(4 * total + #requests + 1, 0), 0
    for i = 1, #requests do
        local checks = requests[i].checks
        for j = 1, #checks do
            n = n + 1
            args[n] = checks[j].key
        end
    end
    n = n + 1
    args[n] = int(#requests)
    for i = 1, #requests do
        local checks = requests[i].checks
        n = n + 1
        args[n] = int(#checks)
        for j = 1, #checks do
            local c = checks[j]
            args[n + 1], args[n + 2], args[n + 3] = int(c.limit), int(c.ttl_ms), int(c.cost)
            n = n + 3
        end
    end
    return args
end

-- One EVALSHA; on NOSCRIPT (the cache was flushed, Redis restarted or failed over) SCRIPT LOAD
-- and retry once.
local function eval(red, nkeys, args)
    local res, err = red:evalsha(script.sha, nkeys, unpack(args))
    if res == false and find(tostring(err), "^NOSCRIPT") then
        local sha
        sha, err = red:script("load", script.source)
        if not sha then
            return nil, "SCRIPT LOAD " .. script.name .. ": " .. tostring(err)
        end
        res, err = red:evalsha(script.sha, nkeys, unpack(args))
    end
    if not res then
        return nil, "EVALSHA " .. script.name .. ": " .. tostring(err)
    end
    return res
end

-- The 200 body from the script's flat reply (see the contract atop fixed_window.lua).
local function encode_results(requests, total, reply)
    if type(reply) ~= "table" or #reply ~= #requests + 2 * total then
        return nil, "unexpected reply from " .. script.name
    end
    local out, pos = { '{"results":[' }, 1
    for i = 1, #requests do
        local checks = requests[i].checks
        local admitted = reply[pos] == 1
        out[#out + 1] = (i > 1 and ',{"allowed":' or '{"allowed":') .. tostring(admitted)
                        .. ',"checks":['
        for j = 1, #checks do
            local c = checks[j]
            local count, pttl = tonumber(reply[pos + 2 * j - 1]), tonumber(reply[pos + 2 * j])
            if not count or not pttl then
                return nil, "unexpected reply from " .. script.name
            end
            local remaining = c.limit - count
            out[#out + 1] = format(
                '%s{"allowed":%s,"limit":%s,"count":%s,"remaining":%s,"reset_ms":%s}',
                j > 1 and "," or "",
                tostring(admitted or count + c.cost <= c.limit),
                int(c.limit), int(count), int(remaining > 0 and remaining or 0),
                int(pttl >= 0 and pttl or c.ttl_ms))
        end
        out[#out + 1] = "]}"
        pos = pos + 1 + 2 * #checks
    end
    out[#out + 1] = "]}"
    return concat(out)
end

-- Runs the script over every check of the body on one pooled connection.
local function run(requests, total)
    local red, err = pool:connect()
    if not red then
        return nil, err
    end
    local reply
    reply, err = eval(red, total, script_args(requests, total))
    if not reply then
        pool:close(red)
        return nil, "redis " .. pool.where .. ": " .. err
    end
    pool:keepalive(red)
    return encode_results(requests, total, reply)
end

-- `application/json`, in any case, with or without parameters (`; charset=utf-8`).
local function is_json(content_type)
    return lower(match(content_type, "^[ \t]*([^; \t]*)")) == "application/json"
end

--------------------------------------------------------------------------------------------
-- Handlers

--- POST /v1/check
function _M.check()
    if req_get_method() ~= "POST" then
        ngx_header["Allow"] = "POST"
        return send_error(405, "method_not_allowed", "this path accepts POST only")
    end
    local content_type = ngx.var.content_type
    if content_type and not is_json(content_type) then
        return send_error(415, "unsupported_media_type",
                          "Content-Type must be application/json")
    end

    req_read_body()
    local body = req_get_body_data()
    if not body then
        if req_get_body_file() then
            -- Cannot happen with client_body_buffer_size = client_max_body_size (nginx.conf).
            return _M.too_large()
        end
        body = ""
    end

    local requests, total = validate.decode(body, conf.key_prefix)
    if not requests then
        return send_error(400, "bad_request", total)
    end

    local out, err = run(requests, total)
    if not out then
        ngx_log(ngx_ERR, "check: ", err)
        return send_error(503, "backend_unavailable", err)
    end
    return send(200, out)
end

--- GET /healthz: 200 when Redis answers PING.
function _M.healthz()
    local method = req_get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx_header["Allow"] = "GET, HEAD"
        return send_error(405, "method_not_allowed", "this path accepts GET and HEAD only")
    end
    local red, err = pool:connect()
    if red then
        local pong
        pong, err = red:ping()
        if pong then
            pool:keepalive(red)
            return send(200, '{"status":"ok"}')
        end
        pool:close(red)
        err = "redis " .. pool.where .. ": PING: " .. tostring(err)
    end
    ngx_log(ngx_ERR, "healthz: ", err)
    return send_error(503, "backend_unavailable", err)
end

--- Any other path.
function _M.not_found()
    return send_error(404, "not_found", "no such path: use POST /v1/check or GET /healthz")
end

--- error_page 413: a body over client_max_body_size.
function _M.too_large()
    return send_error(413, "payload_too_large",
                      format("body: at most %d bytes", validate.MAX_BODY_BYTES))
end

return _M
