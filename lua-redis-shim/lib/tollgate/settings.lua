-- tollgate.settings: the shim's whole configuration, read from the environment in one place
-- (README.md, "Configuration"). The other modules take option tables and never read the
-- environment.
--
-- read() runs in init_by_lua and raises on a bad value, naming the variable, so nginx refuses
-- to start. No error message quotes the shared secret or a password.

local bounds = require "tollgate.bounds"

local error = error
local tostring = tostring
local tonumber = tonumber
local os_getenv = os.getenv
local io_open = io.open
local find = string.find
local format = string.format
local gmatch = string.gmatch
local gsub = string.gsub
local lower = string.lower
local match = string.match

local _M = { _VERSION = "0.1.0" }

-- A set variable, or `default` when unset or empty.
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

local function env_bool(name, default)
    local v = env(name)
    if v == nil then
        return default
    end
    if v == "1" or v == "true" or v == "yes" or v == "on" then
        return true
    elseif v == "0" or v == "false" or v == "no" or v == "off" then
        return false
    end
    error(name .. "=" .. v .. ": must be 1 or 0", 0)
end

-- "host:port,host:port" (IPv6 as [addr]:port) to { { host =, port = }, ... }.
local function env_addresses(name)
    local v = env(name)
    if v == nil then
        return nil
    end
    local list = {}
    for item in gmatch(v, "[^,%s]+") do
        local host, port = match(item, "^%[([^%]]+)%]:(%d+)$")
        if not host then
            host, port = match(item, "^([^:]+):(%d+)$")
        end
        port = tonumber(port)
        if not host or port < 1 or port > 65535 then
            error(name .. "=" .. v .. ": " .. item .. " is not host:port", 0)
        end
        list[#list + 1] = { host = host, port = port }
    end
    if #list == 0 then
        error(name .. "=" .. v .. ": no host:port in it", 0)
    end
    return list
end

local function read_pem(path, name)
    local f, err = io_open(path, "rb")
    if not f then
        error(name .. "=" .. path .. ": " .. tostring(err), 0)
    end
    local pem = f:read("*a")
    f:close()
    if not pem or not find(pem, "-----BEGIN", 1, true) then
        error(name .. "=" .. path .. ": not a PEM file", 0)
    end
    return pem
end

-- The options of tollgate.redis_pool.new: the server, timeouts and pool, then high
-- availability and TLS (README.md, "High availability, clustering and security").
local function redis_options()
    local o = {
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
        -- Load the check script as a function library and FCALL it (falls back to EVALSHA
        -- where Redis cannot); 0: always EVALSHA.
        functions = env_bool("REDIS_FUNCTIONS", true),
    }
    o.tls = env_bool("REDIS_TLS", false)
    o.tls_ca_file = env("REDIS_TLS_CA_FILE")
    -- lua_ssl_trusted_certificate (rendered by the launcher) is the only CA store.
    o.tls_verify = env_bool("REDIS_TLS_VERIFY", o.tls_ca_file ~= nil)
    if o.tls and o.tls_verify and not o.tls_ca_file then
        error("REDIS_TLS_VERIFY=1 needs REDIS_TLS_CA_FILE (the CA bundle nginx verifies with)", 0)
    end
    o.tls_server_name = env("REDIS_TLS_SERVER_NAME")
    -- A client certificate (Redis tls-auth-clients yes): the PEM files are read here, by the
    -- master process, so the key file may stay readable by root only.
    local cert_file, key_file = env("REDIS_TLS_CLIENT_CERT"), env("REDIS_TLS_CLIENT_KEY")
    if (cert_file == nil) ~= (key_file == nil) then
        error("REDIS_TLS_CLIENT_CERT and REDIS_TLS_CLIENT_KEY go together", 0)
    end
    if cert_file then
        o.tls_client_cert_pem = read_pem(cert_file, "REDIS_TLS_CLIENT_CERT")
        o.tls_client_key_pem = read_pem(key_file, "REDIS_TLS_CLIENT_KEY")
    end
    o.sentinels = env_addresses("REDIS_SENTINELS")
    o.sentinel_master = env("REDIS_SENTINEL_MASTER")
    o.sentinel_user = env("REDIS_SENTINEL_USER")
    o.sentinel_password = env("REDIS_SENTINEL_PASSWORD")
    o.sentinel_refresh_ms = env_integer("REDIS_SENTINEL_REFRESH_MS", 5000, 0, 86400000)
    o.cluster_nodes = env_addresses("REDIS_CLUSTER_NODES")
    if o.sentinels and not o.sentinel_master then
        error("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the monitored master's name)", 0)
    end
    if o.sentinels and o.cluster_nodes then
        error("REDIS_SENTINELS and REDIS_CLUSTER_NODES exclude each other", 0)
    end
    if o.cluster_nodes and o.db ~= 0 then
        error("REDIS_DB must be 0 with REDIS_CLUSTER_NODES (Redis Cluster has one database)", 0)
    end
    return o
end

-- The shared secret, from TOLLGATE_SHIM_SECRET or the file TOLLGATE_SHIM_SECRET_FILE names (one
-- trailing newline dropped), or nil when neither is set. No error message quotes it.
local function read_secret()
    local value, file = env("TOLLGATE_SHIM_SECRET"), env("TOLLGATE_SHIM_SECRET_FILE")
    if value and file then
        error("TOLLGATE_SHIM_SECRET and TOLLGATE_SHIM_SECRET_FILE are both set: set one", 0)
    end
    local name = "TOLLGATE_SHIM_SECRET"
    if file then
        name = "TOLLGATE_SHIM_SECRET_FILE=" .. file
        local f, err = io_open(file, "rb")
        if not f then
            error(name .. ": " .. tostring(err), 0)
        end
        value = f:read("*a")
        f:close()
        value = value and (gsub(value, "\r?\n$", ""))
    end
    if value == nil then
        return nil
    end
    if #value == 0 or #value > bounds.MAX_SECRET_BYTES or match(value, "[^\33-\126]") then
        error(name .. ": the secret must be 1.." .. bounds.MAX_SECRET_BYTES
              .. " printable ASCII characters, no spaces", 0)
    end
    -- nginx's debug log prints every request header, so it would hold the secret.
    if lower(env("SHIM_LOG_LEVEL", "")) == "debug" then
        error(name .. " with SHIM_LOG_LEVEL=debug: the debug log would hold the secret (nginx"
              .. " logs every request header); use info or above", 0)
    end
    return value
end

--- Reads every setting: { key_prefix, secret (or nil), redis = <redis_pool options>, test_clock }.
function _M.read()
    local prefix = env("TOLLGATE_KEY_PREFIX", "tollgate")
    if #prefix > bounds.MAX_PREFIX_BYTES or not match(prefix, "^[%w_.-]+$") then
        error("TOLLGATE_KEY_PREFIX=" .. prefix .. ": must match [A-Za-z0-9_.-]{1,"
              .. bounds.MAX_PREFIX_BYTES .. "}", 0)
    end
    local redis = redis_options()
    -- Tests only (tests/shim/test_vectors.py): lets a check call name Redis's instant in
    -- x-tollgate-test-now-ms, so time-reading algorithms answer exactly. Off unless set; the
    -- shim warns at start-up when it is on. Never in production: any client could set the time.
    local test_clock = env_bool("TOLLGATE_TEST_CLOCK", false)
    if test_clock and redis.cluster_nodes then
        error("TOLLGATE_TEST_CLOCK is not supported with REDIS_CLUSTER_NODES", 0)
    end
    return {
        key_prefix = prefix,
        secret = read_secret(),
        redis = redis,
        test_clock = test_clock,
    }
end

return _M
