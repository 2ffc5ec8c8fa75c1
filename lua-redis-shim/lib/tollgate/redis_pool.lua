-- tollgate.redis_pool: Redis connections from the per-worker cosocket keepalive pool.
--
-- The pool: each nginx worker keeps up to `pool_size` idle connections to Redis (one pool, named
-- after host, port, user and db). `connect()` takes an idle one when there is one, else opens a
-- new one; `keepalive()` gives it back after a request that fully succeeded, and closes it when
-- the pool is already full. Any error closes the connection instead: after a timeout a late
-- reply may still be on its way and would be read by the next borrower as its own. So Redis sees
-- at most SHIM_WORKERS x pool_size idle connections, plus short-lived ones during bursts of more
-- than pool_size concurrent requests per worker. AUTH and SELECT stick to a connection, so they
-- are sent only on a fresh one (get_reused_times() == 0).

-- luacheck: read globals ngx
local ngx = ngx
local type = type
local pcall = pcall
local rawget = rawget
local tostring = tostring
local require = require
local setmetatable = setmetatable

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

-- OpenResty and Kong ship `resty.redis`; Debian packages the same library as `nginx.redis`.
local redis, module_name
do
    local ok, mod = pcall(require, "resty.redis")
    if ok then
        redis, module_name = mod, "resty.redis"
    else
        ok, mod = pcall(require, "nginx.redis")
        if not ok then
            error("neither resty.redis nor nginx.redis can be loaded: " .. tostring(mod))
        end
        redis, module_name = mod, "nginx.redis"
    end
end

-- Which client library is in use, e.g. "nginx.redis 0.27".
_M.client = module_name .. " " .. tostring(rawget(redis, "_VERSION"))

-- Both libraries generate a Redis command for any unknown method name (red:foo() sends FOO),
-- so probe the module table itself. nginx.redis 0.27 (Debian 12) predates set_timeouts; the
-- cosocket underneath has had settimeouts since lua-nginx-module 0.10.7.
local has_set_timeouts = rawget(redis, "set_timeouts") ~= nil

local function set_timeouts(red, connect_ms, send_ms, read_ms)
    if has_set_timeouts then
        return red:set_timeouts(connect_ms, send_ms, read_ms)
    end
    return rawget(red, "_sock"):settimeouts(connect_ms, send_ms, read_ms)
end

--- A pool for one Redis server.
-- opts: host, port, user (optional), password (optional), db, connect_timeout_ms,
-- send_timeout_ms, read_timeout_ms, pool_size, keepalive_ms.
function _M.new(opts)
    if type(opts) ~= "table" or type(opts.host) ~= "string" or type(opts.port) ~= "number" then
        error("redis_pool.new: opts.host (string) and opts.port (number) are required", 2)
    end
    local self = {
        opts = opts,
        where = opts.host .. ":" .. opts.port,
        connect_opts = {
            pool = "tollgate:" .. opts.host .. ":" .. opts.port .. ":" .. (opts.user or "")
                   .. ":" .. opts.db,
            pool_size = opts.pool_size,
        },
    }
    return setmetatable(self, mt)
end

--- Borrows a ready connection (authenticated, database selected), or returns nil, err.
function _M.connect(self)
    local opts = self.opts
    local red, err = redis:new()
    if not red then
        return nil, "redis " .. self.where .. ": " .. tostring(err)
    end
    set_timeouts(red, opts.connect_timeout_ms, opts.send_timeout_ms, opts.read_timeout_ms)

    local ok
    ok, err = red:connect(opts.host, opts.port, self.connect_opts)
    if not ok then
        return nil, "redis " .. self.where .. ": connect: " .. tostring(err)
    end

    local reused = red:get_reused_times()
    if reused == 0 then
        if opts.password then
            if opts.user then
                ok, err = red:auth(opts.user, opts.password)
            else
                ok, err = red:auth(opts.password)
            end
            if not ok then
                red:close()
                return nil, "redis " .. self.where .. ": AUTH: " .. tostring(err)
            end
        end
        if opts.db ~= 0 then
            ok, err = red:select(opts.db)
            if not ok then
                red:close()
                return nil, "redis " .. self.where .. ": SELECT: " .. tostring(err)
            end
        end
    end
    return red
end

--- Returns a connection to the pool. Call only when every command on it succeeded.
function _M.keepalive(self, red)
    local ok, err = red:set_keepalive(self.opts.keepalive_ms, self.opts.pool_size)
    if not ok then
        ngx.log(ngx.WARN, "redis ", self.where, ": set_keepalive: ", err)
        red:close()
    end
end

--- Closes a connection that saw an error, so it never goes back to the pool.
function _M.close(_, red)
    red:close()
end

return _M
