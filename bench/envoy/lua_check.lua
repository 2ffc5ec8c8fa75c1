-- Setup C of the benchmark: Envoy's built-in Lua filter making the same check Tollgate makes,
-- one httpCall per request to the lua-redis-shim, with the same JSON body. bench/run.py puts
-- this file into the filter's inline_code.
--
-- Like Tollgate's rule {"name": "bench", "descriptors": ["client_ip"], "window": "1m"}: the key
-- is per client IP and minute (window index = unix time / 60). Fails open like
-- failure_mode allow: only a 200 whose body says "allowed":false denies.

local WINDOW_S = 60
local BODY = '{"requests":[{"checks":[{"alg":"fixed_window",'
    .. '"key":"tollgate:{bench|=%s}:60000:%d","limit":1000000000,"ttl_ms":60000,"cost":1}]}]}'
local HEADERS = {
  [":method"] = "POST",
  [":path"] = "/v1/check",
  [":authority"] = "tollgate-shim",
  ["content-type"] = "application/json",
}
local TIMEOUT_MS = 200

function envoy_on_request(handle)
  local peer = handle:streamInfo():downstreamRemoteAddress()
  local ip = string.match(peer, "^(.+):%d+$") or peer
  local body = string.format(BODY, ip, math.floor(os.time() / WINDOW_S))
  local headers, reply = handle:httpCall("tollgate_shim", HEADERS, body, TIMEOUT_MS)
  if headers[":status"] == "200" and reply ~= nil
      and string.find(reply, '"allowed":false', 1, true) then
    handle:respond({[":status"] = "429"}, "rate limited\n")
  end
end
