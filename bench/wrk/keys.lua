-- wrk script: GET /keys with an x-api-key drawn from BENCH_KEYS keys, uniformly, or Zipf
-- distributed with exponent BENCH_ZIPF_S when it is set (key 1 the most frequent). Each wrk
-- thread has its own Lua state and random sequence. Used by bench/run.py (setups EU and EZ).

local n = tonumber(os.getenv("BENCH_KEYS") or "10000")
local s = tonumber(os.getenv("BENCH_ZIPF_S") or "0")

local cdf
if s > 0 then
    -- The cumulative distribution P(rank <= k), searched by bisection per request.
    cdf = {}
    local total = 0
    for k = 1, n do
        total = total + 1 / k ^ s
        cdf[k] = total
    end
    for k = 1, n do
        cdf[k] = cdf[k] / total
    end
end

local function key()
    if not cdf then
        return math.random(n)
    end
    local u, lo, hi = math.random(), 1, n
    while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if cdf[mid] < u then
            lo = mid + 1
        else
            hi = mid
        end
    end
    return lo
end

function setup(thread)
    thread:set("seed", math.random(1, 2 ^ 30))
end

function init()
    math.randomseed(seed or os.time())
end

function request()
    return wrk.format("GET", "/keys", { ["x-api-key"] = "k" .. key() })
end
