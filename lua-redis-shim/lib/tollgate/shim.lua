-- tollgate.shim: the lua-redis-shim's HTTP handlers (contract: docs/wire-format.md).
--
-- init(dir) runs in init_by_lua: it reads the configuration from the environment and the Redis
-- scripts from <dir>/scripts (composing the check script, see scripts/main.lua), and raises on
-- a bad setting so nginx refuses to start.
-- check(), release(), healthz(), metrics(), not_found() and too_large() are content handlers.
-- With a shared secret (TOLLGATE_SHIM_SECRET), check() and release() answer 401 unless the
-- request carries it in x-tollgate-secret; /healthz and /metrics stay open.

local cjson = require "cjson"
local validate = require "tollgate.validate"
local contract = require "tollgate.contract"
local settings = require "tollgate.settings"
local bounds = require "tollgate.bounds"
local redis_pool = require "tollgate.redis_pool"
local metrics = require "tollgate.metrics"
local new_tab = require "table.new"
local bit = require "bit"

-- luacheck: globals ngx
local ngx = ngx
local ngx_log = ngx.log
local ngx_print = ngx.print
local ngx_header = ngx.header
local ngx_sha1_bin = ngx.sha1_bin
local ngx_ERR = ngx.ERR
local ngx_NOTICE = ngx.NOTICE
local ngx_WARN = ngx.WARN
local ngx_INFO = ngx.INFO
local req_get_method = ngx.req.get_method
local req_read_body = ngx.req.read_body
local req_get_body_data = ngx.req.get_body_data
local req_get_body_file = ngx.req.get_body_file
local type = type
local error = error
local tostring = tostring
local loadstring = loadstring
local io_open = io.open
local format = string.format
local sub = string.sub
local byte = string.byte
local gsub = string.gsub
local lower = string.lower
local match = string.match
local concat = table.concat
local bxor = bit.bxor
local bor = bit.bor
local metrics_now = metrics.now

local _M = { _VERSION = "0.2.0" }

local conf     -- the settings, from the environment (init)
local pool     -- tollgate.redis_pool for conf.redis (init)
local script   -- the composed check script: { name, source, sha, layout } (init)
local release_script -- release.lua: { name, source, sha } (init)
local charge_script -- charge.lua: { name, source, sha } (init)
local secret   -- what x-tollgate-secret must be, or nil: none required (init)

-- The algorithms, in the order their script files are composed, with what each check sends
-- them: its KEYS and its ARGV (tollgate.contract, and the contract atop each script file).
local ALGS = contract.ALGS
local ALG_BY_NAME = contract.BY_NAME

--------------------------------------------------------------------------------------------
-- Configuration (init phase only: a bad value raises, and nginx does not start)

local function to_hex(s)
    return (gsub(s, ".", function(c) return format("%02x", byte(c)) end))
end

local function read_file(path)
    local f, err = io_open(path, "rb")
    if not f then
        return nil, err
    end
    local source = f:read("*a")
    f:close()
    if not source then
        return nil, path .. ": cannot read"
    end
    -- Syntax errors show at startup rather than as a 503 on the first request.
    local ok
    ok, err = loadstring(source, "=" .. path)
    if not ok then
        return nil, err
    end
    return source
end

-- A script to run by EVALSHA: its SHA1 is what EVALSHA names, its source is kept for
-- SCRIPT LOAD.
local function new_script(name, source, layout)
    return { name = name, source = source, sha = to_hex(ngx_sha1_bin(source)), layout = layout }
end

local function count_lines(s)
    local _, n = gsub(s, "\n", "")
    return n
end

-- The check script: prelude, every algorithm and main.lua as one chunk (the layout is
-- described atop scripts/main.lua). `layout` says where each file starts in it, since Redis
-- reports errors by line of the composed source (two lines further down in the function
-- library, after its `#!lua` line and its setup()).
local function compose(dir)
    local parts, layout, line = {}, {}, 1
    local function add(file, head, tail)
        local source, err = read_file(dir .. "/scripts/" .. file)
        if not source then
            return nil, err
        end
        layout[#layout + 1] = file .. " at line " .. (line + 1)
        local part = head .. "\n" .. source .. "\n" .. tail .. "\n"
        parts[#parts + 1] = part
        line = line + count_lines(part)
        return true
    end
    -- The prelude's arguments: the bounds the scripts act on.
    local args = format("%d, %d", bounds.LEASE_SHARE, bounds.COUNTER_GRACE_MS)
    local ok, err = add("prelude.lua", "local H = (function(...)", "end)(" .. args .. ")")
    if not ok then
        return nil, err
    end
    -- Each algorithm is instantiated on first use: a call pays only for the ones it runs.
    parts[#parts + 1] = "local LOAD = {}\n"
    line = line + 1
    for i = 1, #ALGS do
        local name = ALGS[i].name
        ok, err = add(name .. ".lua", "LOAD." .. name .. " = function() return (function(...)",
                      "end)(H) end")
        if not ok then
            return nil, err
        end
    end
    parts[#parts + 1] = "local ALG = setmetatable({}, { __index = function(t, name) "
                        .. "local load = LOAD[name]; if load then t[name] = load() end; "
                        .. "return rawget(t, name) end })\n"
    line = line + 1
    local body = concat(parts)
    local main
    main, err = read_file(dir .. "/scripts/main.lua")
    if not main then
        return nil, err
    end
    layout[#layout + 1] = "main.lua at line " .. (line + 1)
    local source = body .. "return (function(...)\n" .. main .. "\nend)(ALG, H)\n"
    ok, err = loadstring(source, "=composed check script")
    if not ok then
        return nil, err
    end
    local s = new_script("check script", source, concat(layout, ", "))
    -- The same parts as a function library, named after the script's SHA so that shims of
    -- different versions never replace each other's: loaded once, then one FCALL per call.
    local tag = sub(s.sha, 1, 16)
    s.fname = "tollgate_check_" .. tag
    -- Redis offers only register_function while it loads a library (no redis.call, which
    -- the prelude keeps a reference to), so the parts are set up on the first call.
    s.library = "#!lua name=tollgate_" .. tag .. "\nlocal function setup()\n" .. body
                .. "return H, ALG end\nlocal H, ALG\n"
                .. "redis.register_function{function_name = '" .. s.fname .. "', "
                .. "callback = function(KEYS, ARGV) if not H then H, ALG = setup() end "
                .. "return (function(...)\n" .. main .. "\nend)(ALG, H) end}\n"
    ok, err = loadstring("--" .. s.library, "=check function library")
    if not ok then
        return nil, err
    end
    return s
end

--- init_by_lua: reads the environment and the scripts under `dir` (the shim's directory).
function _M.init(dir)
    if type(dir) ~= "string" then
        error("shim.init: dir must be the shim's directory", 2)
    end
    conf = settings.read()
    secret = conf.secret
    metrics.init(conf.redis.pool_size)
    -- Instrumented here, where the pool is built: new connections and script loads.
    pool = redis_pool.new(conf.redis, {
        on_new_connection = metrics.reconnected,
        on_script_load = metrics.script_loaded,
    })
    local err
    script, err = compose(dir)
    if not script then
        error("cannot load the Redis scripts: " .. tostring(err), 0)
    end
    local source
    source, err = read_file(dir .. "/scripts/release.lua")
    if not source then
        error("cannot load the Redis scripts: " .. tostring(err), 0)
    end
    release_script = new_script("release.lua", source)
    source, err = read_file(dir .. "/scripts/charge.lua")
    if not source then
        error("cannot load the Redis scripts: " .. tostring(err), 0)
    end
    charge_script = new_script("charge.lua", source)
end

--- init_worker_by_lua: says once per worker what it runs with.
function _M.init_worker()
    local r = conf.redis
    ngx_log(ngx_NOTICE, "tollgate shim ", _M._VERSION, ": Redis client ", redis_pool.client,
            ", redis ", r.host, ":", r.port, " db ", r.db, ", pool ", r.pool_size,
            " per worker, check script ", script.sha, " (", script.layout, "), release.lua ",
            release_script.sha)
    if conf.test_clock then
        ngx_log(ngx_WARN, "TOLLGATE_TEST_CLOCK is on: any client may set the time of its checks"
                .. " (x-tollgate-test-now-ms); for tests only, never in production")
    end
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

-- What the scripts return for a time that never comes (a cost above the limit), sent as the
-- largest u64, as the Rust models (src/algorithms.rs) have it.
local NEVER = "18446744073709551615"

-- KEYS and ARGV of the check script (see scripts/main.lua), as one list, and the number of
-- KEYS: every check's keys, then R, then per request n and per check one
-- "<alg> <cost> <shadow> <lease> <args...>". One ARGV per check keeps the EVALSHA's arguments
-- (passed through unpack) far below LuaJIT's limit of 8000. Refused requests are left out: R =
-- `accepted`, the number of the others. `test_now_ms` (the test clock only): a last ARGV
-- "clock <ms>".
local function script_args(requests, total, accepted, test_now_ms)
    local keys, nkeys = new_tab(2 * total, 0), 0
    local argv, nargv = new_tab(total + accepted + 2, 0), 1
    argv[1] = int(accepted)
    local words = {}
    for i = 1, #requests do
        local checks = requests[i].checks -- nil when refused
        if checks then
            nargv = nargv + 1
            argv[nargv] = int(#checks)
            for j = 1, #checks do
                local c = checks[j]
                local alg = ALG_BY_NAME[c.alg]
                for k = 1, #alg.keys do
                    nkeys = nkeys + 1
                    keys[nkeys] = c[alg.keys[k]]
                end
                words[1], words[2], words[3] = c.alg, int(c.cost), c.shadow and "1" or "0"
                words[4] = int(c.lease or 0)
                local args = alg.args
                for k = 1, #args do
                    local v = c[args[k]]
                    words[4 + k] = type(v) == "number" and int(v) or v
                end
                nargv = nargv + 1
                argv[nargv] = concat(words, " ", 1, 4 + #args)
            end
        end
    end
    if test_now_ms then
        nargv = nargv + 1
        argv[nargv] = "clock " .. test_now_ms
    end
    for k = 1, nargv do
        keys[nkeys + k] = argv[k]
    end
    return keys, nkeys
end

-- How each script's KEYS and ARGV split by hash slot on Redis Cluster (tollgate.cluster).
local SHAPES = require("tollgate.cluster").shapes(ALG_BY_NAME)

-- Runs a script: one EVALSHA on a pooled connection (SCRIPT LOAD and one retry on NOSCRIPT),
-- following Sentinel failovers, or on Redis Cluster once per hash slot (tollgate.redis_pool).
local function run(s, nkeys, args)
    -- release.lua and charge.lua share a shape: KEYS[i] with ARGV[i], a count for a reply.
    return pool:run(s, nkeys, args, s == script and SHAPES.check or SHAPES.release)
end

local CHECK_FORMAT = '%s{"allowed":%s,"limit":%s,%s"remaining":%s,"reset_ms":%s,'
                     .. '"retry_after_ms":%s%s}'
-- Each check's answer in the script's reply: fits, count, remaining, reset_ms, retry_after_ms,
-- lease, lease_ms.
local WIDTH = contract.REPLY_WIDTH

-- Appends to `out` the result of one request whose checks' answers start at reply[pos];
-- returns where the next request's answers start, or nil and a message.
local function encode_request(out, checks, reply, pos)
    out[#out + 1] = '{"allowed":' .. tostring(reply[pos] == 1) .. ',"checks":['
    for j = 1, #checks do
        local c = checks[j]
        local alg = ALG_BY_NAME[c.alg]
        local at = pos + WIDTH * (j - 1) + 1
        local fits, count, remaining, reset, retry, lease, lease_ms =
            reply[at], reply[at + 1], reply[at + 2], reply[at + 3], reply[at + 4],
            reply[at + 5], reply[at + 6]
        if type(count) ~= "number" or type(remaining) ~= "number"
            or type(reset) ~= "number" or type(retry) ~= "number"
            or type(lease) ~= "number" or type(lease_ms) ~= "number"
        then
            return nil, "unexpected reply from the " .. script.name
        end
        out[#out + 1] = format(CHECK_FORMAT,
            j > 1 and "," or "", tostring(fits == 1), int(c[alg.limit]),
            alg.count and '"count":' .. int(count) .. "," or "",
            -- The scripts never answer a negative remaining or reset; a u64 cannot be one.
            int(remaining > 0 and remaining or 0), int(reset > 0 and reset or 0),
            retry < 0 and NEVER or int(retry),
            lease > 0 and ',"lease":' .. int(lease) .. ',"lease_ms":' .. int(lease_ms) or "")
    end
    out[#out + 1] = "]}"
    return pos + 1 + WIDTH * #checks
end

-- The 200 body from the check script's flat reply (see the contract atop scripts/main.lua),
-- which answers the `accepted` requests not refused, and how many requests it admits. A
-- refused request is answered `{"refused":"<message>"}` in its place. The reply ends with
-- Redis's time in ms, sent as `now_ms` unless it is -1 (no TIME for this ACL user); with no
-- request accepted there was no script call, so no reply and no `now_ms`.
local function encode_results(requests, total, accepted, reply)
    local size = accepted + WIDTH * total
    local now = -1
    if accepted > 0 then
        now = type(reply) == "table" and reply[size + 1]
        if type(now) ~= "number" or #reply ~= size + 1 then
            return nil, "unexpected reply from the " .. script.name
        end
    end
    local out, pos, allowed = { '{"results":[' }, 1, 0
    for i = 1, #requests do
        if i > 1 then
            out[#out + 1] = ","
        end
        local checks = requests[i].checks
        if checks then
            if reply[pos] == 1 then
                allowed = allowed + 1
            end
            local err
            pos, err = encode_request(out, checks, reply, pos)
            if not pos then
                return nil, err
            end
        else
            out[#out + 1] = '{"refused":' .. json.encode(requests[i].refused) .. "}"
        end
    end
    out[#out + 1] = now >= 0 and '],"now_ms":' .. int(now) .. "}" or "]}"
    return concat(out), nil, allowed
end

-- a == b in a time that depends on their lengths only: every byte up to the longer length is
-- compared, with no early exit.
local function equal_constant_time(a, b)
    local la, lb = #a, #b
    local diff = bxor(la, lb)
    for i = 1, la > lb and la or lb do
        diff = bor(diff, bxor(byte(a, i) or 0, byte(b, i) or 0))
    end
    return diff == 0
end

-- True when no secret is configured or x-tollgate-secret holds it; else sends the 401. Neither
-- the secret nor the presented value is ever logged.
local function authorized()
    if not secret then
        return true
    end
    local presented = ngx.var.http_x_tollgate_secret
    if presented and equal_constant_time(presented, secret) then
        return true
    end
    -- Info level: a misconfigured gateway would otherwise log a line per request.
    ngx_log(ngx_INFO, "unauthorized: ", presented and "wrong" or "missing",
            " x-tollgate-secret from ", ngx.var.remote_addr)
    send_error(401, "unauthorized", "missing or wrong x-tollgate-secret")
    return false
end

-- `application/json`, in any case, with or without parameters (`; charset=utf-8`).
local function is_json(content_type)
    return lower(match(content_type, "^[ \t]*([^; \t]*)")) == "application/json"
end

-- The body of a POST with a JSON (or no) content type, or nil once the error reply is sent.
local function read_post_body()
    if req_get_method() ~= "POST" then
        ngx_header["Allow"] = "POST"
        send_error(405, "method_not_allowed", "this path accepts POST only")
        return nil
    end
    local content_type = ngx.var.content_type
    if content_type and not is_json(content_type) then
        send_error(415, "unsupported_media_type", "Content-Type must be application/json")
        return nil
    end

    req_read_body()
    local body = req_get_body_data()
    if not body then
        if req_get_body_file() then
            -- Cannot happen with client_body_buffer_size = client_max_body_size (nginx.conf).
            _M.too_large()
            return nil
        end
        body = ""
    end
    return body
end

--------------------------------------------------------------------------------------------
-- Handlers

--- POST /v1/check
function _M.check()
    if not authorized() then
        return
    end
    local body = read_post_body()
    if not body then
        return
    end
    -- A problem with the body is a 400; one inside requests[i] refuses that request alone.
    local requests, total, refused = validate.decode(body, conf.key_prefix)
    if not requests then
        return send_error(400, "bad_request", total)
    end

    -- The test clock (TOLLGATE_TEST_CLOCK; off in production): the instant to decide at.
    local test_now_ms
    if conf.test_clock then
        test_now_ms = ngx.var.http_x_tollgate_test_now_ms
        if test_now_ms and (#test_now_ms > 15 or not match(test_now_ms, "^%d+$")) then
            return send_error(400, "bad_request", "x-tollgate-test-now-ms: must be 1..15 digits")
        end
    end

    local accepted = #requests - refused
    local reply, err
    if accepted > 0 then
        local args, nkeys = script_args(requests, total, accepted, test_now_ms)
        local started = metrics_now()
        reply, err = run(script, nkeys, args)
        metrics.observe_redis(metrics_now() - started)
    end
    local out, allowed
    if reply or accepted == 0 then
        out, err, allowed = encode_results(requests, total, accepted, reply)
    end
    if not out then
        metrics.redis_error()
        ngx_log(ngx_ERR, "check: ", err)
        return send_error(503, "backend_unavailable", err)
    end
    metrics.checked(total, allowed, accepted - allowed, refused)
    return send(200, out)
end

-- The shape /v1/release and /v1/charge share: a body of items decoded by `decode`, one KEYS
-- entry per item (its key) with one ARGV entry (`arg(item)`), one call of `s` whose reply is a
-- count, answered as {"<field>": count}.
local function keyed(what, s, decode, arg, field)
    if not authorized() then
        return
    end
    local body = read_post_body()
    if not body then
        return
    end
    local items, err = decode(body, conf.key_prefix)
    if not items then
        return send_error(400, "bad_request", err)
    end
    local n = #items
    local args = new_tab(2 * n, 0)
    for i = 1, n do
        args[i], args[n + i] = items[i].key, arg(items[i])
    end
    local started = metrics_now()
    local count
    count, err = run(s, n, args)
    metrics.observe_redis(metrics_now() - started)
    if count and type(count) ~= "number" then
        count, err = nil, "unexpected reply from " .. s.name
    end
    if not count then
        metrics.redis_error()
        ngx_log(ngx_ERR, what, ": ", err)
        return send_error(503, "backend_unavailable", err)
    end
    return send(200, '{"' .. field .. '":' .. int(count) .. "}")
end

local function charge_arg(c)
    return int(c.delta) .. " " .. int(c.ttl_ms)
end

local function release_arg(r)
    return r.id
end

--- POST /v1/charge: usage consumed by responses that ended, added to window counters.
function _M.charge()
    return keyed("charge", charge_script, validate.decode_charges, charge_arg, "charged")
end

--- POST /v1/release: frees concurrency slots.
function _M.release()
    return keyed("release", release_script, validate.decode_release, release_arg, "released")
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
    metrics.redis_error()
    ngx_log(ngx_ERR, "healthz: ", err)
    return send_error(503, "backend_unavailable", err)
end

--- GET /metrics: the Prometheus text format (tollgate.metrics). Open like /healthz (no
-- secret), on the same listener.
function _M.metrics()
    local method = req_get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx_header["Allow"] = "GET, HEAD"
        return send_error(405, "method_not_allowed", "this path accepts GET and HEAD only")
    end
    local body = metrics.render()
    ngx.status = 200
    ngx_header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    ngx_header["Content-Length"] = #body
    ngx_print(body)
end

--- Any other path.
function _M.not_found()
    return send_error(404, "not_found",
                      "no such path: use POST /v1/check, POST /v1/release, POST /v1/charge,"
                      .. " GET /healthz or GET /metrics")
end

--- error_page 413: a body over client_max_body_size.
function _M.too_large()
    return send_error(413, "payload_too_large",
                      format("body: at most %d bytes", bounds.MAX_BODY_BYTES))
end

return _M
