-- tollgate.bounds: the wire bounds of docs/wire-format.md, said once for the shim.
--
-- The filter's src/bounds.rs is the same list; a Rust unit test reads this file and holds every
-- value equal and every name present on both sides. Keep one `_M.NAME = value` per line, the
-- value an integer, `AeB` or `a * b`, so that test's parser stays trivial.

local _M = { _VERSION = "0.1.0" }

-- Per body.
_M.MAX_BODY_BYTES = 64 * 1024 -- also client_max_body_size in nginx.conf.in
_M.MAX_REQUESTS = 256
_M.MAX_TOTAL_CHECKS = 1024
_M.MAX_RELEASES = 256
-- A valid body nests 5 deep; the cap turns a deeply nested body into a 400, not a C stack
-- overflow.
_M.MAX_DEPTH = 16

-- Per request.
_M.MAX_CHECKS = 32

-- Per check.
_M.MAX_KEY_BYTES = 512
_M.MAX_ID_BYTES = 128
_M.MAX_LIMIT = 1e12
_M.MAX_LOG_LIMIT = 10000
_M.MAX_RATE = 1e9
-- GCRA's emission interval is floor(period_ms × 1000 / rate) µs: at most this many per ms of
-- period, or the interval is 0 µs and every request is admitted.
_M.MAX_RATE_PER_PERIOD_MS = 1000
_M.MAX_MS = 86400000
_M.MIN_WINDOW_MS = 1000
_M.MIN_SLOT_TTL_MS = 1000
_M.MAX_COST = 1e9
-- Sub-windows of a sliding_window_bounded: each check reads up to this many + 2 hash fields.
_M.MAX_SUBWINDOWS = 100
-- A lease: units a check may reserve beyond its cost for the gateway to spend locally
-- (docs/wire-format.md, "Leases").
_M.MAX_LEASE = 1e6
-- A grant takes at most 1/LEASE_SHARE of what the key has left after the call, so leases
-- shrink near the limit (to none when less than LEASE_SHARE is left) and a burst at the limit
-- is decided request by request.
_M.LEASE_SHARE = 4
-- A fixed window's counter lives this long past its window's end, so that a check built in the
-- window and reaching Redis late still counts in it instead of creating the counter afresh.
-- Reported times (reset, retry-after, a lease's end) leave it out.
_M.COUNTER_GRACE_MS = 1000

-- Settings both sides share: the key prefix (TOLLGATE_KEY_PREFIX, the filter's key_prefix) and
-- the shared secret (TOLLGATE_SHIM_SECRET, the filter's shim.secret).
_M.MAX_PREFIX_BYTES = 64
_M.MAX_SECRET_BYTES = 256

return _M
