-- tollgate.redis_pool: Redis connections from the per-worker cosocket keepalive pool, and the
-- one place that runs a script against Redis: a single server, a master found through Redis
-- Sentinel, or Redis Cluster (tollgate.cluster), each optionally over TLS.
--
-- The pool: each nginx worker keeps up to `pool_size` idle connections per Redis server (one
-- pool per server, named after the address, user, db and TLS). `connect()` takes an idle one
-- when there is one, else opens a new one; `keepalive()` gives it back after a request that
-- fully succeeded, and closes it when the pool is already full. Any error closes the
-- connection instead: after a timeout a late reply may still be on its way and would be read by
-- the next borrower as its own. So each Redis sees at most SHIM_WORKERS x pool_size idle
-- connections, plus short-lived ones during bursts of more than pool_size concurrent requests
-- per worker. The TLS handshake, AUTH and SELECT stick to a connection, so they run only on a
-- fresh one (get_reused_times() == 0).
--
-- Sentinel (REDIS_SENTINELS, REDIS_SENTINEL_MASTER): the master's address is asked from the
-- sentinels (SENTINEL get-master-addr-by-name, each sentinel in turn until one answers) and
-- cached per worker for REDIS_SENTINEL_REFRESH_MS; a fresh connection checks with ROLE that it
-- reached a master. A connection error, a READONLY reply or a ROLE other than master drops the
-- cached address, and the call is retried once when the sentinels then name another address.
-- (Debian's lua-resty-redis-connector 0.06 resolves through Sentinel too, but sends AUTH
-- without a user, on every connection, without TLS, and asks the sentinels on every connect.)

-- luacheck: read globals ngx
local ngx = ngx
local ngx_log = ngx.log
local ngx_now = ngx.now
local ngx_WARN = ngx.WARN
local ngx_NOTICE = ngx.NOTICE
local ngx_null = ngx.null
local type = type
local error = error
local pcall = pcall
local rawget = rawget
local tostring = tostring
local tonumber = tonumber
local require = require
local unpack = unpack
local setmetatable = setmetatable
local find = string.find
local concat = table.concat

local _M = { _VERSION = "0.2.0" }
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
-- so probe the module table itself. nginx.redis 0.27 (Debian 12) predates set_timeouts and the
-- `ssl` connect option; the cosocket underneath has had settimeouts since lua-nginx-module
-- 0.10.7 and sslhandshake since 0.9.11, so both are called on it directly.
local has_set_timeouts = rawget(redis, "set_timeouts") ~= nil

local function set_timeouts(red, connect_ms, send_ms, read_ms)
    if has_set_timeouts then
        return red:set_timeouts(connect_ms, send_ms, read_ms)
    end
    return rawget(red, "_sock"):settimeouts(connect_ms, send_ms, read_ms)
end

--------------------------------------------------------------------------------------------
-- Connections to one server

-- The cosocket connect options (pool name and size) of a server, made once per address.
local function pool_opts(self, host, port, kind)
    local name = kind .. host .. ":" .. port
    local o = self.pools[name]
    if not o then
        local opts = self.opts
        o = {
            pool = "tollgate:" .. name .. ":" .. (opts.user or "") .. ":" .. opts.db
                   .. (opts.tls and ":tls" or ""),
            pool_size = opts.pool_size,
        }
        self.pools[name] = o
    end
    return o
end

-- Sets the client certificate on a new connection; parsed once per worker (cdata made in the
-- master would not survive the fork reliably).
local function set_client_cert(self, red)
    if not self.client_cert then
        local ssl = require "ngx.ssl"
        local cert, err = ssl.parse_pem_cert(self.opts.tls_client_cert_pem)
        if not cert then
            return nil, err
        end
        local key
        key, err = ssl.parse_pem_priv_key(self.opts.tls_client_key_pem)
        if not key then
            return nil, err
        end
        self.client_cert, self.client_key = cert, key
    end
    return rawget(red, "_sock"):setclientcert(self.client_cert, self.client_key)
end

-- A connected client to host:port, TLS done on a fresh connection; also returns whether the
-- connection is fresh. `kind` separates the pools of sentinels ("s:") from Redis servers ("").
local function open(self, host, port, kind)
    local opts = self.opts
    local where = host .. ":" .. port
    local red, err = redis:new()
    if not red then
        return nil, "redis " .. where .. ": " .. tostring(err)
    end
    set_timeouts(red, opts.connect_timeout_ms, opts.send_timeout_ms, opts.read_timeout_ms)
    local ok
    ok, err = red:connect(host, port, pool_opts(self, host, port, kind))
    if not ok then
        return nil, "redis " .. where .. ": connect: " .. tostring(err)
    end
    local fresh = red:get_reused_times() == 0
    if fresh and opts.tls then
        if opts.tls_client_cert_pem then
            ok, err = set_client_cert(self, red)
            if not ok then
                red:close()
                return nil, "redis " .. where .. ": TLS client certificate: " .. tostring(err)
            end
        end
        -- false: no session to reuse; the server name is sent as SNI and, when verifying,
        -- checked against the certificate (with the chain, against lua_ssl_trusted_certificate).
        ok, err = rawget(red, "_sock"):sslhandshake(false, opts.tls_server_name, opts.tls_verify)
        if not ok then
            red:close()
            return nil, "redis " .. where .. ": TLS handshake: " .. tostring(err)
        end
    end
    return red, nil, fresh
end

-- AUTH (with the ACL user when there is one), then SELECT, on a fresh connection.
local function login(red, where, user, password, db)
    local ok, err
    if password then
        if user then
            ok, err = red:auth(user, password)
        else
            ok, err = red:auth(password)
        end
        if not ok then
            return nil, "redis " .. where .. ": AUTH: " .. tostring(err)
        end
    end
    if db and db ~= 0 then
        ok, err = red:select(db)
        if not ok then
            return nil, "redis " .. where .. ": SELECT: " .. tostring(err)
        end
    end
    return true
end

--- Borrows a ready connection to host:port (TLS, AUTH and SELECT done), or returns nil, err.
-- `check_role`: on a fresh connection, fail unless ROLE says master (Sentinel mode).
function _M.connect_to(self, host, port, check_role)
    local opts = self.opts
    local red, err, fresh = open(self, host, port, "")
    if not red then
        return nil, err
    end
    if fresh then
        self.on_new_connection()
        local where = host .. ":" .. port
        local ok
        ok, err = login(red, where, opts.user, opts.password, opts.db)
        if ok and check_role then
            local role
            role, err = red:role()
            if type(role) == "table" and role[1] == "master" then
                ok = true
            else
                ok, err = nil, "redis " .. where .. ": ROLE: "
                               .. (role and tostring(role[1]) or tostring(err))
                               .. ", not master"
            end
        end
        if not ok then
            red:close()
            return nil, err
        end
    end
    return red
end

--------------------------------------------------------------------------------------------
-- Sentinel

-- Asks the sentinels, in order, for the master's address.
local function ask_sentinels(self)
    local opts = self.opts
    local errs = {}
    for i = 1, #opts.sentinels do
        local s = opts.sentinels[i]
        local where = "sentinel " .. s.host .. ":" .. s.port
        local red, err, fresh = open(self, s.host, s.port, "s:")
        local ok = red
        if red and fresh then
            ok, err = login(red, where, opts.sentinel_user, opts.sentinel_password)
        end
        local addr
        if ok then
            addr, err = red:sentinel("get-master-addr-by-name", opts.sentinel_master)
            if type(addr) == "table" and type(addr[1]) == "string" then
                self:keepalive(red)
                return addr[1], tonumber(addr[2])
            end
            err = (addr == ngx_null) and "unknown master " .. opts.sentinel_master
                  or tostring(err)
        end
        if red then
            red:close()
        end
        errs[#errs + 1] = where .. ": " .. tostring(err)
    end
    return nil, "no sentinel answered: " .. concat(errs, "; ")
end

-- The master's address: the cached one while fresh, else the sentinels' answer. While one
-- request of the worker asks, the others go on with the cached address; and it is kept (and
-- asked again after a second) while no sentinel answers.
local function master(self)
    local now = ngx_now()
    local m = self.master
    if m and now < m.expires then
        return m.host, m.port
    end
    if m then
        m.expires = now + 1
    end
    local host, port = ask_sentinels(self)
    if not host then
        if m then
            ngx_log(ngx_WARN, "redis: ", port, "; still using ", m.host, ":", m.port)
            return m.host, m.port
        end
        return nil, port
    end
    if m and (m.host ~= host or m.port ~= port) then
        ngx_log(ngx_WARN, "redis: Sentinel master ", self.opts.sentinel_master, " is now ",
                host, ":", port, " (was ", m.host, ":", m.port, ")")
    end
    self.master = { host = host, port = port, expires = now + self.opts.sentinel_refresh_ms / 1000 }
    self.where = host .. ":" .. port
    return host, port
end

-- Forgets the cached master, so that the next call asks the sentinels.
local function forget_master(self)
    if self.master then
        self.master.expires = 0
    end
end

--------------------------------------------------------------------------------------------
-- The pool

--- A pool for one Redis server, a Sentinel-monitored master or a Redis Cluster.
-- opts (tollgate.settings reads them from the environment): host, port, user (optional),
-- password (optional), db, connect_timeout_ms, send_timeout_ms, read_timeout_ms, pool_size,
-- keepalive_ms; and optionally tls, tls_verify, tls_server_name, tls_client_cert_pem,
-- tls_client_key_pem, sentinels ({ {host=, port=}, ... }), sentinel_master, sentinel_user,
-- sentinel_password, sentinel_refresh_ms, cluster_nodes (like sentinels).
-- functions (false: always EVALSHA, never FCALL).
-- hooks (optional): on_new_connection() for each fresh Redis connection, on_script_load() for
-- each SCRIPT LOAD or FUNCTION LOAD sent (the shim counts them in its metrics).
function _M.new(opts, hooks)
    if type(opts) ~= "table" or type(opts.host) ~= "string" or type(opts.port) ~= "number" then
        error("redis_pool.new: opts.host (string) and opts.port (number) are required", 2)
    end
    if opts.sentinels and not opts.sentinel_master then
        error("redis_pool.new: opts.sentinels needs opts.sentinel_master", 2)
    end
    if opts.sentinels and opts.cluster_nodes then
        error("redis_pool.new: opts.sentinels and opts.cluster_nodes exclude each other", 2)
    end
    hooks = hooks or {}
    local nothing = function() end
    local self = setmetatable({
        opts = opts,
        pools = {},
        where = opts.host .. ":" .. opts.port,
        on_new_connection = hooks.on_new_connection or nothing,
        on_script_load = hooks.on_script_load or nothing,
        -- FCALL until this Redis shows it cannot (opts.functions false: never).
        functions = opts.functions ~= false,
    }, mt)
    if opts.sentinels then
        self.mode = "sentinel"
        self.where = "Sentinel master " .. opts.sentinel_master
    elseif opts.cluster_nodes then
        self.mode = "cluster"
        self.where = "cluster"
        self.cluster = require("tollgate.cluster").new(self, opts.cluster_nodes)
    else
        self.mode = "single"
    end
    return self
end

--- Borrows a ready connection (to the server, the current master, or in cluster mode to
-- some node), or returns nil, err. Sets self.where to the address.
function _M.connect(self)
    if self.mode == "single" then
        return self:connect_to(self.opts.host, self.opts.port)
    elseif self.mode == "cluster" then
        return self.cluster:connect_any()
    end
    local host, port = master(self)
    if not host then
        return nil, "redis " .. self.where .. ": " .. port
    end
    local red, err = self:connect_to(host, port, true)
    if not red then
        forget_master(self)
    end
    return red, err
end

--- Returns a connection to the pool. Call only when every command on it succeeded.
function _M.keepalive(self, red)
    local ok, err = red:set_keepalive(self.opts.keepalive_ms, self.opts.pool_size)
    if not ok then
        ngx_log(ngx_WARN, "redis ", self.where, ": set_keepalive: ", err)
        red:close()
    end
end

--- Closes a connection that saw an error, so it never goes back to the pool.
function _M.close(_, red)
    red:close()
end

--------------------------------------------------------------------------------------------
-- Running a script

-- Whether an error says this Redis cannot run our functions: too old (no FCALL), or an ACL
-- user without FCALL or FUNCTION LOAD. The pool then uses EVALSHA for good.
local function no_functions(err)
    return find(err, "^ERR unknown command") or find(err, "^NOPERM")
        or find(err, "^FUNCTION LOAD [^:]*: NOPERM")
end

-- Sends ASKING (a Redis Cluster ASK redirection) when asked to.
local function ask(red, asking)
    if not asking then
        return true
    end
    local ok, err = red:asking()
    if not ok then
        return nil, "ASKING: " .. tostring(err)
    end
    return true
end

-- The two ways to run a script Redis keeps by name: how to call it, the error that says Redis
-- does not have it (first use, a flushed or restarted Redis, a failover, a cluster node that
-- never saw it), and how to load it.
local VIA_FUNCTION = {
    command = "fcall", id = "fname", missing = "^ERR Function not found", what = "FUNCTION LOAD",
    load = function(red, s) return red["function"](red, "load", "replace", s.library) end,
}
local VIA_SCRIPT = {
    command = "evalsha", id = "sha", missing = "^NOSCRIPT", what = "SCRIPT LOAD",
    load = function(red, s) return red:script("load", s.source) end,
}

-- One call of `s` `via` a function or a script; when Redis does not have it, load it and call
-- once more. Two tries at most: a server that still lacks it right after loading (a proxy in
-- front of replicas that do not share their script cache) gets an error, not a loop.
local function call_loading(self, red, s, nkeys, args, asking, via)
    local res, err
    for try = 1, 2 do
        local ok
        ok, err = ask(red, asking)
        if not ok then
            return nil, err
        end
        res, err = red[via.command](red, s[via.id], nkeys, unpack(args))
        if res ~= false or not find(tostring(err), via.missing) or try == 2 then
            break
        end
        self.on_script_load()
        ok, err = via.load(red, s)
        if not ok then
            return nil, via.what .. " " .. s.name .. ": " .. tostring(err)
        end
    end
    if not res then
        return nil, tostring(err)
    end
    return res
end

--- Runs script `s` ({ name, source, sha, and for the check script fname and library }) on
-- `red`, a connection of this pool: one FCALL where Redis runs our function library (loaded
-- once, so the script's setup is not paid per call), else one EVALSHA; each loads what Redis
-- lacks and retries once. `asking`: send ASKING before each call (a Redis Cluster ASK
-- redirection). Returns the reply, or nil, err (err starts with Redis's error code, e.g.
-- "MOVED ...").
function _M.eval(self, red, s, nkeys, args, asking)
    if s.library and self.functions then
        local res, err = call_loading(self, red, s, nkeys, args, asking, VIA_FUNCTION)
        if res or not no_functions(err) then
            return res, err
        end
        self.functions = false
        ngx_log(ngx_NOTICE, "redis ", self.where, ": no Redis functions (Redis < 7, or an ACL",
                " without FCALL and FUNCTION LOAD): using EVALSHA")
    end
    return call_loading(self, red, s, nkeys, args, asking, VIA_SCRIPT)
end

function _M.run(self, s, nkeys, args, shape)
    if self.mode == "cluster" then
        return self.cluster:run(s, nkeys, args, shape)
    end
    local err
    for attempt = 1, 2 do
        local before = self.master and self.master.host .. ":" .. self.master.port
        local red
        red, err = self:connect()
        if red then
            local reply
            reply, err = self:eval(red, s, nkeys, args)
            if reply then
                self:keepalive(red)
                return reply
            end
            red:close()
            err = "redis " .. self.where .. ": " .. s.name .. ": " .. err
            if self.mode ~= "sentinel" or not find(err, ": READONLY") then
                return nil, err
            end
            -- A demoted master (a failover happened): ask the sentinels again.
            forget_master(self)
        end
        if self.mode ~= "sentinel" or attempt == 2 then
            break
        end
        -- Retry once, only if the sentinels now name another master.
        local host, port = master(self)
        if not host or host .. ":" .. port == before then
            break
        end
    end
    return nil, err
end

return _M
