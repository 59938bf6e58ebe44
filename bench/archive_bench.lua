-- prosody-native archive benchmark: mod_storage_native against Prosody's own drivers.
--
-- Run through bench/run (sets LUA_PATH, LUA_CPATH, CFG_PLUGINDIR), e.g.  sh bench/run --help
--
-- Every driver is loaded the way Prosody loads it: core.configmanager options per host,
-- hostmanager.activate, modulemanager.load(host, "storage_<name>"), storagemanager.open(host,
-- "archive", "archive"). The parent process only orchestrates: each phase runs in a child
-- process (this same script with --child <jobfile>), so peak RSS (VmHWM) and caches are per
-- driver and "cold" means the first call in a fresh process (the OS page cache stays warm).
-- The append phase loads all drivers into one process (one host per driver).
--
-- Drivers ("--drivers"):
--   sql          mod_storage_sql on SQLite, 0.12 defaults (rollback journal, synchronous FULL)
--   internal     mod_storage_internal (storage_archive_item_limit raised so 100k items fit)
--   native       mod_storage_native, storage_native_durability = "normal"
--   native_full  mod_storage_native, storage_native_durability = "full" (appends only)

local USAGE = [==[
usage: bench/run [options] [REF_SIZE [NATIVE_SIZE]]
  REF_SIZE, --ref-size N        big archive for sql and internal (default 100000)
  NATIVE_SIZE, --native-size N  big archive for native (default 1000000); native also runs at REF_SIZE
  --appends-sql N               appends into an empty archive, sql (default 1000: it fsyncs ~480/s)
  --appends-internal N          (default 10000)
  --appends-native N            durability "normal" (default 50000)
  --appends-native-full N       durability "full" (default 2000)
  --users U                     the many-users append case spreads the same N over U users (default 1000)
  --warm R                      warm repetitions per query (default 5; fewer if a query is slow)
  --warm-budget S               stop warm repetitions after S seconds per query (default 4)
  --fill-budget S               stop filling a big archive by append() after S seconds and go on with the
                                size reached (default 240; keeps `make bench` bounded if appends are slow)
  --drivers LIST                comma list from sql,internal,native,native_full (default: all available)
  --dir DIR                     work directory (default: a fresh /tmp/prosody-native-bench.XXXXXX)
  --keep                        keep the work directory
  --quick                       small sizes for a smoke run (ref 5000, native 20000, appends /10)
]==]

local PROSODY_DIR = os.getenv("PROSODY_DIR") or "/usr/lib/prosody"
CFG_PLUGINDIR = CFG_PLUGINDIR or os.getenv("CFG_PLUGINDIR") -- luacheck: ignore 111
	or (PROSODY_DIR .. "/modules/;" .. "./modules/")

local T0 = 1700000000          -- `when` of message i is T0 + i (one message per second)
local USER = "alice"
local N_CONTACTS = 20
local ABSENT_JID = "nobody@absent.example"
local POOL = 1000              -- distinct stanzas, reused cyclically

---------------------------------------------------------------------------------------------------
-- small helpers (parent and child)

local function serialize(v, indent)
	indent = indent or ""
	local t = type(v)
	if t == "table" then
		local keys = {}
		for k in pairs(v) do keys[#keys + 1] = k end
		table.sort(keys, function (a, b)
			if type(a) == type(b) then return a < b end
			return type(a) == "number"
		end)
		local out = { "{\n" }
		for _, k in ipairs(keys) do
			out[#out + 1] = ("%s  [%s] = %s,\n"):format(indent, serialize(k), serialize(v[k], indent .. "  "))
		end
		out[#out + 1] = indent .. "}"
		return table.concat(out)
	elseif t == "string" then
		return ("%q"):format(v)
	elseif t == "number" then
		if v ~= v then return "(0/0)" end
		if v == math.huge then return "math.huge" end
		if v == -math.huge then return "-math.huge" end
		return ("%q"):format(v)
	elseif t == "boolean" or t == "nil" then
		return tostring(v)
	end
	return ("%q"):format(tostring(v))
end

local function write_file(path, data)
	local f = assert(io.open(path, "w"))
	f:write(data)
	f:close()
end

local function file_size(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local size = f:seek("end")
	f:close()
	return size
end

local function shell_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function progress(fmt, ...)
	io.stderr:write(("[bench %s] "):format(os.date("%H:%M:%S")), fmt:format(...), "\n")
	io.stderr:flush()
end

local function median(list)
	if #list == 0 then return nil end
	local s = {}
	for i, v in ipairs(list) do s[i] = v end
	table.sort(s)
	local n = #s
	if n % 2 == 1 then return s[(n + 1) // 2] end
	return (s[n // 2] + s[n // 2 + 1]) / 2
end

local function percentile(sorted, p)
	if #sorted == 0 then return nil end
	local idx = math.max(1, math.min(#sorted, math.ceil(#sorted * p)))
	return sorted[idx]
end

local function proc_status(field)
	local f = io.open("/proc/self/status")
	if not f then return nil end
	local data = f:read("a")
	f:close()
	local kb = data:match(field .. ":%s*(%d+)%s*kB")
	return kb and tonumber(kb) * 1024
end

-- CPU time of the calling (main) thread in seconds, ns resolution; nil if unavailable.
local function thread_cpu()
	local f = io.open("/proc/thread-self/schedstat")
	if not f then return nil end
	local ns = f:read("n")
	f:close()
	return ns and ns / 1e9
end

---------------------------------------------------------------------------------------------------
-- the messages: ~480-byte chat stanzas, same for every driver

local WORDS = {
	"the", "meeting", "moved", "to", "tomorrow", "morning", "could", "you", "send", "me", "slides",
	"before", "lunch", "thanks", "a", "lot", "see", "later", "I", "think", "we", "should", "ship",
	"release", "on", "friday", "after", "review", "coffee", "is", "ready", "traffic", "was", "awful",
	"today", "call", "when", "free", "did", "read", "document", "looks", "good", "some", "typos",
}

local function contact(i)
	return ("contact%02d@example.net"):format((i - 1) % N_CONTACTS + 1)
end

local function make_body(i)
	local seed = i * 7919 + 17
	local parts, len = {}, 0
	while len < 210 do
		seed = (seed * 1103515245 + 12345) % 2147483648
		local w = WORDS[seed % #WORDS + 1]
		parts[#parts + 1] = w
		len = len + #w + 1
	end
	return (table.concat(parts, " "):sub(1, 209) .. ".")
end

local function make_pool(st)
	local pool, total = {}, 0
	for i = 1, POOL do
		local m = st.message({
			to = USER .. "@bench.example/phone";
			from = contact(i) .. "/laptop-" .. (i % 7);
			type = "chat";
			id = ("msg-%08d-%04x"):format(i, (i * 40503) % 65536);
		})
			:text_tag("body", make_body(i))
			:tag("origin-id", { xmlns = "urn:xmpp:sid:0"; id = ("oid-%08d-9f3c2b7a"):format(i) }):up()
			:tag("markable", { xmlns = "urn:xmpp:chat-markers:0" }):up()
			:tag("request", { xmlns = "urn:xmpp:receipts" }):up()
		pool[i] = m
		total = total + #tostring(m)
	end
	return pool, total / POOL
end

---------------------------------------------------------------------------------------------------
-- child side: boot Prosody's managers with one host per driver

local DRIVER_INFO = {
	sql = { module = "sql", label = "sql (0.12 defaults)" },
	internal = { module = "internal", label = "internal" },
	native = { module = "native", label = "native (normal)" },
	native_full = { module = "native", label = "native (full)" },
}

local function host_for(name) return name:gsub("_", "-") .. ".bench.example" end

local function host_options(name, data_dir)
	if name == "sql" then
		-- mod_storage_sql's 0.12 defaults; only the file name is ours
		return { storage = "sql", sql = { driver = "SQLite3", database = data_dir .. "/sql-" .. "bench.sqlite" } }
	elseif name == "internal" then
		-- the default 10,000-item cap would refuse the big archive with quota-limit
		return { storage = "internal", storage_archive_item_limit = 1e12 }
	elseif name == "native" then
		return { storage = "native", storage_native_path = data_dir .. "/native.sqlite",
			storage_native_durability = "normal" }
	elseif name == "native_full" then
		return { storage = "native", storage_native_path = data_dir .. "/native-full.sqlite",
			storage_native_durability = "full" }
	end
	error("unknown driver " .. name)
end

local env = {} -- filled by boot()

local function boot(data_dir, driver_names)
	os.execute("mkdir -p " .. shell_quote(data_dir))
	_G.prosody = {
		hosts = {}, events = require "util.events".new(), paths = { data = data_dir },
		core_post_stanza = function () end, core_route_stanza = function () end,
		config_loaded = true, incoming_s2s = {}, start_time = os.time(),
	}
	local logger = require "util.logger"
	logger.add_simple_sink(function (source, level, message)
		io.stderr:write(("  [%s %s] %s\n"):format(level, source, message))
	end, { "warn", "error" })
	local config = require "core.configmanager"
	config.set("*", "network_backend", "epoll")
	env.config = config
	env.sm = require "core.storagemanager"
	env.mm = require "core.modulemanager"
	env.hm = require "core.hostmanager"
	env.st = require "util.stanza"
	env.async = require "util.async"
	env.server = require "net.server"
	env.timer = require "util.timer"
	env.time = require "util.time"
	-- as util.startup.init_async() does in a real server
	env.async.set_nexttick(function (f) return env.timer.add_task(0, f) end)
	env.async.set_schedule_function(env.timer.add_task)
	env.stores, env.drivers = {}, {}
	for _, name in ipairs(driver_names) do
		local host = host_for(name)
		for k, v in pairs(host_options(name, data_dir)) do config.set(host, k, v) end
		assert(env.hm.activate(host))
		local modname = "storage_" .. DRIVER_INFO[name].module
		local ok, err = env.mm.load(host, modname)
		if not ok then error(("%s: modulemanager.load(%q) failed: %s"):format(name, modname, tostring(err))) end
		local driver = env.sm.load_driver(host, DRIVER_INFO[name].module)
		assert(driver and driver.name == DRIVER_INFO[name].module, name .. ": driver not registered")
		local store = env.sm.open(host, "archive", "archive")
		assert(store and store.find and store.append, name .. ": no archive store")
		if store.name == "null" then error(name .. ": storagemanager returned the null driver") end
		env.stores[name] = store
		env.drivers[name] = driver
	end
	env.pool, env.msg_bytes = make_pool(env.st)
end

local now -- monotonic seconds, set after boot
local function clocks() return now(), os.clock(), thread_cpu() end

-- Run f inside a util.async runner while driving the real net.server loop (epoll) with timers,
-- as a Prosody stanza handler or module:daily job would. Every coroutine.resume of the runner's
-- thread is one slice of main-thread work between two yields; we time each slice. A 1 ms
-- heartbeat timer measures the longest the loop went without running timers.
local function run_async(f)
	local server, async = env.server, env.async
	local done, result, failure = false, nil, nil
	local r = async.runner(function (task) task() end, {
		error = function (_, err) failure = tostring(err); done = true end,
	})
	local slices, slice_sum, slice_max, slice_cpu_max = 0, 0, 0, 0
	local real_resume = coroutine.resume
	local last_beat, beat_max = nil, 0
	coroutine.resume = function (co, ...) -- luacheck: ignore 122
		if co ~= r.thread or done then return real_resume(co, ...) end
		-- wall time is what the loop waits; the main thread's CPU time is what the slice
		-- itself costs, whatever else the (shared) machine is running
		local t, c = now(), thread_cpu()
		local res = table.pack(real_resume(co, ...))
		local d, dc = now() - t, c and (thread_cpu() - c)
		slices, slice_sum = slices + 1, slice_sum + d
		if d > slice_max then slice_max = d end
		if dc and dc > slice_cpu_max then slice_cpu_max = dc end
		return table.unpack(res, 1, res.n)
	end
	local started, beat_after_done = false, false
	env.timer.add_task(0.001, function ()
		local t = now()
		if started and last_beat and t - last_beat > beat_max then beat_max = t - last_beat end
		last_beat = t
		if done then
			if beat_after_done then return end -- stop
			beat_after_done = true -- one more 1 ms timer keeps epoll_wait short so loop(true) returns
		end
		return 0.001
	end)
	local w0, c0, m0
	env.timer.add_task(0.005, function ()
		w0, c0, m0 = clocks()
		started = true
		r:run(function ()
			result = table.pack(f())
			done = true
		end)
	end)
	last_beat = now()
	while not (done and beat_after_done) do server.loop(true) end
	local w1, c1, m1 = clocks()
	coroutine.resume = real_resume -- luacheck: ignore 122
	if failure then error("async task failed: " .. failure) end
	return {
		wall = w1 - w0, cpu = c1 - c0, main_cpu = m1 and m0 and (m1 - m0),
		slices = slices, slice_sum = slice_sum, slice_max = slice_max, slice_cpu_max = slice_cpu_max,
		loop_gap_max = beat_max,
	}, table.unpack(result, 1, result.n)
end

-- The WAL (or rollback journal) next to a driver's database file, to sample its size.
local function journal_path(name, data_dir)
	if name == "native" then return data_dir .. "/native.sqlite-wal" end
	if name == "native_full" then return data_dir .. "/native-full.sqlite-wal" end
end

-- mod_storage_native keeps its engine handle in an upvalue `db` of its store methods. To see
-- how long each engine call inside a sliced delete takes (delete slice vs incremental vacuum),
-- wrap the handle's methods in this process only. Returns the per-method stats table or nil.
local function instrument_engine(store, methods)
	local mt = getmetatable(store)
	local index = mt and type(mt.__index) == "table" and mt.__index
	if not index then return nil end
	local db
	for _, f in pairs(index) do
		if type(f) == "function" then
			for i = 1, 64 do
				local name, v = debug.getupvalue(f, i)
				if not name then break end
				if name == "db" and type(v) == "userdata" then db = v break end
			end
		end
		if db then break end
	end
	local dbmt = db and getmetatable(db)
	local methods_tab = dbmt and type(dbmt) == "table" and type(dbmt.__index) == "table" and dbmt.__index
	if not methods_tab then return nil end
	local stats = {}
	for _, m in ipairs(methods) do
		local orig = methods_tab[m]
		if type(orig) == "function" then
			local s = { calls = 0, sum = 0, max = 0 }
			stats[m] = s
			methods_tab[m] = function (...)
				local t = now()
				local res = table.pack(orig(...))
				local d = now() - t
				s.calls, s.sum = s.calls + 1, s.sum + d
				if d > s.max then s.max = d end
				return table.unpack(res, 1, res.n)
			end
		end
	end
	return stats
end

-- mod_storage_native commits appends in batches (group commit, durability "normal"): the batch
-- still open when a timed loop ends is committed inside the timed region, so every measured
-- append has paid its share of a commit. No-op for the other drivers.
local function flush_pending(store)
	local mt = getmetatable(store)
	local index = mt and type(mt.__index) == "table" and mt.__index
	if not index or type(index.append) ~= "function" then return end
	for i = 1, 64 do
		local name, v = debug.getupvalue(index.append, i)
		if not name then break end
		if name == "db" and type(v) == "userdata" then
			local flush = v.flush
			if flush then assert(flush(v)) end
			return
		end
	end
end

---------------------------------------------------------------------------------------------------
-- phases

local phases = {}

local function append_loop(store, n, user_of, keep_keys, wal, budget)
	local pool = env.pool
	local lat = {}
	local keys = {}
	local wal_peak = wal and file_size(wal) or nil
	local w0, c0, m0 = clocks()
	local deadline = budget and w0 + budget
	local done = n
	for i = 1, n do
		if deadline and i % 1000 == 1 and i > 1 and now() > deadline then
			done = i - 1
			break
		end
		local t = now()
		local key, err = store:append(user_of(i), nil, pool[(i - 1) % POOL + 1], T0 + i, contact(i))
		lat[i] = now() - t
		if not key then error(("append %d failed: %s"):format(i, tostring(err))) end
		if keep_keys and (keep_keys[i] or (budget and i % 1000 == 0)) then keys[i] = key end
		if wal and i % 2000 == 0 then
			local sz = file_size(wal)
			if sz and sz > (wal_peak or 0) then wal_peak = sz end
		end
	end
	flush_pending(store)
	local w1, c1, m1 = clocks()
	table.sort(lat)
	return {
		n = done, planned = n, wall = w1 - w0, cpu = c1 - c0, main_cpu = m1 and m0 and (m1 - m0),
		p50 = percentile(lat, 0.5), p99 = percentile(lat, 0.99), max = lat[#lat],
		wal_peak = wal_peak, wal_end = wal and file_size(wal) or nil,
	}, keys
end

-- appends into empty archives, every driver in this one process
function phases.append(job)
	boot(job.data_dir, job.drivers)
	local out = { msg_bytes = env.msg_bytes }
	for _, name in ipairs(job.drivers) do
		local store, n = env.stores[name], job.appends[name]
		progress("append: %s, %d appends, one user", name, n)
		collectgarbage()
		local wal = journal_path(name, job.data_dir)
		local one = append_loop(store, n, function () return USER end, nil, wal)
		progress("append: %s, %d appends over %d users", name, n, job.users)
		collectgarbage()
		local many = append_loop(store, n, function (i) return ("user%05d"):format((i - 1) % job.users + 1) end, nil, wal)
		-- each trip through server_epoll's loop costs >= 1 ms (min_wait) when only a timer is due,
		-- so the async case is capped: it shows slices and main-thread cost, not throughput
		n = math.min(n, job.async_appends or 2000)
		progress("append: %s, %d appends, one user, inside util.async runner", name, n)
		collectgarbage()
		local pool = env.pool
		-- one append per trip through the event loop, as stanzas arrive: async.sleep(0) between appends
		local sleep = env.async.sleep
		local stats = run_async(function ()
			for i = 1, n do
				local key, err = store:append("async-" .. USER, nil, pool[(i - 1) % POOL + 1], T0 + i, contact(i))
				if not key then error(("async append %d failed: %s"):format(i, tostring(err))) end
				sleep(0)
			end
			flush_pending(store)
		end)
		stats.n = n
		out[name] = { one = one, many = many, async = stats, users = job.users }
	end
	return out
end

-- mod_storage_sql: the rows its append() writes, inserted in one transaction through its own engine
local function fill_sql_batched(store, n, keep_keys)
	local uuid = require "util.uuid"
	local host = host_for("sql")
	local mod = env.mm.get_module(host, "storage_sql")
	local api = mod and (mod.module or mod)
	local engines = api:shared("/*/sql/connections")
	local _, engine = next(engines)
	assert(engine and engine.transaction and engine.insert, "cannot reach mod_storage_sql's engine")
	-- same statement as archive_store:append in 0.12.3 mod_storage_sql
	local insert_sql = [[
		INSERT INTO "prosodyarchive"
		("host", "user", "store", "when", "with", "key", "type", "value")
		VALUES (?,?,?,?,?,?,?,?);
		]]
	local serialized = {}
	for i = 1, POOL do serialized[i] = tostring(env.pool[i]) end
	local keys = {}
	local w0, c0 = clocks()
	local batch = 10000
	for first = 1, n, batch do
		local ok, err = engine:transaction(function ()
			for i = first, math.min(n, first + batch - 1) do
				local key = uuid.generate()
				if keep_keys[i] then keys[i] = key end
				engine:insert(insert_sql, host, USER, "archive", T0 + i, contact(i), key, "xml",
					serialized[(i - 1) % POOL + 1])
			end
		end)
		assert(ok, err)
	end
	local w1, c1 = clocks()
	return { n = n, wall = w1 - w0, cpu = c1 - c0, batched = batch }, keys
end

function phases.fill(job)
	boot(job.data_dir, { job.driver })
	local store, n = env.stores[job.driver], job.n
	local keep = {}
	for _, p in pairs(job.key_positions) do keep[p] = true end
	progress("fill: %s, %d messages", job.driver, n)
	local stats, keys
	if job.driver == "sql" then
		stats, keys = fill_sql_batched(store, n, keep)
	else
		stats, keys = append_loop(store, n, function () return USER end, keep, journal_path(job.driver, job.data_dir),
			job.budget)
	end
	stats.rss_peak = proc_status("VmHWM")
	local named = {}
	if stats.n < n then
		-- stopped by the fill budget (always after a multiple of 1000 appends): use the keys kept
		-- every 1000 appends nearest to the quarters of the size reached. No find() here: a query
		-- in this process could change what the database looks like to the next one (statistics).
		progress("fill: %s stopped by the time budget after %d of %d messages", job.driver, stats.n, n)
		local m = stats.n
		local k = m // 1000
		local pos = { q1 = math.max(1, k // 4), mid = math.max(1, (k + 1) // 2), q3 = math.max(1, math.min(k, -((-3 * k) // 4))) }
		for name, p in pairs(pos) do named[name] = keys[p * 1000] end
	else
		for name, p in pairs(job.key_positions) do named[name] = keys[p] end
	end
	return { fill = stats, keys = named, msg_bytes = env.msg_bytes, n = stats.n }
end

local function build_queries(n, keys)
	local mid_when = T0 + n // 2
	local distinct = {}
	for _, k in ipairs({ keys.q1 or 1, keys.mid or 2, keys.q3 or 3 }) do distinct[k] = true end
	local n_ids = 0
	for _ in pairs(distinct) do n_ids = n_ids + 1 end
	return {
		{ id = "page", label = "newest page {reverse,limit=51,total}",
			q = { reverse = true, limit = 51, total = true }, items = 51, total = n },
		{ id = "with_absent", label = "with = absent JID (+total)",
			q = { with = ABSENT_JID, reverse = true, limit = 51, total = true }, items = 0, total = 0 },
		{ id = "with_contact", label = "with = contact (1/20 of msgs) (+total)",
			q = { with = contact(1), reverse = true, limit = 51, total = true }, items = 51, total = n // N_CONTACTS },
		{ id = "ids", label = "ids = 3 ids (+total)",
			q = { ids = { keys.q3, keys.q1, keys.mid }, limit = 51, total = true }, items = n_ids, total = n_ids },
		{ id = "after_mid", label = "RSM after=<mid id> (+total)",
			q = { after = keys.mid, limit = 51, total = true }, items = 51, total = n },
		{ id = "before_mid", label = "RSM before=<mid id> reverse (+total)",
			q = { before = keys.mid, reverse = true, limit = 51, total = true }, items = 51, total = n },
		{ id = "window", label = "start/end 1 h window (+total)",
			q = { start = mid_when, ["end"] = mid_when + 3599, limit = 51, total = true },
			items = math.min(51, n - n // 2 + 1), total = math.min(3600, n - n // 2 + 1) },
		{ id = "total", label = "total only {limit=0,total}",
			q = { limit = 0, total = true }, items = 0, total = n },
		{ id = "metadata", label = "metadata (limit=1 both ends)", metadata = true, items = 2 },
		{ id = "unknown_after", label = "after=<unknown id> -> item-not-found",
			q = { after = "no-such-id-0000", limit = 51, total = true }, not_found = true },
	}
end

local function copy_query(q)
	local c = {}
	for k, v in pairs(q) do
		if type(v) == "table" then
			local t = {}
			for i, x in ipairs(v) do t[i] = x end
			v = t
		end
		c[k] = v
	end
	return c
end

local function drain(store, user, q)
	local iter, total = store:find(user, q)
	if not iter then return nil, total end
	local n, first_bad = 0, nil
	for key, value, when, with in iter do
		n = n + 1
		if not first_bad and (type(key) ~= "string" or not env.st.is_stanza(value)
			or type(when) ~= "number" or type(with) ~= "string") then
			first_bad = ("item %d: key %s, value %s, when %s, with %s"):format(n, type(key),
				env.st.is_stanza(value) and "stanza" or type(value), type(when), type(with))
		end
		local _ = value.name
	end
	return n, total, first_bad
end

local function run_one(store, qd)
	local w0, c0 = now(), os.clock()
	local items, total, bad
	if qd.metadata then
		local a, _, b1 = drain(store, USER, { limit = 1 })
		local b, _, b2 = drain(store, USER, { limit = 1, reverse = true })
		items, bad = (a or 0) + (b or 0), b1 or b2
	else
		items, total, bad = drain(store, USER, copy_query(qd.q))
	end
	local w1, c1 = now(), os.clock()
	return w1 - w0, c1 - c0, items, total, bad
end

local function check_result(qd, items, total, bad)
	if qd.not_found then
		if items ~= nil or total ~= "item-not-found" then
			return ("expected nil, \"item-not-found\", got %s, %s"):format(tostring(items), tostring(total))
		end
		return nil
	end
	if items == nil then return ("find failed: %s"):format(tostring(total)) end
	if bad then return bad end
	if items ~= qd.items then return ("%d items, expected %d"):format(items, qd.items) end
	if qd.total and not qd.metadata and tonumber(total) ~= qd.total then
		return ("total %s, expected %d"):format(tostring(total), qd.total)
	end
end

function phases.query(job)
	boot(job.data_dir, { job.driver })
	collectgarbage()
	local store = env.stores[job.driver]
	local out = { rss_loaded = proc_status("VmRSS"), queries = {}, problems = {} }
	for _, qd in ipairs(build_queries(job.n, job.keys)) do
		local w, c, items, total, bad = run_one(store, qd)
		local problem = check_result(qd, items, total, bad)
		local warm_w, warm_c = {}, {}
		local spent = 0
		for _ = 1, job.warm do
			if spent > job.warm_budget and #warm_w >= 1 then break end
			local ww, cc = run_one(store, qd)
			warm_w[#warm_w + 1], warm_c[#warm_c + 1] = ww, cc
			spent = spent + ww
		end
		out.queries[qd.id] = { label = qd.label, cold = w, cold_cpu = c, warm = median(warm_w),
			warm_cpu = median(warm_c), runs = #warm_w, items = items, total = total, problem = problem }
		if problem then out.problems[#out.problems + 1] = qd.label .. ": " .. problem end
		progress("query: %s@%d %-40s cold %.2f ms, warm %.2f ms%s", job.driver, job.n, qd.label, w * 1e3,
			median(warm_w) * 1e3, problem and ("  PROBLEM: " .. problem) or "")
	end
	-- one more append into the big archive: first one in this process, then median of 4
	local lat = {}
	for j = 1, 5 do
		local t = now()
		local key, err = store:append(USER, nil, env.pool[j], T0 + job.n + j, contact(j))
		lat[j] = now() - t
		if not key then out.problems[#out.problems + 1] = "append into big archive: " .. tostring(err) end
	end
	out.extra_appends = 5
	out.append_cold = lat[1]
	out.append_warm = median({ lat[2], lat[3], lat[4], lat[5] })
	out.rss_peak = proc_status("VmHWM")
	return out
end

function phases.delete(job)
	boot(job.data_dir, { job.driver })
	collectgarbage()
	local store = env.stores[job.driver]
	local cutoff = T0 + job.n // 2
	progress("delete: %s@%d, {end = T0 + %d} inside util.async runner", job.driver, job.n, job.n // 2)
	local engine_calls = DRIVER_INFO[job.driver].module == "native"
		and instrument_engine(store, { "delete", "vacuum_step" }) or nil
	local wal = journal_path(job.driver, job.data_dir)
	local wal_peak = wal and file_size(wal) or nil
	if wal then
		env.timer.add_task(0.05, function ()
			local sz = file_size(wal)
			if sz and sz > (wal_peak or 0) then wal_peak = sz end
			return 0.05
		end)
	end
	local stats, ret, err = run_async(function ()
		return store:delete(USER, { ["end"] = cutoff })
	end)
	local out = { delete = stats, ret = ret, err = err and tostring(err), problems = {},
		engine_calls = engine_calls, wal_peak = wal_peak }
	if not ret then out.problems[1] = "delete failed: " .. tostring(err) end
	-- what the driver reports about its own slices, if it exposes anything
	local drv = env.drivers[job.driver]
	for _, obj in ipairs({ store, drv }) do
		for _, field in ipairs({ "last_delete_stats", "delete_stats", "stats" }) do
			local v = obj[field]
			if type(v) == "function" then
				local ok, r = pcall(v, obj)
				if ok and type(r) == "table" then out.driver_stats = r break end
			elseif type(v) == "table" then
				out.driver_stats = v break
			end
		end
		if out.driver_stats then break end
	end
	local expect_left = job.n - job.n // 2 + (job.extra_appends or 0)
	local w, _, items, total = run_one(store, { q = { limit = 0, total = true } })
	out.total_after, out.total_after_ms = tonumber(total), w
	if tonumber(total) ~= expect_left then
		out.problems[#out.problems + 1] = ("total after delete %s, expected %d"):format(tostring(total), expect_left)
	end
	local pw = {}
	for j = 1, 3 do pw[j] = run_one(store, { q = { reverse = true, limit = 51, total = true } }) end
	out.page_after_cold, out.page_after_warm = pw[1], median({ pw[2], pw[3] })
	out.rss_peak = proc_status("VmHWM")
	local _ = items
	return out
end

local function child_main(jobfile)
	local job = dofile(jobfile)
	local ok_time, time = pcall(require, "util.time")
	assert(ok_time, "util.time not found: run through bench/run (LUA_CPATH)")
	now = time.monotonic or time.now
	local ok, res = xpcall(phases[job.phase], debug.traceback, job)
	if not ok then
		io.stderr:write("child failed: ", tostring(res), "\n")
		res = { failed = tostring(res) }
	end
	write_file(job.result, "return " .. serialize(res) .. "\n")
	os.exit(ok and 0 or 1, true)
end

---------------------------------------------------------------------------------------------------
-- parent side

local function parse_args(argv)
	local o = {
		ref = 100000, native = 1000000, users = 1000, warm = 5, warm_budget = 4, fill_budget = 240,
		appends = { sql = 1000, internal = 10000, native = 50000, native_full = 2000 },
	}
	local positional = {}
	local i = 1
	local function num(name)
		i = i + 1
		local v = tonumber(argv[i])
		if not v or v < 1 then io.stderr:write("bad value for ", name, "\n", USAGE) os.exit(2) end
		return math.floor(v)
	end
	while i <= #argv do
		local a = argv[i]
		if a == "--help" or a == "-h" then io.stdout:write(USAGE) os.exit(0)
		elseif a == "--ref-size" then o.ref = num(a)
		elseif a == "--native-size" then o.native = num(a)
		elseif a == "--appends-sql" then o.appends.sql = num(a)
		elseif a == "--appends-internal" then o.appends.internal = num(a)
		elseif a == "--appends-native" then o.appends.native = num(a)
		elseif a == "--appends-native-full" then o.appends.native_full = num(a)
		elseif a == "--users" then o.users = num(a)
		elseif a == "--warm" then o.warm = num(a)
		elseif a == "--warm-budget" then o.warm_budget = num(a)
		elseif a == "--fill-budget" then o.fill_budget = num(a)
		elseif a == "--drivers" then i = i + 1; o.drivers = argv[i]
		elseif a == "--dir" then i = i + 1; o.dir = argv[i]
		elseif a == "--keep" then o.keep = true
		elseif a == "--quick" then o.quick = true
		elseif a:match("^%d+$") then positional[#positional + 1] = tonumber(a)
		else io.stderr:write("unknown argument ", a, "\n", USAGE) os.exit(2) end
		i = i + 1
	end
	if o.quick then
		o.ref, o.native = 5000, 20000
		for k, v in pairs(o.appends) do o.appends[k] = math.max(100, v // 10) end
		o.users = 100
	end
	if positional[1] then o.ref = positional[1] end
	if positional[2] then o.native = positional[2] end
	return o
end

local function native_available()
	local dir = os.getenv("PN_ROOT") or "."
	local so = file_size(dir .. "/" .. (os.getenv("PN_BUILD") or "build") .. "/prosody_native/archive.so")
	local shim = file_size(dir .. "/modules/mod_storage_native.lua")
	return so ~= nil and shim ~= nil
end

local function dir_files(dir)
	local files = {}
	local p = io.popen("find " .. shell_quote(dir) .. " -type f -printf '%s %P\\n' 2>/dev/null")
	for line in p:lines() do
		local size, name = line:match("^(%d+) (.*)$")
		if size then files[#files + 1] = { name = name, size = tonumber(size) } end
	end
	p:close()
	table.sort(files, function (a, b) return a.name < b.name end)
	return files
end

local function disk_usage(dir)
	local total, parts = 0, {}
	for _, f in ipairs(dir_files(dir)) do
		total = total + f.size
		parts[#parts + 1] = ("%s %.1f MB"):format(f.name:match("[^/]*$"), f.size / 1e6)
	end
	return total, table.concat(parts, ", ")
end

local job_counter = 0
local function run_child(o, job)
	job_counter = job_counter + 1
	local base = ("%s/job-%02d-%s"):format(o.dir, job_counter, job.phase)
	job.result = base .. ".result.lua"
	write_file(base .. ".job.lua", "return " .. serialize(job) .. "\n")
	local interp = arg[-1] or "lua5.4"
	local cmd = ("%s %s --child %s"):format(shell_quote(interp), shell_quote(arg[0]), shell_quote(base .. ".job.lua"))
	local t = os.time()
	os.execute(cmd)
	local ok, res = pcall(dofile, job.result)
	if not ok or type(res) ~= "table" then
		res = { failed = "child produced no result (crashed?): " .. tostring(res) }
	end
	res.elapsed = os.time() - t
	return res
end

-- formatting
local function fms(s)
	if s == nil then return "-" end
	local ms = s * 1e3
	if ms >= 1000 then return ("%.0f"):format(ms) end
	if ms >= 100 then return ("%.0f"):format(ms) end
	if ms >= 10 then return ("%.1f"):format(ms) end
	if ms >= 1 then return ("%.2f"):format(ms) end
	return ("%.3f"):format(ms)
end
local function fus(s) return s and ("%.1f"):format(s * 1e6) or "-" end
local function fmb(b) return b and ("%.1f"):format(b / 1048576) or "-" end

local function ratio_text(ref, nat, what)
	if not ref or not nat then return "-" end
	if nat <= 0 then return "native n/a (0)" end
	local r = ref / nat
	what = what or { "faster", "slower" }
	if r >= 1 then
		return ("native %.1fx %s"):format(r, what[1])
	end
	return ("native %.1fx %s"):format(1 / r, what[2])
end

local function pad(s, w) s = tostring(s); return s .. string.rep(" ", math.max(0, w - #s)) end
local function lpad(s, w) s = tostring(s); return string.rep(" ", math.max(0, w - #s)) .. s end

local function print_table(headers, rows, align)
	local widths = {}
	for i, h in ipairs(headers) do widths[i] = #h end
	for _, r in ipairs(rows) do
		for i, c in ipairs(r) do widths[i] = math.max(widths[i] or 0, #tostring(c)) end
	end
	local function line(cells)
		local out = {}
		for i, c in ipairs(cells) do
			out[i] = (align and align[i] == "r") and lpad(c, widths[i]) or pad(c, widths[i])
		end
		print((table.concat(out, "  "):gsub("%s+$", "")))
	end
	line(headers)
	local sep = {}
	for i, w in ipairs(widths) do sep[i] = string.rep("-", w) end
	line(sep)
	for _, r in ipairs(rows) do line(r) end
end

local function loadavg()
	local f = io.open("/proc/loadavg")
	if not f then return "?" end
	local l = f:read("l") or "?"
	f:close()
	return (l:match("^(%S+ %S+ %S+)") or l)
end

local function parent_main(argv)
	local o = parse_args(argv)
	local load_start = loadavg()
	local started = os.time()
	local t_start = os.clock()
	local _ = t_start
	if not o.dir then
		local p = io.popen("mktemp -d /tmp/prosody-native-bench.XXXXXX")
		o.dir = p:read("l")
		p:close()
	else
		os.execute("mkdir -p " .. shell_quote(o.dir))
	end
	local have_native = native_available()
	local wanted = {}
	for d in (o.drivers or "sql,internal,native,native_full"):gmatch("[^,%s]+") do
		if not DRIVER_INFO[d] then io.stderr:write("unknown driver ", d, "\n") os.exit(2) end
		wanted[#wanted + 1] = d
	end
	local drivers, notes = {}, {}
	for _, d in ipairs(wanted) do
		if DRIVER_INFO[d].module == "native" and not have_native then
			if not notes.native_missing then
				notes.native_missing = true
				notes[#notes + 1] = "native driver not built (build/prosody_native/archive.so or modules/mod_storage_native.lua missing): skipped"
			end
		else
			drivers[#drivers + 1] = d
		end
	end
	local has = {}
	for _, d in ipairs(drivers) do has[d] = true end
	progress("work dir %s; drivers %s; big archives: references %d, native %d", o.dir, table.concat(drivers, ","), o.ref, o.native)

	-- 1. appends, all drivers in one process
	local app = run_child(o, { phase = "append", data_dir = o.dir .. "/append", drivers = drivers,
		appends = o.appends, users = o.users })

	-- 2. big archives: fill, query, delete; one process each
	local key_positions = function (n) return { q1 = n // 4, mid = n // 2, q3 = (3 * n) // 4 } end
	local big = {}
	local function big_run(driver, n, tag)
		local data_dir = ("%s/big-%s-%d"):format(o.dir, driver, n)
		local r = { driver = driver, n = n, planned = n, tag = tag }
		r.fill = run_child(o, { phase = "fill", data_dir = data_dir, driver = driver, n = n, key_positions = key_positions(n),
			budget = o.fill_budget })
		if r.fill.failed then big[#big + 1] = r return end
		if r.fill.n and r.fill.n < n then
			r.n = r.fill.n
			r.tag = ("%s@%d*"):format(driver, r.n)
			notes[#notes + 1] = ("%s: * filling %d messages did not finish within --fill-budget %d s; measured at %d"):format(
				driver, n, o.fill_budget, r.n)
		end
		n = r.n
		r.disk, r.disk_detail = disk_usage(data_dir)
		r.query = run_child(o, { phase = "query", data_dir = data_dir, driver = driver, n = n, keys = r.fill.keys,
			warm = o.warm, warm_budget = o.warm_budget })
		r.delete = run_child(o, { phase = "delete", data_dir = data_dir, driver = driver, n = n,
			extra_appends = r.query.extra_appends or 0 })
		r.disk_after, r.disk_after_detail = disk_usage(data_dir)
		big[#big + 1] = r
	end
	if has.sql then big_run("sql", o.ref, "sql@" .. o.ref) end
	if has.internal then big_run("internal", o.ref, "internal@" .. o.ref) end
	if has.native then
		big_run("native", o.ref, "native@" .. o.ref)
		if o.native ~= o.ref then big_run("native", o.native, "native@" .. o.native) end
	end

	-------------------------------------------------------------------------------------------
	-- report
	local function find_big(driver, n)
		for _, r in ipairs(big) do if r.driver == driver and r.planned == n then return r end end
	end
	local problems = {}
	local function note_problems(tag, list)
		for _, p in ipairs(list or {}) do problems[#problems + 1] = tag .. ": " .. p end
	end

	print()
	print(("prosody-native archive benchmark  (%s, %s, Prosody %s, %d CPUs)"):format(os.date("%Y-%m-%d %H:%M"),
		_VERSION, (function ()
			local f = io.open(PROSODY_DIR .. "/prosody.version")
			local v = f and f:read("l")
			if f then f:close() end
			return v or "?"
		end)(), (function ()
			local p = io.popen("nproc") local v = p:read("l") p:close() return tonumber(v) or 0
		end)()))
	print(("messages: %d-byte chat stanzas (body %d chars, origin-id, markable, receipt request), `with` cycling over %d contacts, when = T0 + i")
		:format(math.floor((app.msg_bytes or (big[1] and big[1].fill.msg_bytes) or 0) + 0.5), #make_body(1), N_CONTACTS))
	print("times: wall clock (util.time.monotonic); cpu = os.clock (whole process, includes helper threads); main cpu = main thread only (/proc/thread-self/schedstat)")
	print(("load average at start %s, at end %s (anything else running on the machine makes wall times noisy: compare cpu columns too)")
		:format(load_start, loadavg()))

	-- appends
	print()
	print("== 1. Appends into empty archives (one process, all drivers; one user / " .. o.users .. " users round-robin) ==")
	if app.failed then
		print("append phase FAILED: " .. app.failed)
	else
		local rows = {}
		for _, d in ipairs(drivers) do
			local a = app[d]
			if a then
				for _, case in ipairs({ { "1 user", a.one }, { a.users .. " users", a.many } }) do
					local s = case[2]
					rows[#rows + 1] = { DRIVER_INFO[d].label, case[1], s.n, ("%.2f"):format(s.wall), ("%.0f"):format(s.n / s.wall),
						fus(s.wall / s.n), fus(s.p50), fus(s.p99), fms(s.max),
						fus(s.main_cpu and s.main_cpu / s.n), fus(s.cpu / s.n), s.wal_peak and fmb(s.wal_peak) or "-" }
				end
			end
		end
		print_table({ "driver", "archive", "N", "wall s", "msg/s", "µs/append", "p50 µs", "p99 µs", "max ms",
			"main cpu µs", "cpu µs", "WAL peak MB" }, rows, { nil, nil, "r", "r", "r", "r", "r", "r", "r", "r", "r", "r" })
		print()
		print("   inside a util.async runner with the real net.server loop (what mod_mam does: stanza handlers run in async runners):")
		rows = {}
		for _, d in ipairs(drivers) do
			local s = app[d] and app[d].async
			if s then
				rows[#rows + 1] = { DRIVER_INFO[d].label, s.n, ("%.2f"):format(s.wall), ("%.0f"):format(s.n / s.wall),
					fus(s.wall / s.n), ("%.2f"):format(s.slices / s.n), fus(s.slice_sum / s.n), fms(s.slice_max),
					fus(s.main_cpu and s.main_cpu / s.n), fus(s.cpu / s.n) }
			end
		end
		print_table({ "driver", "N", "wall s", "msg/s", "wall µs/append", "slices/append", "slice µs/append",
			"max slice ms", "main cpu µs", "cpu µs" }, rows, { nil, "r", "r", "r", "r", "r", "r", "r", "r", "r" })
		print()
		local sql = app.sql and app.sql.one
		for _, d in ipairs({ "native", "native_full" }) do
			local a = app[d] and app[d].one
			if a and sql then
				local ratio, cpu = (a.n / a.wall) / (sql.n / sql.wall), (a.main_cpu or 0) / a.n * 1e6
				print(("   %s: append throughput %.1fx sql's default (%.0f vs %.0f msg/s; issue target >= 40x in a durable mode: %s); main-thread cost %.1f µs/append wall, %.1f µs main cpu (target <= 50 µs: %s)")
					:format(DRIVER_INFO[d].label, ratio, a.n / a.wall, sql.n / sql.wall, ratio >= 40 and "met" or "not met",
						a.wall / a.n * 1e6, cpu, (a.main_cpu and cpu <= 50) and "met" or "not met"))
				print(("   %s: commits included (the batch still open at the end is committed inside the timed loop); wall cost over 1000 users %.1f µs, main cpu %.1f µs")
					:format(DRIVER_INFO[d].label, app[d].many.wall / app[d].many.n * 1e6, (app[d].many.main_cpu or 0) / app[d].many.n * 1e6))
			end
			local as = app[d] and app[d].async
			if as then
				print(("   %s in async context: main-thread busy %.1f µs/append (sum of slices), main cpu %.1f µs/append, %.0f msg/s")
					:format(DRIVER_INFO[d].label, as.slice_sum / as.n * 1e6, (as.main_cpu or 0) / as.n * 1e6, as.n / as.wall))
			end
		end
		if app.internal and app.internal.one and app.native then
			local a, i = app.native.one, app.internal.one
			print(("   native (normal) vs internal (no fsync at all): %s"):format(ratio_text(i.wall / i.n, a.wall / a.n)))
		end
	end

	-- fills
	print()
	print("== 2. Filling the big archives (one user) ==")
	local rows = {}
	for _, r in ipairs(big) do
		local f = r.fill
		if f.failed then
			rows[#rows + 1] = { r.tag, "FAILED", f.failed:match("[^\n]*") }
		else
			local s = f.fill
			local how = r.driver == "sql" and ("batched INSERTs, %d per transaction (see below)"):format(s.batched)
				or "store:append()"
			rows[#rows + 1] = { r.tag, how, ("%.1f"):format(s.wall), ("%.0f"):format(s.n / s.wall),
				s.p99 and fus(s.p99) or "-", s.max and fms(s.max) or "-", s.wal_peak and fmb(s.wal_peak) or "-", fmb(s.rss_peak),
				("%.1f"):format(r.disk / 1e6), ("%.0f"):format(r.disk / r.n), r.disk_detail }
		end
	end
	print_table({ "archive", "how", "wall s", "msg/s", "p99 µs", "max ms", "WAL peak MB", "peak RSS MB", "disk MB", "B/msg", "files" }, rows,
		{ nil, nil, "r", "r", "r", "r", "r", "r", "r", "r" })
	print("   disk = all files in the data dir after the filling process exited (a clean close checkpoints and removes the WAL);")
	print("   WAL peak = largest -wal file seen while appending (sampled every 2000 appends); fill RSS includes the benchmark's own latency array (16 B/append)")
	if has.sql then
		print("   sql: filled by batching rows identical to its append() (same INSERT, util.uuid keys, type 'xml', tostring(stanza))")
		print("        through its own engine:transaction(), because its per-append fsync (~480/s) cannot fill 100k in budget")
	end

	-- queries
	print()
	print("== 3. Queries on the big archive (ms wall; cold = first call in a fresh process / warm = median of repeats; results fully iterated) ==")
	local cols = {}
	for _, r in ipairs(big) do if r.query and not r.query.failed then cols[#cols + 1] = r end end
	for _, r in ipairs(big) do
		if r.query and r.query.failed then print("   " .. r.tag .. " query phase FAILED: " .. r.query.failed:match("[^\n]*")) end
		if r.query then note_problems(r.tag, r.query.problems) end
		if r.delete then note_problems(r.tag .. " delete", r.delete.problems) end
	end
	local native_same = find_big("native", o.ref)
	local refs = {}
	for _, d in ipairs({ "sql", "internal" }) do
		local r = find_big(d, o.ref)
		if r and r.query and not r.query.failed then refs[#refs + 1] = r end
	end
	local qlist = build_queries(o.ref, {})
	local headers = { "query" }
	for _, r in ipairs(cols) do headers[#headers + 1] = r.tag end
	local can_ratio = native_same and native_same.query and not native_same.query.failed
	if can_ratio then
		for _, r in ipairs(refs) do headers[#headers + 1] = ("native vs %s (warm, @%d)"):format(r.driver, o.ref) end
	end
	rows = {}
	for _, qd in ipairs(qlist) do
		local row = { qd.label }
		for _, r in ipairs(cols) do
			local m = r.query.queries[qd.id]
			row[#row + 1] = m and (fms(m.cold) .. " / " .. fms(m.warm) .. (m.problem and " !" or "")) or "-"
		end
		if can_ratio then
			local nm = native_same.query.queries[qd.id]
			for _, r in ipairs(refs) do
				local m = r.query.queries[qd.id]
				row[#row + 1] = (m and nm) and ratio_text(m.warm, nm.warm) or "-"
			end
		end
		rows[#rows + 1] = row
	end
	local function extra_row(label, get)
		local row = { label }
		for _, r in ipairs(cols) do row[#row + 1] = get(r) or "-" end
		rows[#rows + 1] = row
		return row
	end
	local ar = extra_row("one more append into the big archive", function (r)
		return fms(r.query.append_cold) .. " / " .. fms(r.query.append_warm)
	end)
	if can_ratio then
		for _, r in ipairs(refs) do ar[#ar + 1] = ratio_text(r.query.append_warm, native_same.query.append_warm) end
	end
	local rr = extra_row("RSS after load -> peak (MB)", function (r)
		return fmb(r.query.rss_loaded) .. " -> " .. fmb(r.query.rss_peak)
	end)
	if can_ratio then
		for _, r in ipairs(refs) do rr[#rr + 1] = ratio_text(r.query.rss_peak, native_same.query.rss_peak, { "smaller", "larger" }) end
	end
	print_table(headers, rows)
	if has.sql then
		print("   sql answers unfiltered totals from its LRU count cache once a query has counted (its cold newest page paid the COUNT(*)),")
		print("   so its 'total only' row is a cache hit; native keeps a per-archive counter")
	end
	print()
	print("   CPU (os.clock, warm median, ms):")
	rows = {}
	for _, qd in ipairs(qlist) do
		local row = { qd.label }
		for _, r in ipairs(cols) do
			local m = r.query.queries[qd.id]
			row[#row + 1] = m and fms(m.warm_cpu) or "-"
		end
		if can_ratio then
			local nm = native_same.query.queries[qd.id]
			for _, r in ipairs(refs) do
				local m = r.query.queries[qd.id]
				row[#row + 1] = (m and nm) and ratio_text(m.warm_cpu, nm.warm_cpu) or "-"
			end
		end
		rows[#rows + 1] = row
	end
	print_table(headers, rows)

	-- targets at the native size
	local nb = find_big("native", o.native)
	if nb and nb.query and not nb.query.failed then
		print()
		print(("   issue targets at %d messages (native, warm median / cold):"):format(nb.n))
		for _, t in ipairs({ { "page", "newest page of 50 (+1, +total, stanzas built)", 1e-3 },
			{ "with_absent", "with matching nothing", 1e-3 }, { "ids", "ids", 1e-3 },
			{ "total", "total only", nil } }) do
			local m = nb.query.queries[t[1]]
			if m then
				print(("     %-46s %8s ms / %8s ms cold%s"):format(t[2], fms(m.warm), fms(m.cold),
					t[3] and ((m.warm <= t[3]) and "   (target <= 1 ms: met)" or "   (target <= 1 ms: NOT met)") or ""))
			end
		end
		local small = find_big("native", o.ref)
		if small and small ~= nb and small.query and not small.query.failed then
			local a, b = small.query.queries.total, nb.query.queries.total
			print(("     total at %d vs %d messages: %s vs %s ms warm (O(1) means no growth with size)"):format(
				small.n, nb.n, fms(a.warm), fms(b.warm)))
		end
	end

	-- expiry
	print()
	print("== 4. Expiry: delete the oldest half {[\"end\"] = T0 + N/2}, run inside a util.async runner with the real net.server loop ==")
	rows = {}
	for _, r in ipairs(big) do
		local d = r.delete
		if d and d.failed then
			rows[#rows + 1] = { r.tag, "FAILED", d.failed:match("[^\n]*") }
		elseif d then
			local s = d.delete
			rows[#rows + 1] = { r.tag, tostring(d.ret), fms(s.wall), fms(s.cpu), tostring(s.slices), fms(s.slice_max),
				fms(s.slice_cpu_max), fms(s.slice_sum), fms(s.loop_gap_max), fms(d.total_after_ms), fms(d.page_after_cold) .. " / " .. fms(d.page_after_warm),
				("%.1f -> %.1f"):format(r.disk / 1e6, r.disk_after / 1e6), fmb(d.rss_peak) }
		end
	end
	print_table({ "archive", "returned", "call ms", "cpu ms", "slices", "longest slice ms", "max slice main cpu ms", "busy ms",
		"max loop gap ms", "total after ms", "page after ms", "disk MB before -> after", "peak RSS MB" }, rows,
		{ nil, "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r" })
	print("   slices = resumes of the runner's coroutine (main-thread work between two yields); longest slice = the longest the")
	print("   server loop was blocked by the delete; max slice main cpu = the most CPU time the main thread spent in one slice")
	print("   (wall minus that is time the thread was not running: other processes on the machine, or waits); max loop gap =")
	print("   longest interval between 1 ms heartbeat timers")
	for _, r in ipairs(big) do
		local ec = r.delete and r.delete.engine_calls
		if ec then
			local parts = {}
			for _, m in ipairs({ "delete", "vacuum_step" }) do
				local e = ec[m]
				if e then
					parts[#parts + 1] = ("db:%s %d calls, longest %s ms, total %s ms"):format(m, e.calls, fms(e.max), fms(e.sum))
				end
			end
			print(("   %s engine calls inside the delete: %s%s"):format(r.tag, table.concat(parts, "; "),
				r.delete.wal_peak and ("; WAL peak %.1f MB"):format(r.delete.wal_peak / 1e6) or ""))
		end
	end
	for _, r in ipairs(big) do
		if r.delete and r.delete.driver_stats then
			print(("   %s driver-reported stats: %s"):format(r.tag, serialize(r.delete.driver_stats):gsub("%s+", " ")))
		end
	end
	if can_ratio then
		local nd = native_same.delete and native_same.delete.delete
		for _, r in ipairs(refs) do
			local d = r.delete and r.delete.delete
			if d and nd then
				print(("   vs %s @%d: longest blocking slice %s (%s vs %s ms); whole call %s"):format(r.driver, o.ref,
					ratio_text(d.slice_max, nd.slice_max, { "shorter", "longer" }),
					fms(d.slice_max), fms(nd.slice_max), ratio_text(d.wall, nd.wall)))
			end
		end
	end
	if nb and nb.delete and nb.delete.delete then
		local s = nb.delete.delete
		print(("   at %d messages: longest blocking slice %s ms (issue target <= 20 ms: %s); the most main-thread CPU any slice took: %s ms")
			:format(nb.n, fms(s.slice_max), s.slice_max <= 0.020 and "met" or "NOT met", fms(s.slice_cpu_max)))
	end

	-- disk
	print()
	print("== 5. Disk bytes per message (all files of the store after the filling process exited, / N) ==")
	rows = {}
	for _, r in ipairs(big) do
		if r.disk then
			rows[#rows + 1] = { r.tag, ("%.0f"):format(r.disk / r.n), ("%.1f"):format(r.disk / 1e6), r.disk_detail }
		end
	end
	print_table({ "archive", "B/msg", "MB", "files" }, rows, { nil, "r", "r" })

	-- notes
	print()
	local elapsed = os.time() - started
	for _, n in ipairs(notes) do print("note: " .. n) end
	if app.failed then problems[#problems + 1] = "append phase: " .. app.failed:match("[^\n]*") end
	if #problems > 0 then
		print("correctness problems seen while measuring (marked ! above):")
		for _, p in ipairs(problems) do print("  - " .. p) end
	end
	print(("total run time %d min %02d s; work dir %s%s"):format(elapsed // 60, elapsed % 60, o.dir, o.keep and " (kept)" or " (removed)"))
	if not o.keep then os.execute("rm -rf " .. shell_quote(o.dir)) end
end

if arg and arg[1] == "--child" then
	child_main(arg[2])
else
	parent_main(arg or {})
end
