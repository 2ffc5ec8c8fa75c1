-- luacheck configuration, used by `cd lua-redis-shim && luacheck .` (what `make lint` runs).
-- From the repository root luacheck does not find this file, so each file also declares the
-- globals it reads in a `-- luacheck: read globals` comment.
std = "ngx_lua"
max_line_length = 100

-- Redis scripts run in Redis's Lua 5.1 sandbox, not in nginx.
files["scripts/"] = {
    std = "lua51",
    read_globals = { "redis", "KEYS", "ARGV" },
}
