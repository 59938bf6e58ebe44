-- prosody_native.archive on its own: no Prosody, plain Lua values and a metatable
-- standing in for util.stanza's.

local archive = require "prosody_native.archive";

local element_mt = { __name = "element" };
local function el(name, attr, ...)
	local e = setmetatable({ name = name, attr = attr or {}, tags = {} }, element_mt);
	for i = 1, select("#", ...) do
		local child = select(i, ...);
		e[i] = child;
		if type(child) == "table" then e.tags[#e.tags+1] = child; end
	end
	return e;
end

local dir = os.tmpname();
os.remove(dir);
os.execute("mkdir -p " .. dir);
local n_db = 0;
local function fresh(options)
	n_db = n_db + 1;
	options = options or {};
	options.element_mt = element_mt;
	local path = ("%s/a%d.sqlite"):format(dir, n_db);
	return assert(archive.open(path, options)), path;
end

-- A database file nobody has open (so nobody holds its append log).
local function closed_fresh()
	local db, path = fresh();
	db:close();
	return path;
end

local function sqlite(path, sql)
	local p = assert(io.popen(("sqlite3 %q %q"):format(path, sql)));
	local out = p:read("*a");
	p:close();
	return out;
end

local function file_size(path)
	local f = io.open(path, "rb");
	if not f then return nil; end
	local n = f:seek("end");
	f:close();
	return n;
end

local function cpath()
	local root = os.getenv("PN_ROOT") or io.popen("pwd"):read("*l");
	return root .. "/" .. (os.getenv("PN_BUILD") or "build") .. "/?.so";
end

-- Runs a separate process that appends n items in one open batch (nothing commits:
-- batch and delay far above what it does), prints each returned key, then kills
-- itself with SIGKILL. Returns the keys it printed.
local function append_then_sigkill(path, n, batch, padding)
	local script = table.concat({
		"local archive = require 'prosody_native.archive'",
		("local db = assert(archive.open(%q, { batch = %d, batch_delay = 60 }))"):format(path, batch or 100000),
		("local padding = (' '):rep(%d)"):format(padding or 0),
		("for i = 1, %d do"):format(n),
		"  local key = assert(db:append('h', 's', 'u', nil, 'value ' .. i .. padding, i, 'w' .. i % 3))",
		"  io.stdout:write(key, string.char(10)) io.stdout:flush()",
		"end",
		"os.execute('kill -KILL ' .. io.open('/proc/self/stat'):read('n'))",
		"print('still alive')",
	}, "\n");
	local file = os.tmpname();
	local f = assert(io.open(file, "w"));
	f:write(script);
	f:close();
	local p = assert(io.popen(("exec env LUA_CPATH=%q lua5.4 %q"):format(cpath(), file)));
	local keys = {};
	for line in p:lines() do keys[#keys+1] = line; end
	p:close();
	os.remove(file);
	assert(keys[#keys] ~= "still alive");
	return keys;
end

-- Readers in another process, each holding a read transaction from "begin <name>" to
-- "end <name>" (python3's sqlite3 module: the same libsqlite3 as a backup script or the
-- sqlite3 shell). Each command returns once done, with the count of items its reader
-- sees: at "end" still what its snapshot held at "begin".
local function readers(path)
	local ack = os.tmpname();
	local script = table.concat({
		"import sqlite3, sys",
		"conns = {}",
		"while True:",
		"    line = sys.stdin.readline()",
		"    if not line: break",
		"    cmd, name = line.split()",
		"    if cmd == 'begin':",
		"        c = sqlite3.connect(sys.argv[1], isolation_level=None)",
		"        c.execute('BEGIN')",
		"        conns[name] = c",
		"    c = conns[name]",
		"    n = c.execute('SELECT count(*) FROM items').fetchone()[0]",
		"    if cmd == 'end':",
		"        c.execute('COMMIT')",
		"        c.close()",
		"    with open(sys.argv[2], 'a') as f: f.write('%s %s %d\\n' % (cmd, name, n))",
	}, "\n");
	local file = os.tmpname();
	local f = assert(io.open(file, "w"));
	f:write(script, "\n");
	f:close();
	local p = assert(io.popen(("exec /usr/bin/python3 %q %q %q"):format(file, path, ack), "w"));
	local done = 0;
	local function command(cmd, name)
		p:write(cmd, " ", name, "\n");
		p:flush();
		done = done + 1;
		for _ = 1, 3000 do -- a guard against a hang, not a time limit
			local answers = io.open(ack);
			local lines = {};
			if answers then
				for line in answers:lines() do lines[#lines+1] = line; end
				answers:close();
			end
			if #lines >= done then
				local n = lines[done]:match(" (%d+)$");
				return tonumber(n);
			end
			os.execute("sleep 0.01");
		end
		error("the reader did not answer");
	end
	return {
		begin = function (name) return command("begin", name); end;
		finish = function (name) return command("end", name); end;
		close = function () p:close(); os.remove(ack); os.remove(file); end;
	};
end

-- Frames in the WAL as a passive checkpoint of another connection sees them; nil when
-- it could not look (another checkpoint was running).
local function wal_frames(path)
	local busy, log = sqlite(path, "PRAGMA wal_checkpoint(PASSIVE);"):match("^(%d+)|(%-?%d+)|");
	if busy ~= "0" then return nil; end
	return tonumber(log);
end

local function all_keys(db)
	local rows, n = db:find("h", "s", "u", {});
	local keys = {};
	for i = 1, n do keys[i] = rows[4 * (i - 1) + 1]; end
	return keys;
end

describe("prosody_native.archive", function ()
	teardown(function () os.execute("rm -rf " .. dir); end);

	it("reports its interface version and SQLite's", function ()
		assert.equal(1, archive._ABI);
		assert.matches("^3%.%d+", archive.sqlite_version());
	end);

	describe("open", function ()
		it("refuses unknown durability modes and bad intervals", function ()
			assert.has_error(function () archive.open(dir .. "/x.sqlite", { durability = "fast" }); end,
				"durability must be \"full\" or \"normal\", not \"fast\"");
			assert.has_error(function () archive.open(dir .. "/x.sqlite", { sync_interval = 0 }); end);
			assert.has_error(function () archive.open(dir .. "/x.sqlite", { busy_timeout = "soon" }); end);
		end);

		it("fails with a message and a code for a file that is not a database", function ()
			local path = dir .. "/junk.sqlite";
			local f = assert(io.open(path, "w"));
			f:write(("junk"):rep(1000));
			f:close();
			local db, err, code = archive.open(path);
			assert.is_nil(db);
			assert.matches("junk.sqlite: file is not a database", err, 1, true);
			assert.equal("read", code);
		end);

		it("fails when the directory does not exist", function ()
			local db, err = archive.open(dir .. "/missing/dir/x.sqlite");
			assert.is_nil(db);
			assert.matches("missing/dir/x.sqlite", err, 1, true);
		end);

		it("refuses a database file it may not write, saying so", function ()
			-- root writes anything, so the check runs as nobody on a root-owned file
			local db, path = fresh();
			db:close();
			os.execute("chmod 755 " .. dir);
			local cpath = os.getenv("PN_ROOT") and (os.getenv("PN_ROOT") .. "/" .. (os.getenv("PN_BUILD") or "build") .. "/?.so")
				or (io.popen("pwd"):read("*l") .. "/" .. (os.getenv("PN_BUILD") or "build") .. "/?.so");
			local p = assert(io.popen(("runuser -u nobody -- env LUA_CPATH=%q lua5.4 -e %q 2>&1"):format(cpath,
				("print((select(2, require'prosody_native.archive'.open(%q))))"):format(path))));
			local out = p:read("*a");
			p:close();
			assert.equal(path .. ": the database file is read-only\n", out);
		end);

		it("closes once, by hand, by <close> or by the collector", function ()
			local db = fresh();
			db:close();
			db:close();
			assert.has_error(function () db:find("h", "s", "u"); end);
			assert.matches("closed", tostring(db));
			do
				local scoped <close> = fresh();
				assert(scoped:append("h", "s", "u", nil, "v", 1, ""));
			end
			fresh();
			collectgarbage();
			collectgarbage();
		end);
	end);

	describe("value codec", function ()
		local function roundtrip(v)
			return archive._decode(archive._encode(v, element_mt), element_mt);
		end

		it("round-trips Lua values", function ()
			for _, v in ipairs({ true, false, 0, -1, math.maxinteger, math.mininteger, 0.5, -1e300, 1/0, "", "x\0y",
				{}, { 1, 2, 3 }, { a = { b = { c = "d" } }, [1.5] = true, [false] = 0 } }) do
				assert.same(v, roundtrip(v));
				assert.equal(math.type(v), math.type(roundtrip(v)));
			end
			assert.is_true(roundtrip(0/0) ~= roundtrip(0/0));
		end);

		it("rebuilds elements with their metatable, children and tags", function ()
			local e = el("message", { to = "a@b", ["xml:lang"] = "en" },
				el("body", nil, "hello <&> ", "world"), "text", el("x", { xmlns = "urn:x" }));
			e.namespaces = { x = "urn:x" };
			local back = roundtrip(e);
			assert.equal(element_mt, getmetatable(back));
			assert.same(e, back);
			assert.equal(back[1], back.tags[1]);
			assert.equal(back[3], back.tags[2]);
			assert.equal(element_mt, getmetatable(back.tags[2]));
		end);

		it("refuses what it cannot store, naming it", function ()
			assert.has_error(function () archive._encode(print); end, "cannot archive value of type function");
			assert.has_error(function () archive._encode(el("a", { n = 1 }), element_mt); end,
				"cannot archive element: attribute is a number, not a string");
			assert.has_error(function () archive._encode(el("a", nil, 42), element_mt); end,
				"cannot archive element: child 1 is a number");
			local deep = {};
			for _ = 1, 100 do deep = { deep }; end
			assert.has_error(function () archive._encode(deep); end, "cannot archive value: nested deeper than 64 levels");
			local loop = {};
			loop.self = loop;
			assert.has_error(function () archive._encode(loop); end);
		end);

		it("rejects every truncation and many corruptions of an encoding cleanly", function ()
			local blob = archive._encode(el("message", { id = "1" }, el("body", nil, "hi"), { 1 } and "t"), element_mt);
			for len = 0, #blob - 1 do
				assert.has_error(function () archive._decode(blob:sub(1, len), element_mt); end,
					"archived value is corrupt or of an unknown format");
			end
			math.randomseed(42);
			for _ = 1, 5000 do
				local pos = math.random(#blob);
				local mutated = blob:sub(1, pos - 1) .. string.char(math.random(0, 255)) .. blob:sub(pos + 1);
				local ok, err = pcall(archive._decode, mutated, element_mt);
				assert(ok or err:match("corrupt"), err);
			end
		end);
	end);

	describe("archives", function ()
		it("pages with a cursor without holding anything open", function ()
			local db, path = fresh();
			for i = 1, 10 do assert(db:append("h", "s", "u", "k" .. i, "v" .. i, i, "")); end
			local rows, n, total, last = db:find("h", "s", "u", { limit = 4, total = true });
			assert.equal(4, n);
			assert.equal(10, total);
			assert.equal("k1", rows[1]);
			assert.equal("v4", rows[14]);
			rows, n = db:find("h", "s", "u", { limit = 4, cursor = last });
			assert.equal("k5", rows[1]);
			rows, n, total, last = db:find("h", "s", "u", { limit = 4, reverse = true });
			rows = db:find("h", "s", "u", { limit = 4, reverse = true, cursor = last });
			assert.equal("k6", rows[1]);
			-- no read transaction is left: a checkpoint can reset the whole WAL
			assert.matches("^0|", sqlite(path, "PRAGMA wal_checkpoint(TRUNCATE);"));
		end);

		it("copies committed appends into the database file in the background", function ()
			local db, path = fresh({ sync_interval = 0.05 });
			local function size(file)
				local f = assert(io.open(file, "rb"));
				local n = f:seek("end");
				f:close();
				return n;
			end
			local before = size(path);
			for i = 1, 200 do assert(db:append("h", "s", "u", nil, ("x"):rep(400), i, "")); end
			-- nothing else touches the file: only the checkpointer can make it grow
			local grown = false;
			for _ = 1, 100 do
				if size(path) > before + 200 * 400 then grown = true; break; end
				os.execute("sleep 0.05");
			end
			assert.is_true(grown);
		end);

		it("makes writes durable on request, one fsync for every ticket taken meanwhile", function ()
			local db = fresh({ sync_interval = 3600 }); -- no periodic checkpoint to help
			assert(db:append("h", "s", "u", nil, "v", 1, ""));
			local first = db:sync_ticket();
			local second = db:sync_ticket();
			assert.equal(first + 1, second);
			assert.is_true(db:wait_synced(second));
			assert.is_true(db:synced(first));
			assert.is_false(db:synced(second + 1));
		end);

		it("keeps the WAL bounded while appends never pause", function ()
			local db = fresh();
			local v = ("x"):rep(480);
			for i = 1, 20000 do assert(db:append("h", "s", "u", nil, v, i, "w" .. i % 20)); end
			assert.truthy(db:stats().wal_bytes < 64 * 1024 * 1024, db:stats().wal_bytes);
		end);

		it("refuses bad query values with nil, err, \"bad-request\" instead of raising", function ()
			-- they come from clients: RSM <max>-3</max> reaches find() as limit = -2
			local db = fresh();
			assert(db:append("h", "s", "u", "k1", "v", 1, ""));
			local many = {};
			for i = 1, 4097 do many[i] = "id" .. i; end
			local bad = {
				{ { limit = -2 }, "query field 'limit' must not be negative" };
				{ { limit = 0/0 }, "query field 'limit' must be a number" };
				{ { limit = "many" }, "query field 'limit' must be a number" };
				{ { start = "yesterday" }, "query field 'start' must be a number" };
				{ { ["end"] = 0/0 }, "query field 'end' must be a number" };
				{ { ids = { 1 } }, "query field 'ids' must hold strings" };
				{ { ids = "k1" }, "query field 'ids' must be an array of strings" };
				{ { ids = many }, "query field 'ids' has more than 4096 ids" };
				{ { with = {} }, "query field 'with' must be a string, not a table" };
				{ { truncate = 2.5 }, "query field 'truncate' must be a non-negative integer" };
				{ { cursor = -1 }, "query field 'cursor' must be a non-negative integer" };
			};
			for _, case in ipairs(bad) do
				for _, call in ipairs({
					function (q) return db:find("h", "s", "u", q); end,
					function (q) return db:summary("h", "s", "u", q); end,
					function (q) return db:delete("h", "s", "u", q); end,
					function (q) return db:delete("h", "s", true, q, 0.01); end,
				}) do
					assert.same({ nil, case[2], "bad-request" }, { call(case[1]) });
				end
			end
			assert.equal(1, select(3, db:find("h", "s", "u", { limit = 0, total = true })));
		end);

		it("takes a limit as a maximum: a fractional one means the integer below it", function ()
			local db = fresh();
			for i = 1, 5 do assert(db:append("h", "s", "u", "k" .. i, "v", i, "")); end
			local rows, n = db:find("h", "s", "u", { limit = 2.5 }); -- RSM <max>2.5</max>, MUC maxstanzas='2.5'
			assert.equal(2, n);
			assert.same({ "k1", "k2" }, { rows[1], rows[5] });
			rows, n = db:find("h", "s", "u", { limit = 0.5, reverse = true });
			assert.equal(0, n);
			rows, n = db:find("h", "s", "u", { limit = math.huge, reverse = true });
			assert.equal(5, n);
			assert.equal("k5", rows[1]);
		end);

		it("deletes within a time budget and says when there is more", function ()
			local db = fresh();
			for i = 1, 20000 do assert(db:append("h", "s", "u", nil, "v", i, "")); end
			local deleted, more = db:delete("h", "s", "u", {}, 0);
			assert.is_true(more);
			assert.truthy(deleted > 0 and deleted < 20000);
			local total = deleted;
			repeat
				deleted, more = db:delete("h", "s", "u", {}, 0.001);
				total = total + deleted;
			until not more
			assert.equal(20000, total);
			assert.is_true((db:check()));
			local free = db:vacuum_step(60);
			assert.equal(0, free);
		end);

		it("expires every owner of a store in slices that each go on where the last one stopped", function ()
			-- as mod_mam's daily delete(true, { ["end"] = ... }) on a host of 3,000 users: every
			-- owner keeps a newer item, so it stays listed once its expired ones are gone
			local db = fresh({ batch = 1000, batch_delay = 60 });
			for u = 1, 3000 do
				local user = ("u%04d"):format(u);
				for i = 1, 3 do assert(db:append("h", "s", user, nil, "old", i, "")); end
				assert(db:append("h", "s", user, nil, "new", 1000, ""));
			end
			assert(db:append("h", "other", "u0001", nil, "old", 1, "")); -- another store: untouched
			assert.equal(0, db:flush());
			local total, calls, resume = 0, 0, nil;
			repeat
				local n, more, after = db:delete("h", "s", true, { ["end"] = 10 }, 0.001, resume);
				assert(n > 0 or (after and (not resume or after > resume)),
					("slice %d deleted nothing and got no further (%d deleted so far)"):format(calls + 1, total));
				total, calls, resume = total + n, calls + 1, after;
			until not more or calls > 10000
			assert.equal(9000, total);
			assert.equal(3001, db:stats().items);
			assert.equal(3000, #db:users("h", "s"));
			assert.is_true((db:check()));
			-- without a budget, one call goes through every owner
			assert.same({ 3000, false }, { db:delete("h", "s", true, { ["end"] = 1000 }) });
			assert.equal(1, db:stats().items);
		end);

		it("refuses to vacuum, saying why, a file not in incremental auto-vacuum mode", function ()
			local path = closed_fresh();
			-- what a copy through `sqlite3 .dump | sqlite3` gives: PRAGMA auto_vacuum cannot
			-- change it once there are tables
			sqlite(path, "PRAGMA auto_vacuum = NONE; VACUUM;");
			local db = assert(archive.open(path));
			assert.equal("none", db:stats().auto_vacuum);
			for i = 1, 500 do assert(db:append("h", "s", "u", nil, ("x"):rep(1000), i, "")); end
			assert.equal(500, (db:delete("h", "s", "u")));
			local free = db:stats().free_pages;
			assert.truthy(free > 100, free);
			local left, err, code = db:vacuum_step(0.01);
			assert.is_nil(left);
			assert.equal("not-incremental", code);
			assert.equal("the database is not in incremental auto-vacuum mode (auto_vacuum = 0)", err);
			assert.equal(free, db:stats().free_pages);
			assert(db:detach());
			assert.equal("none", db:stats().auto_vacuum); -- opened again: still known
			db:close();
		end);

		it("returns free pages to the file system, saying how many", function ()
			local db = fresh();
			assert.equal("incremental", db:stats().auto_vacuum);
			for i = 1, 500 do assert(db:append("h", "s", "u", nil, ("x"):rep(1000), i, "")); end
			assert.equal(500, (db:delete("h", "s", "u")));
			local free = db:stats().free_pages;
			assert.truthy(free > 100, free);
			assert.same({ 0, free }, { db:vacuum_step(60) });
			assert.same({ 0, 0 }, { db:vacuum_step(60) });
		end);

		it("finds counters that disagree with the items", function ()
			local db, path = fresh();
			assert(db:append("h", "s", "u", nil, "v", 1, ""));
			sqlite(path, "UPDATE owners SET items = 5;");
			local ok, problems = db:check();
			assert.is_false(ok);
			assert.matches("counter of h/s/u says 5 items, it has 1", problems[1], 1, true);
		end);

		it("keeps appending while another process holds a read open", function ()
			local db, path = fresh({ busy_timeout = 0 });
			assert(db:append("h", "s", "u", nil, "v", 1, ""));
			local reader = assert(io.popen(("/usr/bin/python3 -c %q"):format(table.concat({
				"import sqlite3, sys, time",
				("c = sqlite3.connect(%q, isolation_level=None)"):format(path),
				"c.execute('BEGIN')",
				"c.execute('SELECT count(*) FROM items').fetchone()",
				"print('reading', flush=True)",
				"time.sleep(1.5)",
				"print(c.execute('SELECT count(*) FROM items').fetchone()[0], flush=True)",
			}, "; "))));
			assert.equal("reading", reader:read("*l"));
			for i = 1, 200 do assert(db:append("h", "s", "u", nil, "v", i, "")); end
			assert.equal("1", reader:read("*l")); -- its snapshot, while we went on
			reader:close();
			local _, _, total = db:find("h", "s", "u", { limit = 0, total = true });
			assert.equal(201, total);
		end);

		it("never makes an append wait for a reader holding an old snapshot, and starts the WAL over once it is done", function ()
			-- a backup (VACUUM INTO), a sqlite3 shell in a transaction, Litestream: a
			-- restarting checkpoint used to wait for them holding the write lock, and
			-- appends failed behind it. Opened as the driver opens it, but a busy timeout
			-- far beyond what a restart may take without readers.
			local db, path = fresh({ batch = 256, batch_delay = 0.05, sync_interval = 0.05, busy_timeout = 500 });
			assert(db:append("h", "s", "u", nil, "first", 0, ""));
			assert.equal(0, db:flush());
			local r = readers(path);
			assert.equal(1, r.begin("old"));
			-- well past the length where the WAL is to be started over (4,096 frames)
			local value, n = ("x"):rep(2000), 0;
			local page = db:stats().page_size;
			repeat
				for _ = 1, 100 do
					n = n + 1;
					assert(db:append("h", "s", "u", nil, value, n, ""));
				end
				assert.equal(0, db:flush());
				-- now and then what storage_native_durability = "full" waits for; else a
				-- pause, as between the messages of a real server
				if n % 1000 == 0 then
					assert.is_true(db:wait_synced(db:sync_ticket()));
				else
					os.execute("sleep 0.01");
				end
			until db:stats().wal_bytes > 6000 * (page + 24) or n >= 30000
			-- a reader whose snapshot is the newest: every frame can be copied back, but
			-- the WAL not started over while it reads
			assert.equal(n + 1, r.begin("new"));
			assert.equal(1, r.finish("old"));
			for _ = 1, 40 do
				n = n + 1;
				assert(db:append("h", "s", "u", nil, value, n, ""));
				os.execute("sleep 0.02");
			end
			assert.equal(0, db:flush());
			assert.is_true(db:wait_synced(db:sync_ticket()));
			assert.equal(n - 39, r.finish("new"));
			r.close();
			-- no reader left: a later checkpoint starts the WAL over
			local restarted = false;
			for _ = 1, 300 do -- a guard against a hang, not a time limit
				for _ = 1, 10 do
					n = n + 1;
					assert(db:append("h", "s", "u", nil, value, n, ""));
				end
				assert.equal(0, db:flush());
				os.execute("sleep 0.05");
				local frames = wal_frames(path);
				if frames and frames < 4096 then restarted = true; break; end
			end
			assert.is_true(restarted);
			local _, _, total = db:find("h", "s", "u", { limit = 0, total = true });
			assert.equal(n + 1, total);
			assert.is_true((db:check()));
		end);

		it("opens without the write lock, which another connection may hold for long", function ()
			-- a running Prosody holds it for a batch (prosodyctl opens meanwhile), a script
			-- or the sqlite3 shell for as long as it likes (Prosody starts meanwhile)
			local first, path = fresh({ batch = 256, batch_delay = 60 });
			assert(first:append("h", "s", "u", "k1", "v", 1, ""));
			local second = assert(archive.open(path, { busy_timeout = 0 }));
			assert.is_true((second:check()));
			assert(second:stats());
			second:close();
			assert.equal(0, first:flush());
			first:close();
			local shell = assert(io.popen(("sqlite3 %q > /dev/null"):format(path), "w"));
			shell:write("BEGIN IMMEDIATE;\n.shell touch " .. path .. ".locked\n");
			shell:flush();
			for _ = 1, 500 do
				if io.open(path .. ".locked") then break; end
				os.execute("sleep 0.02");
			end
			local db = assert(archive.open(path, { busy_timeout = 0 }));
			assert.same({ "k1" }, all_keys(db));
			local ok, _, code = db:append("h", "s", "u", "k2", "v", 2, "");
			assert.same({ nil, "busy" }, { ok, code });
			shell:write("ROLLBACK;\n");
			shell:close();
			os.remove(path .. ".locked");
			assert(db:append("h", "s", "u", "k2", "v", 2, ""));
			assert.equal(0, db:flush());
			assert.same({ "k1", "k2" }, all_keys(db));
			db:close();
		end);

		it("reports another process's write lock as \"busy\" after its busy timeout", function ()
			local db, path = fresh({ busy_timeout = 0 });
			local writer = assert(io.popen(("/usr/bin/python3 -c %q"):format(table.concat({
				"import sqlite3, time",
				("c = sqlite3.connect(%q, isolation_level=None)"):format(path),
				"c.execute('BEGIN IMMEDIATE')",
				"print('locked', flush=True)",
				"time.sleep(1)",
			}, "; "))));
			assert.equal("locked", writer:read("*l"));
			local ok, err, code = db:append("h", "s", "u", nil, "v", 1, "");
			assert.is_nil(ok);
			assert.equal("database is locked", err);
			assert.equal("busy", code);
			db:busy_timeout(10000);
			assert(db:append("h", "s", "u", nil, "v", 1, "")); -- waits for the lock to go
			writer:close();
			assert.has_error(function () db:busy_timeout(-1); end);
		end);

		describe("group commit (batch > 0)", function ()
			it("shows appends of the open batch to every read at once, quota included", function ()
				local db, path = fresh({ batch = 1000, batch_delay = 60 });
				assert.is_true(db:stats().batching);
				local key, opened = db:append("h", "s", "u", "k1", "one", 1, "a");
				assert.equal("k1", key);
				assert.is_true(opened);
				local _, again = assert(db:append("h", "s", "u", "k2", "two", 2, "b"));
				assert.is_false(again);
				assert(db:append("h", "s", "u", "k1", "one again", 3, "a")); -- replaced, moves to the end
				assert.equal(2, db:stats().pending + 0 - 1); -- three appends, the batch holds them all
				local rows, n, total = db:find("h", "s", "u", { total = true });
				assert.equal(2, n);
				assert.equal(2, total);
				assert.same({ "k2", "k1" }, { rows[1], rows[5] });
				assert.equal("one again", (db:get("h", "s", "u", "k1")));
				local ok, _, code = db:append("h", "s", "u", nil, "three", 4, "", 2);
				assert.is_nil(ok);
				assert.equal("quota-limit", code);
				assert.same({ a = 1, b = 1 }, (db:summary("h", "s", "u")));
				-- nothing committed yet: another connection sees none of it
				assert.equal("0\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.equal(0, db:flush());
				assert.equal("2\n", sqlite(path, "SELECT count(*) FROM items;"));
			end);

			it("commits when the batch is full, and on request once old enough", function ()
				local db, path = fresh({ batch = 10, batch_delay = 60 });
				for i = 1, 25 do assert(db:append("h", "s", "u", nil, "v", i, "")); end
				assert.equal("20\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.equal(5, db:stats().pending);
				local left, committed = db:flush(30);
				assert.truthy(left > 29 and left <= 30, left);
				assert.is_false(committed);
				left, committed = db:flush(0);
				assert.equal(0, left);
				assert.is_true(committed);
				assert.equal("25\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.same({ 0, false }, { db:flush() });
			end);

			it("brings back every returned append of a process killed in the middle of a batch", function ()
				local path = closed_fresh();
				local keys = append_then_sigkill(path, 50);
				assert.equal(50, #keys);
				-- the kill came with all 50 uncommitted: only the append log has them
				assert.equal("0\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.truthy(file_size(path .. "-appendlog") > 50 * 40);
				local db = assert(archive.open(path));
				assert.same(keys, all_keys(db));
				local _, _, total = db:find("h", "s", "u", { limit = 0, total = true });
				assert.equal(50, total);
				assert.same({ w0 = 16, w1 = 17, w2 = 17 }, (db:summary("h", "s", "u")));
				assert.is_true((db:check()));
				assert.equal(0, file_size(path .. "-appendlog"));
			end);

			it("takes turns between two logs, so a log is reused only once its commits are on disk", function ()
				local path = closed_fresh();
				-- 700 appends of ~3 KB in batches of 50: the first log passes 1 MB and the second
				-- takes over, then the first again; the kill comes in the middle of a batch
				local keys = append_then_sigkill(path, 725, 50, 3000);
				assert.equal(725, #keys);
				assert.equal("700\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.truthy(file_size(path .. "-appendlog") > 0);
				assert.truthy(file_size(path .. "-appendlog2") > 1024 * 1024);
				local db = assert(archive.open(path));
				assert.same(keys, all_keys(db));
				assert.is_true((db:check()));
				assert.equal(0, file_size(path .. "-appendlog2"));
			end);

			-- A script run as prosody -D runs: util.pposix.daemonize() forks, the parent exits (as
			-- mod_posix makes it) and the daemon goes on; the daemon writes `result` when done.
			local function run_daemonizing(path, result, daemon_lines, before_fork)
				local file = os.tmpname();
				local f = assert(io.open(file, "w"));
				f:write(table.concat({
					"local archive = require 'prosody_native.archive'",
					("local db = assert(archive.open(%q, { batch = 1000, batch_delay = 60 }))"):format(path),
					"for i = 1, 10 do io.stdout:write(assert(db:append('h', 's', 'u', nil, 'parent', i, '')), string.char(10)) end",
					"io.stdout:flush()",
					before_fork,
					"local _, pid = assert(require 'util.pposix'.daemonize())",
					"if pid and pid > 0 then os.exit(0) end",
					"local ok, err = pcall(function ()",
					table.concat(daemon_lines, "\n"),
					"end)",
					("local out = assert(io.open(%q .. '.tmp', 'w'))"):format(result),
					"out:write(tostring(err)) out:close()",
					("os.rename(%q .. '.tmp', %q)"):format(result, result),
				}, "\n"));
				f:close();
				local p = assert(io.popen(("exec env LUA_CPATH=%q lua5.4 %q"):format(cpath() .. ";/usr/lib/prosody/?.so", file)));
				local keys = {};
				for line in p:lines() do keys[#keys+1] = line; end
				p:close();
				local got;
				for _ = 1, 600 do
					local rf = io.open(result);
					if rf then got = rf:read("a"); rf:close(); break; end
					os.execute("sleep 0.05");
				end
				os.remove(file);
				return keys, got;
			end

			it("closes before a fork and opens again in the daemon, which loses nothing to another process", function ()
				local path = closed_fresh();
				local result = dir .. "/forked.result";
				-- the daemon appends, another process opens the database (as `prosodyctl
				-- mod_storage_native stats` does) and closes it, the daemon appends more
				local other = ("LUA_CPATH=%q lua5.4 -e %q"):format(cpath(),
					("local db = assert(require 'prosody_native.archive'.open(%q)); assert(db:stats()); db:close()"):format(path));
				local keys, got = run_daemonizing(path, result, {
					"  for i = 11, 13 do assert(db:append('h', 's', 'u', 'child' .. i, 'child', i, '')) end",
					"  assert(db:flush())", -- (a server commits within storage_native_commit_delay)
					("  assert(os.execute(%q))"):format(other),
					"  for i = 14, 2000 do assert(db:append('h', 's', 'u', 'child' .. i, 'child', i, '')) end",
					"  local _, _, total = assert(db:find('h', 's', 'u', { limit = 0, total = true }))",
					"  db:close()",
					"  return total",
				}, "assert(db:detach())");
				assert.equal(10, #keys);
				assert.equal("2000", got);
				assert.equal("2000\n", sqlite(path, "SELECT count(*) FROM items;"));
				local db = assert(archive.open(path));
				local rows, n = assert(db:find("h", "s", "u", { limit = 12 }));
				assert.equal(12, n);
				for i = 1, 10 do assert.equal(keys[i], rows[4 * i - 3]); end
				assert.equal("child11", rows[4 * 11 - 3]);
				assert.is_true((db:check()));
				db:close();
			end);

			it("opens again after detach while another process holds the write lock", function ()
				local path = closed_fresh();
				local db = assert(archive.open(path, { batch = 256, batch_delay = 0.05, busy_timeout = 5 }));
				assert(db:append("h", "s", "u", "k1", "x", 1, ""));
				assert.is_true(db:detach());
				assert.is_true(db:detach()); -- twice is fine
				-- the sqlite3 shell holds the write lock for a second
				local shell = assert(io.popen(("sqlite3 %q > /dev/null"):format(path), "w"));
				shell:write("BEGIN IMMEDIATE;\n.shell touch " .. path .. ".locked; sleep 1\nROLLBACK;\n");
				shell:flush();
				for _ = 1, 100 do
					if io.open(path .. ".locked") then break; end
					os.execute("sleep 0.02");
				end
				-- reopening needs no write lock; the append itself waits its turn ("busy")
				local ok, err, code = db:append("h", "s", "u", "k2", "x", 2, "");
				assert.same({ nil, "busy" }, { ok, code }, err);
				shell:close();
				os.remove(path .. ".locked");
				assert.equal("k2", (db:append("h", "s", "u", "k2", "x", 2, "")));
				assert(db:flush());
				assert.equal("2\n", sqlite(path, "SELECT count(*) FROM items;"));
				db:close();
			end);

			it("refuses to use a connection that was open when the process forked", function ()
				local path = closed_fresh();
				local result = dir .. "/forked-open.result";
				local keys, got = run_daemonizing(path, result, {
					"  assert(db:append('h', 's', 'u', 'child', 'child', 11, ''))",
				}, "assert(db:flush())");
				assert.equal(10, #keys);
				assert.truthy(got and got:find("was open when the process forked", 1, true), got);
				-- the parent's ten appends were committed before the fork
				assert.equal("10\n", sqlite(path, "SELECT count(*) FROM items;"));
			end);

			it("keeps the log when its replay fails, and replays it at the next open", function ()
				local path = closed_fresh();
				local keys = append_then_sigkill(path, 10);
				sqlite(path, "CREATE TRIGGER no_insert BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'no inserts today'); END;");
				local db, err, code = archive.open(path);
				assert.is_nil(db);
				assert.equal("append-log", code);
				assert.matches("cannot replay the append log: no inserts today", err, 1, true);
				collectgarbage();
				assert.truthy(file_size(path .. "-appendlog") > 0);
				sqlite(path, "DROP TRIGGER no_insert;");
				db = assert(archive.open(path));
				assert.same(keys, all_keys(db));
			end);

			it("ignores a torn or foreign tail of the append log", function ()
				local path = closed_fresh();
				local keys = append_then_sigkill(path, 20);
				os.execute(("truncate -s -7 %q"):format(path .. "-appendlog"));
				local f = assert(io.open(path .. "-appendlog", "ab"));
				f:write("PNL1 and then some garbage that is no record");
				f:close();
				local db = assert(archive.open(path));
				table.remove(keys);
				assert.same(keys, all_keys(db));
				assert.is_true((db:check()));
			end);

			it("never applies a record twice", function ()
				local path = closed_fresh();
				local keys = append_then_sigkill(path, 30);
				local log = path .. "-appendlog";
				os.execute(("cp %q %q.saved"):format(log, log));
				local db = assert(archive.open(path));
				assert.equal(30, #all_keys(db));
				db:close();
				-- as if the process had died after the commit, before emptying its log
				os.execute(("cp %q.saved %q"):format(log, log));
				db = assert(archive.open(path, { batch = 100 }));
				assert.same(keys, all_keys(db));
				-- and later records (higher lsns) of a second run still count
				local more = append_then_sigkill(path, 0);
				assert.same({}, more);
				db:close();
				local later = append_then_sigkill(path, 5);
				db = assert(archive.open(path));
				for _, k in ipairs(later) do keys[#keys+1] = k; end
				assert.same(keys, all_keys(db));
				assert.is_true((db:check()));
			end);

			it("lets a second process commit each append while the first holds the log", function ()
				local first, path = fresh({ batch = 100, batch_delay = 60 });
				local second = assert(archive.open(path, { batch = 100, busy_timeout = 0 }));
				assert.is_true(first:stats().batching);
				assert.is_false(second:stats().batching);
				assert(second:append("h", "s", "u", "from-second", "v", 1, ""));
				assert.equal("1\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert(first:append("h", "s", "u", "from-first", "v", 2, ""));
				assert.equal("1\n", sqlite(path, "SELECT count(*) FROM items;"));
				-- the open batch holds the write lock: the second waits for the commit
				local ok, _, code = second:append("h", "s", "u", nil, "v", 3, "");
				assert.is_nil(ok);
				assert.equal("busy", code);
				assert.equal(0, first:flush());
				assert(second:append("h", "s", "u", "late", "v", 3, ""));
				assert.same({ "from-second", "from-first", "late" }, all_keys(first));
				second:close();
				first:close();
			end);

			for _, how in ipairs({ "ABORT", "ROLLBACK" }) do
				it("replays the batch when a failing statement rolls it back (RAISE(" .. how .. "))", function ()
					local db, path = fresh();
					db:close();
					sqlite(path, ("CREATE TRIGGER boom BEFORE INSERT ON items WHEN NEW.key = 'boom'"
						.. " BEGIN SELECT RAISE(%s, 'refused'); END;"):format(how));
					db = assert(archive.open(path, { batch = 100, batch_delay = 60, element_mt = element_mt }));
					assert(db:append("h", "s", "u", "k1", "v1", 1, ""));
					assert(db:append("h", "s", "u", "k2", "v2", 2, ""));
					local ok, err = db:append("h", "s", "u", "boom", "v", 3, "");
					assert.is_nil(ok);
					assert.matches("refused", err);
					assert.same({ "k1", "k2" }, all_keys(db));
					assert(db:append("h", "s", "u", "k3", "v3", 4, ""));
					assert.equal(0, db:flush());
					assert.equal("3\n", sqlite(path, "SELECT count(*) FROM items;"));
					assert.is_true((db:check()));
				end);
			end

			it("commits an append asked to commit at once, with the batch open before it", function ()
				-- storage_native_durability = "full" on one host, "normal" on another
				local db, path = fresh({ batch = 100, batch_delay = 60 });
				assert(db:append("h", "s", "u", "k1", "v", 1, ""));
				assert.equal("0\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.same({ "k2", false }, { db:append("h", "s", "u", "k2", "v", 2, "", nil, true) });
				assert.equal("2\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.equal(0, db:stats().pending);
				assert.same({ "k3", true }, { db:append("h", "s", "u", "k3", "v", 3, "") });
				assert.equal("2\n", sqlite(path, "SELECT count(*) FROM items;"));
				db:close();
				assert.equal("3\n", sqlite(path, "SELECT count(*) FROM items;"));
			end);

			it("takes a new batch size, batch delay and sync interval while open", function ()
				local db, path = fresh({ batch = 100, batch_delay = 60, sync_interval = 3600 });
				assert(db:append("h", "s", "u", "k1", "v", 1, ""));
				assert.equal("0\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.is_true(db:configure({ batch = 0 })); -- the open batch may not stay
				assert.equal("1\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.is_false(db:stats().batching);
				assert(db:append("h", "s", "u", "k2", "v", 2, ""));
				assert.equal("2\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.is_true(db:configure({ batch = 10, batch_delay = 0.001 }));
				assert.same({ "k3", true }, { db:append("h", "s", "u", "k3", "v", 3, "") });
				os.execute("sleep 0.01");
				-- older than the delay: committed before the next one opens a batch
				assert.same({ "k4", true }, { db:append("h", "s", "u", "k4", "v", 4, "") });
				assert.equal("3\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.equal(0, db:flush());
				-- the background checkpoint, due in an hour, now comes at once
				local before = file_size(path);
				for i = 5, 200 do assert(db:append("h", "s", "u", nil, ("x"):rep(400), i, "")); end
				assert.equal(0, db:flush());
				assert.is_true(db:configure({ sync_interval = 0.05 }));
				local grown = false;
				for _ = 1, 200 do -- a guard against a hang, not a time limit
					if file_size(path) > before + 190 * 400 then grown = true; break; end
					os.execute("sleep 0.05");
				end
				assert.is_true(grown);
				assert.has_error(function () db:configure({ batch = -1 }); end);
				assert.has_error(function () db:configure({ sync_interval = 0 }); end);
				assert.has_error(function () db:configure({ batch_delay = "later" }); end);
				db:close();
			end);

			it("commits the open batch before deletes, backups and checks, and at close", function ()
				local db, path = fresh({ batch = 100, batch_delay = 60 });
				for i = 1, 5 do assert(db:append("h", "s", "u", "k" .. i, "v", i, "")); end
				assert.equal(1, (db:delete("h", "s", "u", { key = "k1" })));
				assert.equal("4\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert(db:append("h", "s", "u", "k6", "v", 6, ""));
				assert(db:backup(dir .. "/batch-backup.sqlite"));
				assert.equal("5\n", sqlite(dir .. "/batch-backup.sqlite", "SELECT count(*) FROM items;"));
				assert(db:append("h", "s", "u", "k7", "v", 7, ""));
				db:close();
				assert.equal("6\n", sqlite(path, "SELECT count(*) FROM items;"));
				assert.equal(0, file_size(path .. "-appendlog"));
			end);
		end);

		it("takes an online backup that opens as an archive", function ()
			local db = fresh();
			for i = 1, 50 do assert(db:append("h", "s", "u", "k" .. i, el("m", { n = tostring(i) }), i, "w")); end
			local copy = dir .. "/backup.sqlite";
			assert(db:backup(copy));
			assert(db:append("h", "s", "u", nil, "after", 51, ""));
			local restored = assert(archive.open(copy, { element_mt = element_mt }));
			local rows, n = restored:find("h", "s", "u", { reverse = true, limit = 1 });
			assert.equal(1, n);
			assert.equal("k50", rows[1]);
			assert.equal("50", rows[2].attr.n);
			assert.is_true((restored:check()));
			local ok, err = db:backup(copy);
			assert.is_nil(ok);
			assert.truthy(err);
		end);
	end);
end);
