-- tollgate.metrics: the shim's Prometheus metrics (text format 0.0.4), served by GET /metrics.
--
-- Counters live in `lua_shared_dict tollgate_metrics` (nginx.conf.in), so every worker adds to
-- the same numbers and a scrape sees them all; they survive a reload (HUP) and start at 0 on a
-- restart. A request costs a few `incr`s: one in the log phase (HTTP requests by endpoint and
-- status), and for a check call two for the latency histogram and up to four for checks and
-- decisions (allowed, denied, refused). The histogram keeps one cell per bucket (not
-- cumulative), so an observation is one `incr` plus one for the sum; the cumulative `_bucket`
-- series and `_count` are summed when rendered, so `_count` always equals the `+Inf` bucket.
--
-- init(pool_size) runs in init_by_lua; log() in log_by_lua; render() builds the /metrics body.

-- luacheck: globals ngx
local ngx = ngx
local ffi = require "ffi"
local pcall = pcall
local error = error
local tonumber = tonumber
local format = string.format
local find = string.find
local sub = string.sub
local sort = table.sort
local concat = table.concat

local _M = { _VERSION = "0.1.0" }

local DICT_NAME = "tollgate_metrics"
local dict -- ngx.shared.tollgate_metrics (init)
local pool_size = 0

-- Upper bounds of the latency buckets, in seconds; a last cell counts the slower ones (+Inf).
local BOUNDS = { 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1 }
local NBOUNDS = #BOUNDS
local BUCKET_KEYS = {}
for i = 1, NBOUNDS + 1 do
    BUCKET_KEYS[i] = "dur_b" .. i
end

-- Shared dict keys.
local CHECKS, ALLOWED, DENIED, REFUSED = "checks", "allowed", "denied", "refused"
local REDIS_ERRORS, RECONNECTS, SCRIPT_LOADS = "redis_errors", "reconnects", "script_loads"
local DUR_SUM = "dur_sum"
local HTTP = "http|" -- then "<endpoint>|<status>"

-- The `endpoint` label of each path; any other is "other".
local ENDPOINTS = {
    ["/v1/check"] = "http|check|",
    ["/v1/release"] = "http|release|",
    ["/v1/charge"] = "http|charge|",
    ["/healthz"] = "http|healthz|",
    ["/metrics"] = "http|metrics|",
}
local OTHER = "http|other|"

--------------------------------------------------------------------------------------------
-- A monotonic clock with sub-millisecond resolution: ngx.now() only has milliseconds, coarser
-- than the first buckets. clock_gettime(CLOCK_MONOTONIC) through the FFI (LuaJIT), else
-- ngx.now() after ngx.update_time().

local now
do
    local ok = ffi.os == "Linux" and pcall(ffi.cdef, [[
        typedef struct { long tv_sec; long tv_nsec; } tollgate_timespec_t;
        int clock_gettime(int clk_id, tollgate_timespec_t *tp);
    ]])
    local ts = ok and ffi.new("tollgate_timespec_t")
    if ts and pcall(ffi.C.clock_gettime, 1, ts) then
        local C = ffi.C
        local CLOCK_MONOTONIC = 1
        now = function()
            C.clock_gettime(CLOCK_MONOTONIC, ts)
            return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
        end
    else
        local update_time, ngx_now = ngx.update_time, ngx.now
        now = function()
            update_time()
            return ngx_now()
        end
    end
end

--- Seconds on a monotonic clock: the difference of two readings is an elapsed time.
_M.now = now

local function incr(key, n)
    -- Errors (a full dict: cannot happen with the few keys kept here) are not worth a request.
    dict:incr(key, n, 0)
end

--------------------------------------------------------------------------------------------
-- Counting

--- init_by_lua: `size` is REDIS_POOL_SIZE, reported as tollgate_shim_pool_size.
function _M.init(size)
    dict = ngx.shared[DICT_NAME]
    if not dict then
        error("lua_shared_dict " .. DICT_NAME .. " is missing from the nginx configuration", 0)
    end
    pool_size = size
end

--- One check call answered: `checks` checks over `allowed` + `denied` requests decided by
-- Redis, and `refused` requests refused without reaching it (a field out of its bounds).
function _M.checked(checks, allowed, denied, refused)
    if checks > 0 then
        incr(CHECKS, checks)
    end
    if allowed > 0 then
        incr(ALLOWED, allowed)
    end
    if denied > 0 then
        incr(DENIED, denied)
    end
    if refused and refused > 0 then
        incr(REFUSED, refused)
    end
end

--- A Redis failure: refused, timed out, an error reply or a reply of the wrong shape.
function _M.redis_error()
    incr(REDIS_ERRORS, 1)
end

--- The round trip of one script call, in seconds.
function _M.observe_redis(seconds)
    local i = 1
    while i <= NBOUNDS and seconds > BOUNDS[i] do
        i = i + 1
    end
    incr(BUCKET_KEYS[i], 1)
    incr(DUR_SUM, seconds)
end

--- log_by_lua: one HTTP request answered, by endpoint and status.
function _M.log()
    incr((ENDPOINTS[ngx.var.uri] or OTHER) .. ngx.status, 1)
end

--- A new Redis connection was opened (tollgate_shim_redis_reconnects_total): every Redis
-- connection counts — single, Sentinel's master, each Redis Cluster node.
function _M.reconnected()
    incr(RECONNECTS, 1)
end

--- A SCRIPT LOAD was sent (tollgate_shim_script_loads_total): first use, or after a NOSCRIPT.
function _M.script_loaded()
    incr(SCRIPT_LOADS, 1)
end

--------------------------------------------------------------------------------------------
-- Rendering

local function get(key)
    return dict:get(key) or 0
end

-- Integers without an exponent (counters pass 10^14 after a long time, where %.14g would not
-- be exact).
local function int(n)
    return format("%d", n)
end

local HELP = {
    "# HELP tollgate_shim_checks_total Checks (entries of requests[].checks[]) decided by Redis.",
    "# TYPE tollgate_shim_checks_total counter",
    "tollgate_shim_checks_total %s",
    "# HELP tollgate_shim_requests_total Gateway requests answered, by decision: allowed or"
        .. " denied by Redis, or refused (a field out of bounds; never sent to Redis).",
    "# TYPE tollgate_shim_requests_total counter",
    'tollgate_shim_requests_total{decision="allowed"} %s',
    'tollgate_shim_requests_total{decision="denied"} %s',
    'tollgate_shim_requests_total{decision="refused"} %s',
    "# HELP tollgate_shim_redis_errors_total Redis failures: refused, timed out, error reply"
        .. " or unexpected reply (each answered 503).",
    "# TYPE tollgate_shim_redis_errors_total counter",
    "tollgate_shim_redis_errors_total %s",
    "# HELP tollgate_shim_redis_reconnects_total New Redis connections (not taken from the"
        .. " keepalive pool).",
    "# TYPE tollgate_shim_redis_reconnects_total counter",
    "tollgate_shim_redis_reconnects_total %s",
    "# HELP tollgate_shim_script_loads_total SCRIPT LOADs sent (after NOSCRIPT: first use,"
        .. " SCRIPT FLUSH, Redis restart or failover).",
    "# TYPE tollgate_shim_script_loads_total counter",
    "tollgate_shim_script_loads_total %s",
    "# HELP tollgate_shim_pool_size Idle Redis connections kept per worker (REDIS_POOL_SIZE).",
    "# TYPE tollgate_shim_pool_size gauge",
    "tollgate_shim_pool_size %s",
    "",
}
local HEAD_FORMAT = concat(HELP, "\n")

--- The /metrics body (Prometheus text format 0.0.4).
function _M.render()
    local out = {
        format(HEAD_FORMAT, int(get(CHECKS)), int(get(ALLOWED)), int(get(DENIED)),
               int(get(REFUSED)), int(get(REDIS_ERRORS)), int(get(RECONNECTS)),
               int(get(SCRIPT_LOADS)),
               int(pool_size)),
    }

    -- HTTP requests: the label pairs seen so far, in a stable order.
    local series = {}
    local keys = dict:get_keys(0)
    for i = 1, #keys do
        local k = keys[i]
        if sub(k, 1, #HTTP) == HTTP then
            local bar = find(k, "|", #HTTP + 1, true)
            series[#series + 1] = { k, sub(k, #HTTP + 1, bar - 1), sub(k, bar + 1) }
        end
    end
    sort(series, function(a, b) return a[1] < b[1] end)
    out[#out + 1] = "# HELP tollgate_shim_http_requests_total HTTP requests answered, by"
                    .. " endpoint and status.\n# TYPE tollgate_shim_http_requests_total counter\n"
    for i = 1, #series do
        local s = series[i]
        out[#out + 1] = format('tollgate_shim_http_requests_total{endpoint="%s",status="%s"} %s\n',
                               s[2], s[3], int(get(s[1])))
    end

    out[#out + 1] = "# HELP tollgate_shim_redis_duration_seconds Round trip of each script call"
                    .. " to Redis (check and release), errors included.\n"
                    .. "# TYPE tollgate_shim_redis_duration_seconds histogram\n"
    local cumulative = 0
    for i = 1, NBOUNDS + 1 do
        cumulative = cumulative + get(BUCKET_KEYS[i])
        out[#out + 1] = format('tollgate_shim_redis_duration_seconds_bucket{le="%s"} %s\n',
                               i <= NBOUNDS and format("%g", BOUNDS[i]) or "+Inf",
                               int(cumulative))
    end
    out[#out + 1] = format("tollgate_shim_redis_duration_seconds_sum %.9f\n"
                           .. "tollgate_shim_redis_duration_seconds_count %s\n",
                           get(DUR_SUM), int(cumulative))
    return concat(out)
end

return _M
