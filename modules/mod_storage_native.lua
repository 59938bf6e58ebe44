-- mod_storage_native: Prosody archive storage (mod_mam, mod_muc_mam, mod_offline, pubsub
-- items, uploads) on SQLite through the prosody_native.archive engine.
-- keyval and map stores are delegated to another driver (storage_native_delegate).
-- luacheck: globals prosody

local st = require "util.stanza";
local async = require "util.async";
local storagemanager = require "core.storagemanager";
local resolve_relative_path = require "util.paths".resolve_relative_path;
local engine = module:require("prosody_native_loader").load("archive");

local host = module.host;
local store_host = host == "*" and "" or host;

-- Options: each is checked here, so a bad value stops the module with its name.
local options = module:require("prosody_native_options");
local option_error, number_option, choice_option = options.fail, options.number, options.choice;
local config = require "core.configmanager";

-- What the database connection does is shared by every host on the file, so these
-- come from the global section only. A host section that sets one to something else
-- stops the module there, naming the option, rather than be silently ignored.
local function connection_number(name, default, ...)
	local value = number_option(name, default, ...);
	local global = config.get("*", name);
	if global == nil then global = default; end
	if host ~= "*" and config.rawget(host, name) ~= nil and value ~= tonumber(global) then
		local msg = ("option '%s' applies to the database connection every host shares: set it in the global"
			.. " section, not under %q"):format(name, host);
		module:log_status("error", "%s", msg);
		error(msg, 0);
	end
	return value;
end

local db_path = module:get_option("storage_native_path", "prosody-native.sqlite");
if type(db_path) ~= "string" or db_path == "" then
	option_error("storage_native_path", db_path, "a file name");
end
db_path = resolve_relative_path(prosody.paths.data, db_path);
local durability = choice_option("storage_native_durability", "normal", { normal = true, full = true });
local busy_timeout = number_option("storage_native_busy_timeout", 5000, 0, 600000, true);
local slice = number_option("storage_native_delete_slice", 0.005, 0.001, 10);
local item_limit = number_option("storage_archive_item_limit", nil, 0, 2^53, true);
local delegate_name = module:get_option_string("storage_native_delegate", "internal");
if delegate_name == "native" then
	option_error("storage_native_delegate", delegate_name, "another storage driver (keyval and map stores)");
end
local connection_options = {
	sync_interval = connection_number("storage_native_sync_interval", 1, 0.001, 3600);
	-- group commit: up to this many appends share a transaction, each also written to
	-- the append log so that a kill loses none of them
	batch = connection_number("storage_native_commit_batch", 256, 1, 100000, true);
	batch_delay = connection_number("storage_native_commit_delay", 0.05, 0.001, 10);
};
if connection_options.batch == 1 then connection_options.batch = 0; end -- a batch of one is a plain commit

local function copy_into(to, from)
	for k, v in pairs(from) do to[k] = v; end
	return to;
end

-- SQLite itself waits only this long for another process's write lock; the rest of
-- storage_native_busy_timeout is waited for in write() below, without freezing Prosody.
local SHORT_BUSY_MS = 5;

-- One connection per database file for the whole server, shared by every host.
local connections = module:shared("/*/storage_native/connections");
-- what each connection was opened (or last configured) with; every host's timers read it
local connection_settings = module:shared("/*/storage_native/settings");
local db = connections[db_path];
if not db then
	local err;
	db, err = engine.open(db_path, copy_into({
		-- "full" is kept per host, by committing at once and waiting for a sync ticket
		-- after each write (durable() below): the fsync happens on the engine's thread,
		-- shared by concurrent writers.
		durability = "normal";
		-- loading the module may wait: there is nothing else to do meanwhile
		busy_timeout = busy_timeout;
		element_mt = st.stanza_mt;
	}, connection_options));
	if not db then
		local msg = ("cannot open the archive database %s"):format(err);
		module:log_status("error", "%s", msg);
		error(msg, 0);
	end
	db:busy_timeout(SHORT_BUSY_MS);
	connections[db_path] = db;
	connection_settings[db_path] = copy_into({}, connection_options);
	module:log("info", "Archive database %s (SQLite %s)", db_path, engine.sqlite_version());
end
-- Changed options reach the open connection when the module is loaded again.
local settings = connection_settings[db_path] or {};
connection_settings[db_path] = settings;
for k, v in pairs(connection_options) do
	if settings[k] ~= v then
		local ok, err = db:configure(connection_options);
		if ok then
			copy_into(settings, connection_options);
			module:log("info", "Archive database %s: sync interval %gs, commit batch %d, commit delay %gs", db_path,
				settings.sync_interval, math.max(settings.batch, 1), settings.batch_delay);
		else
			module:log("error", "Archive database %s keeps its earlier settings: %s", db_path, err);
		end
		break;
	end
end
module:log("debug", "Archive durability on %s: %s", host, durability);

-- Whether freed pages can go back to the file system, per database file: decided when
-- the file was created (a copy made with `sqlite3 .dump` is not in incremental mode),
-- and nothing but a full VACUUM changes it.
local CONVERT = "stop Prosody and run: sqlite3 %s 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;'";
local vacuum_state = module:shared("/*/storage_native/vacuum");
if vacuum_state[db_path] == nil then
	local stats = db:stats();
	if stats then
		vacuum_state[db_path] = stats.auto_vacuum == "incremental";
		if not vacuum_state[db_path] then
			module:log("warn", "Archive database %s is not in incremental auto-vacuum mode: space freed by deletes is"
				.. " reused but not returned to the file system. To convert it, " .. CONVERT, db_path, db_path);
		end
	end
end

-- durations and deadlines: a clock that never jumps
local clock = require "util.time".monotonic;

-- An open batch of appends is committed at the latest commit_delay after it began:
-- one timer per database file, whichever host's append opened the batch.
local timer = require "util.timer";
local flush_state = module:shared("/*/storage_native/flush");
flush_state[db_path] = flush_state[db_path] or { armed = false };
local flushing = flush_state[db_path];
local m_commit; -- set below, with the other metrics
local function flush_due()
	local t0 = clock();
	local ok, left, err = pcall(db.flush, db, settings.batch_delay);
	if not ok then left, err = nil, left; end -- raised (the database closed, say)
	if err == true then m_commit:sample(clock() - t0); end
	if left == nil then
		module:log("error", "Archive commit failed: %s", err);
		left = 0;
	end
	if left > 0 then return left; end
	flushing.armed = false;
end
local function batch_opened()
	if not flushing.armed then
		flushing.armed = true;
		timer.add_task(settings.batch_delay, flush_due);
	end
end
-- Nothing stays uncommitted across a shutdown.
local function flush_now()
	local ok, err = db:flush();
	if ok == nil then module:log("error", "Archive commit failed: %s", err); end
end
module:hook_global("server-stopping", flush_now);
-- No SQLite connection may cross a fork: prosody -D daemonizes on server-started (mod_posix,
-- priority 0), so the database is committed and closed just before, and opens again in the
-- daemon at its first use.
module:hook_global("server-started", function ()
	local ok, err = db:detach();
	if not ok then module:log("error", "Archive database could not be closed before daemonizing: %s", err); end
end, 1000);

local op_seconds = module:metric("histogram", "op_duration", "seconds",
	"Time spent in the archive engine per operation", { "op" },
	{ buckets = { 0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 1 } });
local m_append, m_find, m_delete = op_seconds:with_labels("append"), op_seconds:with_labels("find"), op_seconds:with_labels("delete");
m_commit = op_seconds:with_labels("commit");
local m_items = module:metric("gauge", "items", "", "Items in the archive database (all hosts)", {});
local m_bytes = module:metric("gauge", "database_size", "bytes", "Size of the archive database file", {});
local m_errors = module:metric("counter", "errors", "", "Engine operations that failed", { "op" });

-- Expected outcomes (item-not-found, quota-limit, a client's bad query value) pass
-- quietly; the rest is logged.
local quiet = { ["item-not-found"] = true; ["quota-limit"] = true; ["bad-request"] = true };
local function failed(op, err, code)
	m_errors:with_labels(op):add(1);
	if not quiet[code] then
		module:log("error", "Archive %s failed: %s", op, err);
	elseif code == "bad-request" then
		module:log("debug", "Archive %s refused: %s", op, err);
	end
	return nil, code or err;
end

-- Lets other work run between slices when called from an async context (stanza
-- handlers, module:daily jobs); elsewhere the slices simply run back to back.
local function yield_between_slices()
	if async.ready() then
		pcall(async.sleep, 0);
	end
end

-- Runs a write; while another process holds the write lock (code "busy"), retries for
-- up to storage_native_busy_timeout. From an async context (stanza handlers, cron jobs)
-- it sleeps between tries so the rest of the server goes on; elsewhere it lets SQLite
-- block for the remaining time, as there is nothing else to run. prosodyctl runs its
-- commands in an async runner, but with nothing to schedule a sleep: it blocks too.
local function write(method, ...)
	local ok, err, code = method(db, ...);
	if ok ~= nil or code ~= "busy" then return ok, err, code; end
	local deadline = clock() + busy_timeout / 1000;
	while true do
		local left = deadline - clock();
		if left <= 0 then return ok, err, code; end
		if not (async.ready() and pcall(async.sleep, math.min(0.02, left))) then
			db:busy_timeout(math.ceil(left * 1000));
			ok, err, code = method(db, ...);
			db:busy_timeout(SHORT_BUSY_MS);
			return ok, err, code;
		end
		ok, err, code = method(db, ...);
		if ok ~= nil or code ~= "busy" then return ok, err, code; end
	end
end

-- storage_native_durability = "full" (per host): a write returns once it is on disk.
-- The fsync runs on the engine's thread; an async caller sleeps meanwhile (one timer
-- polls for every waiter), anything else blocks until it is done.
local sync_waiters = {};
local function poll_syncs()
	local still = {};
	for _, waiter in ipairs(sync_waiters) do
		if db:synced(waiter.ticket) == false then
			still[#still+1] = waiter;
		else
			waiter.done();
		end
	end
	sync_waiters = still;
	if #still > 0 then return 0.001; end
end

local function durable()
	if durability ~= "full" then return true; end
	local ticket = db:sync_ticket();
	if not async.ready() then
		return db:wait_synced(ticket);
	end
	local wait, done = async.waiter();
	sync_waiters[#sync_waiters+1] = { ticket = ticket, done = done };
	if #sync_waiters == 1 then module:add_timer(0.001, poll_syncs); end
	wait();
	return db:synced(ticket);
end

local PAGE = 256; -- items the engine materialises per call when the caller wants many

local archive_store = {};
archive_store.__index = archive_store;
archive_store.caps = {
	total = true;
	quota = item_limit;
	truncate = true;
	full_id_range = true;
	ids = true;
	wildcard_delete = true;
};

function archive_store:append(username, key, value, when, with)
	local t0 = clock();
	-- a "full" host's append commits at once: in the open batch it would be
	-- acknowledged before it is even committed
	local ok, ret, err, code = pcall(write, db.append, store_host, self.store, username or "", key, value,
		when or os.time(), with or "", item_limit, durability == "full");
	m_append:sample(clock() - t0);
	if not ok then
		return failed("append", ret, "unsupported-datatype");
	elseif not ret then
		return failed("append", err, code);
	end
	if err then -- began a batch
		batch_opened();
		return ret;
	end
	local synced, serr, scode = durable();
	if not synced then return failed("append", serr, scode); end
	return ret;
end

-- The engine's view of a query: a fresh table (callers may reuse or mutate theirs).
local function engine_query(query, limit)
	local before, after = query.before, query.after;
	return {
		start = query.start; ["end"] = query["end"]; with = query.with; key = query.key;
		ids = query.ids; reverse = query.reverse; total = query.total;
		before = type(before) == "string" and before or nil;
		after = type(after) == "string" and after or nil;
		limit = limit;
	};
end

-- mod_mam and mod_muc_mam call find() unprotected: it must answer nil, err, never
-- raise (the engine refuses a bad query value with "bad-request"; it raises only for
-- what is no caller's fault, a corrupt value, say).
local function engine_find(user, store, q)
	local ok, rows, n, total, last = pcall(db.find, db, store_host, store, user, q);
	if not ok then return nil, rows; end
	return rows, n, total, last;
end

function archive_store:find(username, query)
	query = query or {};
	local user, store = username or "", self.store;
	local wanted = query.limit; -- nil: everything, in pages
	if type(wanted) == "string" then wanted = tonumber(wanted) or wanted; end -- as mod_storage_sql takes it
	-- the engine judges (and rounds down) the caller's limit; only a larger one is cut to a page
	local q = engine_query(query, type(wanted) == "number" and wanted > PAGE and PAGE or wanted or PAGE);
	local t0 = clock();
	local rows, n, total, last = engine_find(user, store, q);
	m_find:sample(clock() - t0);
	if not rows then return failed("find", n, total); end
	local given, i = 0, 0;
	local function next_page()
		if n < q.limit or (wanted and given >= wanted) then return false; end
		q.total, q.cursor = nil, last;
		q.limit = wanted and math.min(wanted - given, PAGE) or PAGE;
		local err;
		rows, n, err, last = engine_find(user, store, q);
		if not rows then
			failed("find", n, err);
			n = 0;
			return false;
		end
		i = 0;
		return n > 0;
	end
	return function ()
		if i >= n and not next_page() then return nil; end
		i = i + 1;
		given = given + 1;
		local b = 4 * (i - 1);
		return rows[b+1], rows[b+2], rows[b+3], rows[b+4];
	end, total;
end

function archive_store:get(username, key)
	local value, when, with = db:get(store_host, self.store, username or "", key);
	if value == nil then
		if with ~= "item-not-found" then return failed("get", when, with); end
		return nil, "item-not-found";
	end
	return value, when, with;
end

function archive_store:set(username, key, value, when, with)
	local ok, ret, err, code = pcall(write, db.set, store_host, self.store, username or "", key, value, when, with);
	if not ok then return failed("set", ret, "unsupported-datatype"); end
	if ret == nil then return failed("set", err, code); end
	local synced, serr, scode = durable();
	if not synced then return failed("set", serr, scode); end
	return ret;
end

-- Returns free pages to the file system in slices; stops as soon as a slice returns
-- none, whatever is left (another process may hold pages back).
local function reclaim_space()
	if vacuum_state[db_path] == false then return; end
	repeat
		local left, returned, code = db:vacuum_step(slice);
		if code == "not-incremental" then vacuum_state[db_path] = false; end
		local again = left and left > 0 and returned > 0;
		if again then yield_between_slices(); end
	until not again
end

-- Deletes in slices of at most storage_native_delete_slice seconds each, so a huge
-- expiry never stalls the server, then hands freed pages back to the file system.
function archive_store:delete(username, query)
	local user = username == true or username or "";
	local q = query and engine_query(query) or {};
	if query then q.truncate = query.truncate; end
	local deleted, resume = 0, nil;
	repeat
		local t0 = clock();
		local count, more, after = write(db.delete, store_host, self.store, user, q, slice, resume);
		m_delete:sample(clock() - t0);
		if not count then return failed("delete", more, after); end
		deleted = deleted + count;
		resume = after; -- user = true: the next slice goes on from the owner this one stopped at
		if more then yield_between_slices(); end
	until not more
	local synced, serr, scode = durable();
	if not synced then return failed("delete", serr, scode); end
	if deleted > 0 then reclaim_space(); end
	return deleted;
end

function archive_store:summary(username, query)
	local counts, earliest, latest = db:summary(store_host, self.store, username or "", query and engine_query(query));
	if not counts then return failed("summary", earliest, latest); end
	return { counts = counts; earliest = earliest; latest = latest };
end

function archive_store:users()
	local list, err, code = db:users(store_host, self.store);
	if not list then
		failed("users", err, code);
		list = {};
	end
	local i = 0;
	return function ()
		i = i + 1;
		return list[i];
	end;
end

function archive_store:dates(username)
	local list, err, code = db:dates(store_host, self.store, username or "");
	if not list then return failed("dates", err, code); end
	return list;
end

local driver = {};

local function delegate()
	local d, err = storagemanager.load_driver(host, delegate_name);
	if not d then
		module:log("error", "Cannot load storage_native_delegate %q: %s", delegate_name, tostring(err));
	end
	return d, err;
end

function driver:open(store, typ)
	if typ == "archive" then
		return setmetatable({ store = store }, archive_store);
	end
	local d, err = delegate();
	if not d then return nil, err; end
	return d:open(store, typ);
end

function driver:stores(username, typ)
	if typ ~= "archive" then
		local d = delegate();
		if d and d.stores then return d:stores(username, typ); end
		return nil, "unsupported";
	end
	local list = db:stores(store_host, username ~= true and username or nil) or {};
	local i = 0;
	return function () i = i + 1; return list[i]; end;
end

function driver:purge(username)
	local stores, err, code = db:stores(store_host, username);
	if not stores then return failed("purge", err, code); end
	for _, store in ipairs(stores) do
		local ok, perr = archive_store.delete({ store = store }, username);
		if not ok then return nil, perr; end
	end
	local d = delegate();
	if d and d.purge then return d:purge(username); end
	return true;
end

module:provides("storage", driver);

module:hook_global("stats-update", function ()
	local stats = db:stats();
	if stats then
		m_items:with_labels():set(stats.items or 0);
		m_bytes:with_labels():set((stats.pages or 0) * (stats.page_size or 0) + (stats.wal_bytes or 0));
	end
end);

-- prosodyctl mod_storage_native <command>
local commands = {};

function commands.check()
	local ok, problems = db:check();
	if ok == nil then print("check failed: " .. tostring(problems)); return 1; end
	if ok then print(("%s: ok"):format(db_path)); return 0; end
	for _, line in ipairs(problems) do print(line); end
	return 1;
end

function commands.backup(target)
	if not target then print("usage: prosodyctl mod_storage_native backup <file>"); return 2; end
	local ok, err = db:backup(target);
	if not ok then print("backup failed: " .. tostring(err)); return 1; end
	print(("%s -> %s: done"):format(db_path, target));
	return 0;
end

function commands.stats()
	local stats = assert(db:stats());
	for _, k in ipairs({ "path", "items", "owners", "pages", "free_pages", "page_size", "wal_bytes", "auto_vacuum" }) do
		print(("%-11s %s"):format(k, tostring(stats[k])));
	end
	return 0;
end

function commands.vacuum()
	local total = 0;
	while true do
		local left, returned, code = write(db.vacuum_step, 1);
		if not left then
			local err = returned;
			if code ~= "not-incremental" then
				print("vacuum failed: " .. tostring(err));
				return 1;
			end
			print(("%s: %s: its free pages are reused, but cannot be returned to the file system.")
				:format(db_path, err));
			print("To convert it, " .. CONVERT:format(db_path));
			return 1;
		end
		total = total + returned;
		-- a step that returns nothing would return nothing again
		if left == 0 or returned == 0 then
			print(("%s: %d free pages returned to the file system%s"):format(db_path, total,
				left > 0 and (", %d left"):format(left) or ""));
			return 0;
		end
	end
end

function commands.import(source, ...)
	-- through write(): a running Prosody holds the write lock for up to a commit delay
	local function append(...) return write(db.append, ...); end
	return module:require("storage_native_import").run(source, { ... }, db, append);
end

function module.command(arg)
	local name = table.remove(arg, 1);
	local command = commands[name];
	if not command then
		print("usage: prosodyctl mod_storage_native check | stats | vacuum | backup <file> | import <driver> [store ...]");
		return 2;
	end
	local status = command(table.unpack(arg));
	flush_now(); -- prosodyctl exits without closing the database
	return status;
end
