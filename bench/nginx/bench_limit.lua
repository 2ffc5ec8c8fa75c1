-- bench_limit: setup D's access phase, the classic "nginx counts in Redis itself" limiter.
--
-- One fixed-window counter per client IP and minute: INCR and EXPIRE pipelined in one round
-- trip on a connection from the worker's keepalive pool, 429 past the limit, fail open on any
-- Redis error (like Tollgate's failure_mode allow). No validation, no JSON, no script: the
-- cheapest honest way to hit Redis once per request from nginx.

-- luacheck: read globals ngx
local ngx = ngx
local ngx_now = ngx.now
local ngx_log = ngx.log
local ngx_exit = ngx.exit
local ngx_ERR = ngx.ERR
local floor = math.floor
local tonumber = tonumber
local pcall = pcall
local require = require

local _M = { _VERSION = "0.1.0" }

local WINDOW_S = 60
local LIMIT = 1000000000   -- high enough that nothing is denied
local TIMEOUT_MS = 100

local redis        -- resty.redis (OpenResty) or Debian's nginx.redis, the same library
local redis_port   -- from init
local pool_size    -- idle connections kept per worker

--- init_by_lua: the Redis port and the keepalive pool size.
function _M.init(port, pool)
    local ok, mod = pcall(require, "resty.redis")
    redis = ok and mod or require("nginx.redis")
    redis_port, pool_size = port, pool
end

--- access_by_lua: count the request; 429 over the limit; on a Redis error let it through.
function _M.access()
    local red = redis:new()
    red:set_timeout(TIMEOUT_MS)
    local ok, err = red:connect("127.0.0.1", redis_port)
    if not ok then
        ngx_log(ngx_ERR, "redis connect: ", err)
        return
    end
    local key = "bench:{" .. ngx.var.remote_addr .. "}:" .. floor(ngx_now() / WINDOW_S)
    red:init_pipeline(2)
    red:incr(key)
    red:expire(key, WINDOW_S)
    local res
    res, err = red:commit_pipeline()
    if not res then
        red:close()   -- a late reply must never reach the next borrower
        ngx_log(ngx_ERR, "redis INCR/EXPIRE: ", err)
        return
    end
    red:set_keepalive(60000, pool_size)
    if (tonumber(res[1]) or 0) > LIMIT then
        return ngx_exit(429)
    end
end

return _M
