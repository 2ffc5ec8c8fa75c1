-- tollgate.cluster: running the shim's scripts on Redis Cluster (REDIS_CLUSTER_NODES).
--
-- A script may only touch keys of one hash slot, so a call is split by slot: every check goes
-- to the group of its key's slot (a sliding_window's prev_key shares its key's {hash tag}), each
-- request keeps, within a group, its checks in order, and the check script runs once per group
-- on the node that owns the slot. Within a group a request is still all-or-nothing; across
-- groups it is decided per group: a request denied in one slot may have been charged in another
-- (over-counting, never over-admission). The reply is merged back into the single-call layout.
-- The groups of one node run one after another on one connection; the nodes run in parallel.
--
-- The slot map (CLUSTER SLOTS) is fetched on first use and after a MOVED reply or a connection
-- error, from any known node. MOVED: the slot moved for good; the map is updated and the group
-- retried on the new owner. ASK: the slot is being migrated and this key already left; the group
-- is sent to the target, preceded by ASKING, without touching the map. TRYAGAIN (a multi-key
-- group half migrated): a short sleep and a retry. At most MAX_TRIES tries per group.

-- luacheck: read globals ngx
local ngx = ngx
local ngx_log = ngx.log
local ngx_sleep = ngx.sleep
local ngx_WARN = ngx.WARN
local ngx_INFO = ngx.INFO
local thread_spawn = ngx.thread.spawn
local thread_wait = ngx.thread.wait
local bit = require "bit"
local contract = require "tollgate.contract"
local band, bxor, lshift, rshift = bit.band, bit.bxor, bit.lshift, bit.rshift
local byte = string.byte
local find = string.find
local match = string.match
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local concat = table.concat

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local NSLOTS = 16384
local MAX_TRIES = 5

--------------------------------------------------------------------------------------------
-- Hash slots: CRC16-XMODEM (poly 0x1021, init 0) of the key's hash tag, mod 16384

local CRC16 = {}
for i = 0, 255 do
    local c = lshift(i, 8)
    for _ = 1, 8 do
        if band(c, 0x8000) ~= 0 then
            c = bxor(lshift(c, 1), 0x1021)
        else
            c = lshift(c, 1)
        end
    end
    CRC16[i] = band(c, 0xffff)
end

local function crc16(s, from, to)
    local crc = 0
    for i = from, to do
        crc = band(bxor(lshift(crc, 8), CRC16[band(bxor(rshift(crc, 8), byte(s, i)), 0xff)]),
                   0xffff)
    end
    return crc
end

--- The key's hash slot, as CLUSTER KEYSLOT: the part between the first "{" and the next "}"
-- when that is not empty, else the whole key.
function _M.keyslot(key)
    local from, to = 1, #key
    local open = find(key, "{", 1, true)
    if open then
        local close = find(key, "}", open + 1, true)
        if close and close > open + 1 then
            from, to = open + 1, close - 1
        end
    end
    return crc16(key, from, to) % NSLOTS
end
local keyslot = _M.keyslot

--------------------------------------------------------------------------------------------
-- Shapes: how a script's KEYS and ARGV split into per-slot groups, and how replies merge

-- The check script (scripts/main.lua): KEYS = every check's keys; ARGV = R, then per request
-- n, then per check "<alg> ..." . Reply: per request its `allowed` then REPLY_WIDTH numbers
-- (tollgate.contract) per check;
-- anything after that (fields about the whole call) is taken from the first group's reply.
local WIDTH = contract.REPLY_WIDTH

local function check_shape(alg_by_name)
    local shape = {}

    function shape.split(nkeys, args)
        local groups, order = {}, {}
        local kpos, apos = 1, nkeys + 2
        local nreq = tonumber(args[nkeys + 1])
        for i = 1, nreq do
            local n = tonumber(args[apos])
            apos = apos + 1
            for j = 1, n do
                local argstr = args[apos]
                apos = apos + 1
                local alg = alg_by_name[match(argstr, "^%S+")]
                local k = alg and #alg.keys or 1
                local slot = keyslot(args[kpos])
                local g = groups[slot]
                if not g then
                    g = { slot = slot, reqs = {}, last = nil }
                    groups[slot] = g
                    order[#order + 1] = g
                end
                local r = g.last
                if not r or r.i ~= i then
                    r = { i = i, checks = {} }
                    g.reqs[#g.reqs + 1] = r
                    g.last = r
                end
                r.checks[#r.checks + 1] = { j = j, kpos = kpos, k = k, arg = argstr }
                kpos = kpos + k
            end
        end
        for gi = 1, #order do
            local g = order[gi]
            local keys, argv = {}, { tostring(#g.reqs) }
            for _, r in ipairs(g.reqs) do
                argv[#argv + 1] = tostring(#r.checks)
                for _, c in ipairs(r.checks) do
                    for x = 0, c.k - 1 do
                        keys[#keys + 1] = args[c.kpos + x]
                    end
                    argv[#argv + 1] = c.arg
                end
            end
            g.nkeys = #keys
            for x = 1, #argv do
                keys[#keys + 1] = argv[x]
            end
            g.args = keys
        end
        return order, nreq
    end

    function shape.merge(order, replies, nkeys, args)
        -- A reply may end with fields about the whole call (scripts/main.lua: Redis's time);
        -- their number is the reply's length beyond its per-request part, and the merged
        -- reply takes them from the first group.
        local first, gsize = replies[1], {}
        for gi = 1, #order do
            local size = 0
            for _, r in ipairs(order[gi].reqs) do
                size = size + 1 + WIDTH * #r.checks
            end
            gsize[gi] = size
        end
        if type(first) ~= "table" or #first < gsize[1] then
            return nil, "unexpected reply from the check script"
        end
        local tail = #first - gsize[1]
        local out = {}
        -- Where each request starts in the merged reply, from the original ARGV.
        local nreq = tonumber(args[nkeys + 1])
        local start, pos, apos = {}, 1, nkeys + 2
        for i = 1, nreq do
            local n = tonumber(args[apos])
            start[i] = pos
            out[pos] = 1
            pos = pos + 1 + WIDTH * n
            apos = apos + 1 + n
        end
        for x = 1, tail do
            out[pos - 1 + x] = first[gsize[1] + x]
        end
        for gi = 1, #order do
            local reply = replies[gi]
            if type(reply) ~= "table" or #reply ~= gsize[gi] + tail then
                return nil, "unexpected reply from the check script (slot " .. order[gi].slot
                            .. ")"
            end
            local at = 1
            for _, r in ipairs(order[gi].reqs) do
                if reply[at] ~= 1 then
                    out[start[r.i]] = 0
                end
                at = at + 1
                for _, c in ipairs(r.checks) do
                    local to = start[r.i] + WIDTH * (c.j - 1) + 1
                    for x = 0, WIDTH - 1 do
                        out[to + x] = reply[at + x]
                    end
                    at = at + WIDTH
                end
            end
        end
        return out
    end

    return shape
end

-- The release script (scripts/release.lua): KEYS[i] with ARGV[i]; the reply is a count.
local RELEASE = {}

function RELEASE.split(nkeys, args)
    local groups, order = {}, {}
    for i = 1, nkeys do
        local slot = keyslot(args[i])
        local g = groups[slot]
        if not g then
            g = { slot = slot, keys = {}, ids = {} }
            groups[slot] = g
            order[#order + 1] = g
        end
        g.keys[#g.keys + 1], g.ids[#g.ids + 1] = args[i], args[nkeys + i]
    end
    for gi = 1, #order do
        local g = order[gi]
        g.nkeys = #g.keys
        local a = g.keys
        for x = 1, #g.ids do
            a[#a + 1] = g.ids[x]
        end
        g.args = a
    end
    return order
end

function RELEASE.merge(_, replies)
    local n = 0
    for i = 1, #replies do
        if type(replies[i]) ~= "number" then
            return nil, "unexpected reply from release.lua"
        end
        n = n + replies[i]
    end
    return n
end

--- The shapes of the shim's two scripts; alg_by_name[alg].keys lists a check's keys.
function _M.shapes(alg_by_name)
    return { check = check_shape(alg_by_name), release = RELEASE }
end

--------------------------------------------------------------------------------------------
-- The slot map

--- A cluster client over `pool` (tollgate.redis_pool: connections, TLS, AUTH) with the seed
-- nodes `seeds` ({ { host =, port = }, ... }).
function _M.new(pool, seeds)
    return setmetatable({ pool = pool, seeds = seeds, slots = nil, nodes = {} }, mt)
end

-- Fetches CLUSTER SLOTS from the first node that answers (known masters first, then seeds).
local function refresh(self)
    local candidates = {}
    for addr, n in pairs(self.nodes) do
        candidates[#candidates + 1] = n
        candidates[addr] = true
    end
    for _, s in ipairs(self.seeds) do
        if not candidates[s.host .. ":" .. s.port] then
            candidates[#candidates + 1] = s
        end
    end
    local errs = {}
    for _, n in ipairs(candidates) do
        local red, err = self.pool:connect_to(n.host, n.port)
        local res
        if red then
            res, err = red:cluster("slots")
        end
        if type(res) == "table" and #res > 0 then
            self.pool:keepalive(red)
            local slots, nodes = {}, {}
            for _, range in ipairs(res) do
                local m = range[3]
                local host = m[1]
                if host == "" then
                    host = n.host -- "" means: the address this reply came over
                end
                local addr = host .. ":" .. m[2]
                nodes[addr] = nodes[addr] or { host = host, port = tonumber(m[2]), addr = addr }
                for s = range[1], range[2] do
                    slots[s] = nodes[addr]
                end
            end
            self.slots, self.nodes = slots, nodes
            return true
        end
        if red then
            red:close()
        end
        errs[#errs + 1] = n.host .. ":" .. n.port .. ": "
                          .. (res and "empty CLUSTER SLOTS" or tostring(err))
    end
    return nil, "no cluster node answered CLUSTER SLOTS: " .. concat(errs, "; ")
end

-- Makes sure there is a slot map, fetching it when there is none or it is stale. One
-- coroutine per worker fetches; the others go on with the stale map meanwhile.
local function ensure_map(self)
    if self.slots and (not self.stale or self.refreshing) then
        return true
    end
    self.refreshing = true
    local ok, err = refresh(self)
    self.refreshing = false
    if ok then
        self.stale = false
    elseif not self.slots then
        return nil, err
    else
        ngx_log(ngx_WARN, "redis cluster: ", err, "; keeping the previous slot map")
    end
    return true
end

local function node_of(self, slot)
    local ok, err = ensure_map(self)
    if not ok then
        return nil, err
    end
    local n = self.slots[slot]
    if not n then
        return nil, "slot " .. slot .. " is not served (cluster incomplete)"
    end
    return n
end

local function node(self, addr)
    local n = self.nodes[addr]
    if not n then
        local host, port = match(addr, "^(.*):(%d+)$")
        n = { host = host, port = tonumber(port), addr = addr }
    end
    return n
end

--- A connection to some node (for /healthz), or nil, err.
function _M.connect_any(self)
    local n, err = node_of(self, 0)
    if not n then
        return nil, "redis cluster: " .. err
    end
    local red
    red, err = self.pool:connect_to(n.host, n.port)
    if not red then
        self.stale = true
    end
    self.pool.where = n.addr
    return red, err
end

--------------------------------------------------------------------------------------------
-- Running a script

-- Runs one group on node `n`, on `red` when given (the caller's connection to n, which it
-- keeps), following redirections. Returns the reply, or nil and an error; and as third value
-- true when it had to close `red` (after an error that can leave a late reply on it).
local function run_group(self, s, g, n, red)
    local asking, err = false, nil
    for try = 1, MAX_TRIES do
        local conn, own = red, false
        if not conn then
            conn, err = self.pool:connect_to(n.host, n.port)
            own = true
        end
        if not conn then
            -- Nothing was sent: fetch the map again and go to the slot's owner.
            self.stale = true
            local owner, e = node_of(self, g.slot)
            if not owner then
                return nil, err .. "; " .. e
            end
            n, asking = owner, false
        else
            local reply
            reply, err = self.pool:eval(conn, s, g.nkeys, g.args, asking)
            if reply then
                if own then
                    self.pool:keepalive(conn)
                end
                return reply
            end
            local code, slot, addr = match(err, "^(%u+) (%d+) (%S+)")
            local tryagain = find(err, "^TRYAGAIN")
            err = "redis " .. n.addr .. ": " .. s.name .. ": " .. err
            if not (code == "MOVED" or code == "ASK" or tryagain) then
                -- A timeout or a broken connection (the script may have run: no retry), or a
                -- script error.
                conn:close()
                return nil, err, not own
            end
            -- An error reply leaves the connection in sync.
            if own then
                self.pool:keepalive(conn)
            end
            ngx_log(ngx_INFO, "redis cluster: ", code or "TRYAGAIN", " ", slot or "", " ",
                    addr or "", " for slot ", g.slot, " (from ", n.addr, ")")
            if code == "MOVED" then
                -- The slot has a new owner for good: record it now, and fetch the whole map
                -- at the next call.
                local to = node(self, addr)
                self.nodes[to.addr] = self.nodes[to.addr] or to
                if self.slots then
                    self.slots[tonumber(slot)] = self.nodes[to.addr]
                end
                self.stale = true
                n, asking, red = self.nodes[to.addr], false, nil
            elseif code == "ASK" then
                n, asking, red = node(self, addr), true, nil
            else
                ngx_sleep(0.005 * try)
            end
        end
    end
    return nil, err .. " (after " .. MAX_TRIES .. " tries)"
end

-- Runs the groups of one node on one connection, in order; replies go to replies[gi].
local function run_node(self, s, n, list, replies)
    local red = self.pool:connect_to(n.host, n.port)
    if not red then
        self.stale = true -- each group then connects (and finds the owner) on its own
    end
    for _, item in ipairs(list) do
        local reply, err, closed
        reply, err, closed = run_group(self, s, item.g, n, red)
        if closed then
            red = nil
        end
        if not reply then
            if red then
                red:close()
            end
            return nil, err
        end
        replies[item.gi] = reply
    end
    if red then
        self.pool:keepalive(red)
    end
    return true
end

--- Runs script `s` over the cluster, split by slot with `shape`; returns the merged reply.
function _M.run(self, s, nkeys, args, shape)
    local order = shape.split(nkeys, args)
    -- The groups by owning node.
    local by_node, nodes = {}, {}
    for gi = 1, #order do
        local n, err = node_of(self, order[gi].slot)
        if not n then
            return nil, "redis cluster: " .. err
        end
        local list = by_node[n]
        if not list then
            list = {}
            by_node[n] = list
            nodes[#nodes + 1] = n
        end
        list[#list + 1] = { g = order[gi], gi = gi }
    end
    local replies = {}
    if #nodes == 1 then
        local ok, err = run_node(self, s, nodes[1], by_node[nodes[1]], replies)
        if not ok then
            return nil, err
        end
    else
        local threads = {}
        for i = 1, #nodes do
            threads[i] = thread_spawn(run_node, self, s, nodes[i], by_node[nodes[i]], replies)
        end
        local first_err
        for i = 1, #nodes do
            local alive, ok, err = thread_wait(threads[i])
            if not alive then
                ok, err = nil, "redis cluster: " .. tostring(ok)
            end
            if not ok and not first_err then
                first_err = err
            end
        end
        if first_err then
            return nil, first_err
        end
    end
    local reply, err = shape.merge(order, replies, nkeys, args)
    if not reply then
        ngx_log(ngx_WARN, "redis cluster: ", err)
        return nil, err
    end
    return reply
end

return _M
