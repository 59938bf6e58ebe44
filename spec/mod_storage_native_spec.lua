-- mod_storage_native through Prosody's real storagemanager and modulemanager.
-- Most archive cases run against mod_storage_sql on SQLite as well and must give the
-- same answers: it is the reference implementation of the archive contract.

local env = require "spec.helpers.prosody_env";
local st = require "util.stanza";

local NATIVE, SQL = "native.test", "sql.test";

local function msg(n, body)
	return st.message({ to = "juliet@example.com", from = "romeo@example.net/orchard", type = "chat", id = "m" .. n })
		:text_tag("body", body or ("message " .. n))
		:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = "o" .. n }):up();
end

-- Collects a find() into { {key, value, when, with}, ..., total = total }.
local function collect(store, user, query)
	local iter, total = store:find(user, query);
	if not iter then return nil, total; end
	local out = { total = total };
	for key, value, when, with in iter do
		out[#out+1] = { key = key, value = value, when = when, with = with };
	end
	return out;
end

-- The keys of a result, renamed to the fixture's names (k1..kN) so results of two
-- drivers with different generated keys compare. The total only counts when asked
-- for: mod_storage_sql also returns one from its cache when not.
local function names(result, fixture, query)
	if not result then return result; end
	local by_key = {};
	for name, key in pairs(fixture) do by_key[key] = name; end
	local out = {};
	for i, item in ipairs(result) do out[i] = by_key[item.key] or item.key; end
	if query and query.total then out.total = result.total; end
	return out;
end

-- Runs f(...), failing instead of hanging when it is still running after `seconds`.
local function within(seconds, f, ...)
	local now = require "util.time".monotonic;
	local deadline = now() + seconds;
	debug.sethook(function ()
		if now() > deadline then
			debug.sethook();
			error(("still running after %g s"):format(seconds));
		end
	end, "", 10000);
	local ret = table.pack(pcall(f, ...));
	debug.sethook();
	assert(ret[1], ret[2]);
	return table.unpack(ret, 2, ret.n);
end

-- Stanzas compare by structure: attribute order in tostring() is table order.
local function same_stanza(expected, got)
	assert.same(st.preserialize(expected), st.preserialize(got));
end

describe("mod_storage_native", function ()
	local stores = {};
	setup(function ()
		assert(env.activate(NATIVE, { storage = "native"; storage_native_delete_slice = 0.001 }, "native"));
		assert(env.activate(SQL, { storage = "sql"; sql = { driver = "SQLite3", database = "reference.sqlite" } }, "sql"));
	end);
	teardown(env.cleanup);

	local function both(store_name)
		return {
			native = assert(env.sm.open(NATIVE, store_name, "archive"));
			sql = assert(env.sm.open(SQL, store_name, "archive"));
		};
	end

	-- Fills both drivers with keys k1..k6, when 100..105 out of order, with A/B alternating.
	local function fixture(store_name, user)
		local s = both(store_name);
		local keys = { native = {}, sql = {} };
		local whens = { 103, 100, 105, 101, 104, 102 };
		for driver, store in pairs(s) do
			for i = 1, 6 do
				local key = assert(store:append(user, "k" .. i, msg(i), whens[i], i % 2 == 1 and "a@x" or "b@x"));
				assert.equal("k" .. i, key);
				keys[driver]["k" .. i] = key;
			end
		end
		return s, keys;
	end

	describe("archive stores, compared with mod_storage_sql", function ()
		local s, keys;
		setup(function () s, keys = fixture("compare", "user"); end);

		local cases = {
			{ "everything", nil };
			{ "with", { with = "a@x" } };
			{ "start", { start = 103 } };
			{ "end", { ["end"] = 101 } };
			{ "start and end", { start = 101, ["end"] = 103 } };
			{ "fractional bounds", { start = 100.5, ["end"] = 103.5 } };
			{ "after", { after = "k2" } };
			{ "before", { before = "k5" } };
			{ "after and before", { after = "k1", before = "k6" } };
			{ "after an item the filter excludes", { after = "k2", with = "a@x" } };
			{ "reverse and limit", { reverse = true, limit = 2 } };
			{ "range, reverse, limit and total", { after = "k1", before = "k6", reverse = true, limit = 2, total = true } };
			{ "ids in archive order", { ids = { "k5", "nope", "k2" } } };
			{ "ids reversed", { ids = { "k1", "k4", "k3" }, reverse = true } };
			{ "key", { key = "k3" } };
			{ "with and total", { with = "b@x", total = true, limit = 1 } };
			{ "count only", { limit = 0, total = true } };
			{ "unknown after", { after = "nope" } };
			{ "unknown before, reverse", { before = "nope", reverse = true } };
			{ "with nobody", { with = "nobody@x", total = true } };
		};
		for _, case in ipairs(cases) do
			it("finds " .. case[1], function ()
				local native, nerr = collect(s.native, "user", case[2]);
				local sql, serr = collect(s.sql, "user", case[2]);
				assert.same(names(sql, keys.sql, case[2]), names(native, keys.native, case[2]));
				assert.equal(serr, nerr);
			end);
		end

		it("treats RSM's empty <before/> (before = true) as no boundary", function ()
			local items = collect(s.native, "user", { before = true, reverse = true, limit = 3 });
			assert.same({ "k6", "k5", "k4" }, names(items, keys.native));
		end);

		it("returns fresh, mutable stanzas with the stored times", function ()
			local first = collect(s.native, "user", { key = "k1" })[1];
			assert.is_true(st.is_stanza(first.value));
			assert.equal("message 1", first.value:get_child_text("body"));
			assert.equal(103, first.when);
			assert.equal(math.type(103), math.type(first.when));
			assert.equal("a@x", first.with);
			first.value.attr.to = "changed";
			first.value:tag("extra"):up();
			local again = collect(s.native, "user", { key = "k1" })[1];
			assert.equal("juliet@example.com", again.value.attr.to);
			same_stanza(msg(1), again.value);
		end);

		it("leaves the caller's query table as it was", function ()
			local query = { with = "a@x", reverse = true, limit = 2, before = "k6", total = true };
			local copy = {};
			for k, v in pairs(query) do copy[k] = v; end
			local first = collect(s.native, "user", query);
			assert.same(copy, query);
			assert.same(first, collect(s.native, "user", query));
		end);

		it("summarises like mod_storage_sql", function ()
			assert.same(s.sql:summary("user", {}), s.native:summary("user", {}));
			assert.same(s.sql:summary("user", { start = 102 }), s.native:summary("user", { start = 102 }));
		end);

		it("gets and sets items like mod_storage_sql", function ()
			for driver, store in pairs(s) do
				local value, when, with = store:get("user", keys[driver].k4);
				assert.equal(101, when, driver);
				assert.equal("b@x", with);
				same_stanza(msg(4), value);
				assert.truthy(store:set("user", keys[driver].k4, st.message({ id = "tombstone" }), nil, nil));
				assert.falsy(store:set("user", "nope", st.message()));
				local unknown, err = store:get("user", "nope");
				assert.is_nil(unknown);
				if driver == "native" then assert.equal("item-not-found", err); end
			end
			-- set keeps the position, the time and the peer
			assert.same(names(collect(s.sql, "user"), keys.sql), names(collect(s.native, "user"), keys.native));
			value, when, with = s.native:get("user", "k4");
			assert.equal("tombstone", value.attr.id);
			assert.equal(101, when);
			assert.equal("b@x", with);
			assert.truthy(s.native:set("user", "k4", msg(4), 99.25, "c@x"));
			value, when, with = s.native:get("user", "k4");
			assert.equal(99.25, when);
			assert.equal("c@x", with);
		end);
	end);

	describe("archive deletes, compared with mod_storage_sql", function ()
		local cases = {
			{ "with and end together (AND)", { with = "a@x", ["end"] = 103 } };
			{ "ids", { ids = { "k1", "k2", "nope" } } };
			{ "key", { key = "k3" } };
			{ "truncate", { truncate = 2 } };
			{ "truncate with a filter", { truncate = 1, with = "a@x" } };
			{ "truncate keeping the oldest", { truncate = 2, reverse = true } };
			{ "truncate to nothing", { truncate = 0 } };
			{ "after", { after = "k4" } };
			{ "a time range", { start = 101, ["end"] = 104 } };
			{ "everything", nil };
		};
		for i, case in ipairs(cases) do
			it("deletes by " .. case[1], function ()
				local s, keys = fixture("delete" .. i, "user");
				local ndeleted = s.native:delete("user", case[2]);
				s.sql:delete("user", case[2]);
					local all = { total = true };
				assert.same(names(collect(s.sql, "user", all), keys.sql, all),
					names(collect(s.native, "user", all), keys.native, all));
				assert.equal(6 - #collect(s.native, "user"), ndeleted);
			end);
		end

		it("deletes nothing and says item-not-found for an unknown boundary", function ()
			local s = fixture("delete-unknown", "user");
			local ok, err = s.native:delete("user", { before = "nope" });
			assert.is_nil(ok);
			assert.equal("item-not-found", err);
			assert.equal(6, #collect(s.native, "user"));
		end);

		it("deletes across every user of a store with user = true", function ()
			local s = both("wildcard");
			for driver, store in pairs(s) do
				for u = 1, 3 do
					for i = 1, 4 do
						assert(store:append("user" .. u, nil, msg(i), 1000 + i, "a@x"));
					end
				end
				store:delete(true, { ["end"] = 1002 });
				for u = 1, 3 do
					assert.equal(2, #collect(store, "user" .. u), driver);
				end
			end
			assert.truthy(s.native.caps.wildcard_delete);
		end);
	end);

	describe("archive stores", function ()
		local store;
		before_each(function () store = assert(env.sm.open(NATIVE, "plain", "archive")); end);

		it("advertises the capabilities mod_mam needs for #extended", function ()
			assert.same({ total = true, truncate = true, full_id_range = true, ids = true, wildcard_delete = true },
				store.caps);
		end);

		it("generates unpredictable unique keys", function ()
			local seen = {};
			for i = 1, 200 do
				local key = assert(store:append("keys", nil, msg(i), i, "a@x"));
				assert.matches("^%x+%-%x+%-7%x+%-[89ab]%x+%-%x+$", key);
				assert.is_nil(seen[key]);
				seen[key] = true;
			end
		end);

		it("replaces an existing key and moves it to the end", function ()
			for i = 1, 3 do assert(store:append("replace", "r" .. i, msg(i), i, "a@x")); end
			assert.equal("r2", store:append("replace", "r2", msg(22), 50, "b@x"));
			local items = collect(store, "replace", { total = true });
			assert.same({ "r1", "r3", "r2", total = 3 }, names(items, {}, { total = true }));
			assert.equal(3, items.total);
			assert.equal("message 22", items[3].value:get_child_text("body"));
		end);

		it("keeps fractional times and sorts by append order only", function ()
			assert(store:append("frac", "late", msg(1), 2000.75, "a@x"));
			assert(store:append("frac", "early", msg(2), 1000.125, "a@x"));
			local items = collect(store, "frac", { start = 1000.125, ["end"] = 2000.75 });
			assert.same({ "late", "early" }, names(items, {}));
			assert.equal(2000.75, items[1].when);
			assert.equal(1000.125, items[2].when);
		end);

		it("stores host-level archives (user = nil) and plain Lua values", function ()
			assert(store:append(nil, "slot", st.stanza("request", { filename = "a.png", size = "10" }), 5, "uploader@x"));
			assert(store:append(nil, "str", "text", 6));
			assert(store:append(nil, "tbl", { a = 1, b = { true, 2.5, "x" } }, 7));
			local items = collect(store, nil);
			assert.equal("a.png", items[1].value.attr.filename);
			assert.equal("text", items[2].value);
			assert.same({ a = 1, b = { true, 2.5, "x" } }, items[3].value);
			assert.equal("", items[2].with);
		end);

		it("refuses values it cannot store without raising", function ()
			local ok, err = store:append("bad", nil, function () end, 1, "a@x");
			assert.is_nil(ok);
			assert.equal("unsupported-datatype", err);
			assert.equal(0, select(2, store:find("bad", { total = true, limit = 0 })));
		end);

		it("answers an empty archive with nothing, and a zero total", function ()
			local items = collect(store, "nobody", { total = true, reverse = true, limit = 10 });
			assert.equal(0, #items);
			assert.equal(0, items.total);
			local iter = store:find("nobody");
			assert.is_nil(iter());
			assert.is_nil(iter());
		end);

		it("pages through archives larger than one engine page", function ()
			for i = 1, 700 do assert(store:append("big", "b" .. i, "v" .. i, i, i % 7 == 0 and "seven" or "other")); end
			local all = collect(store, "big");
			assert.equal(700, #all);
			for i = 1, 700 do assert.equal("b" .. i, all[i].key); end
			local limited = collect(store, "big", { limit = 300, reverse = true, total = true });
			assert.equal(300, #limited);
			assert.equal(700, limited.total);
			assert.equal("b700", limited[1].key);
			assert.equal("b401", limited[300].key);
			local sevens = collect(store, "big", { with = "seven", after = "b100", total = true });
			assert.equal(100, sevens.total);
			assert.equal(100 - 14, #sevens);
		end);

		it("deletes a large archive in slices and keeps counters exact", function ()
			for i = 1, 3000 do assert(store:append("slices", nil, msg(i), i, "a@x")); end
			assert.equal(1500, store:delete("slices", { ["end"] = 1500 }));
			local items = collect(store, "slices", { limit = 0, total = true });
			assert.equal(1500, items.total);
			assert.equal(1501, collect(store, "slices", { limit = 1 })[1].when);
		end);

		it("answers bad query values from clients with nil, err, never raising", function ()
			-- mod_mam asks for limit = <max> + 1 (RSM <max>-3</max>: -2), mod_muc_mam for
			-- limit = maxstanzas; both call find() unprotected
			for i = 1, 5 do assert(store:append("badq", "b" .. i, msg(i), i, "a@x")); end
			local many = {};
			for i = 1, 5000 do many[i] = "id" .. i; end
			for _, query in ipairs({ { limit = -2 }, { limit = 0/0 }, { start = 0/0 }, { ids = many } }) do
				local ok, iter, err = pcall(store.find, store, "badq", query);
				assert.is_true(ok, iter);
				assert.same({ nil, "bad-request" }, { iter, err });
			end
			assert.same({ nil, "bad-request" }, { store:delete("badq", { truncate = -1 }) });
			assert.same({ nil, "bad-request" }, { store:delete(true, { ["end"] = 0/0 }) });
			assert.equal(5, collect(store, "badq", { total = true, limit = 0 }).total);
		end);

		it("takes a fractional limit as the integer below it (RSM <max>2.5</max>)", function ()
			for i = 1, 600 do assert(store:append("fraction", "f" .. i, "v" .. i, i, "a@x")); end
			assert.same({ "f1", "f2" }, names(collect(store, "fraction", { limit = 2.5 }), {}));
			assert.same({ "f600" }, names(collect(store, "fraction", { limit = 1.5, reverse = true }), {}));
			-- more than one engine page
			local items = collect(store, "fraction", { limit = 300.5 });
			assert.equal(300, #items);
			assert.equal("f300", items[300].key);
		end);

		it("expires a store of thousands of users, each keeping newer items, with one wildcard delete", function ()
			-- as mod_mam's daily delete(true, { ["end"] = ... }); slices of 1 ms on this host
			local many = assert(env.sm.open(NATIVE, "expiry-many", "archive"));
			for u = 1, 3000 do
				local user = ("user%04d"):format(u);
				for i = 1, 3 do assert(many:append(user, nil, "old", i, "a@x")); end
				assert(many:append(user, nil, "new", 1000, "a@x"));
			end
			assert.equal(9000, within(60, many.delete, many, true, { ["end"] = 10 }));
			for _, user in ipairs({ "user0001", "user1500", "user3000" }) do
				local items = collect(many, user);
				assert.equal(1, #items);
				assert.equal("new", items[1].value);
			end
			local users = 0;
			for _ in many:users() do users = users + 1; end
			assert.equal(3000, users);
		end);

		it("deletes from a database not in incremental auto-vacuum mode without vacuuming for ever", function ()
			-- a database copied with `sqlite3 .dump | sqlite3`: PRAGMA auto_vacuum cannot change it
			local path = env.data .. "/no-auto-vacuum.sqlite";
			assert(require "prosody_native.archive".open(path)):close();
			assert(os.execute(("sqlite3 %q 'PRAGMA auto_vacuum = NONE; VACUUM;'"):format(path)));
			assert(env.activate("no-vacuum.test", { storage = "native"; storage_native_path = path;
				storage_native_delete_slice = 0.001 }, "native"));
			local s = assert(env.sm.open("no-vacuum.test", "archive", "archive"));
			for i = 1, 300 do assert(s:append("u", nil, msg(i, ("x"):rep(1000)), i, "a@x")); end
			assert.equal(300, within(30, s.delete, s, "u"));
			assert.equal(0, select(2, s:find("u", { limit = 0, total = true })));
			local p = assert(io.popen(("sqlite3 %q 'PRAGMA auto_vacuum; PRAGMA freelist_count;'"):format(path)));
			local mode, free = p:read("n", "n");
			p:close();
			assert.equal(0, mode);
			assert.truthy(free > 50, free); -- kept for reuse
		end);

		it("enforces storage_archive_item_limit with quota-limit", function ()
			assert(env.activate("quota.test", { storage = "native"; storage_archive_item_limit = 3 }, "native"));
			local q = assert(env.sm.open("quota.test", "archive", "archive"));
			assert.equal(3, q.caps.quota);
			for i = 1, 3 do assert(q:append("u", "q" .. i, msg(i), i, "a@x")); end
			local ok, err = q:append("u", nil, msg(4), 4, "a@x");
			assert.is_nil(ok);
			assert.equal("quota-limit", err);
			assert.equal("q2", q:append("u", "q2", msg(5), 5, "a@x")); -- a replacement does not grow
			assert(q:delete("u", { truncate = 2 }));
			assert(q:append("u", nil, msg(6), 6, "a@x"));
		end);

		it("lists users and UTC dates", function ()
			local d = assert(env.sm.open(NATIVE, "dates", "archive"));
			assert(d:append("alice", nil, msg(1), 86400 * 3 + 5, "a@x"));
			assert(d:append("alice", nil, msg(2), 86400 * 3 + 600, "a@x"));
			assert(d:append("alice", nil, msg(3), 86400 * 10, "a@x"));
			assert(d:append("bob", nil, msg(4), 1, "a@x"));
			assert.same({ "1970-01-04", "1970-01-11" }, d:dates("alice"));
			local users = {};
			for u in d:users() do users[#users+1] = u; end
			assert.same({ "alice", "bob" }, users);
		end);
	end);

	describe("hosts sharing a database file", function ()
		-- items committed to the file, as another process sees them
		local function committed(path)
			local p = assert(io.popen(("sqlite3 %q 'SELECT count(*) FROM items;'"):format(path)));
			local n = p:read("n");
			p:close();
			return n;
		end

		it("keeps storage_native_durability per host: a \"full\" host's append is committed when it returns", function ()
			-- the host with the default loads first and opens the shared connection
			local path = env.data .. "/durability.sqlite";
			assert(env.activate("normal.shared", { storage = "native"; storage_native_path = path }, "native"));
			assert(env.activate("full.shared", { storage = "native"; storage_native_path = path;
				storage_native_durability = "full" }, "native"));
			local normal = assert(env.sm.open("normal.shared", "archive", "archive"));
			local full = assert(env.sm.open("full.shared", "archive", "archive"));
			assert(normal:append("u", "n1", msg(1), 1, "a@x"));
			assert.equal(0, committed(path)); -- group commit: in the open batch
			assert(full:append("u", "f1", msg(2), 2, "a@x"));
			assert.equal(2, committed(path)); -- and on disk: it waited for its sync
			assert(normal:append("u", "n2", msg(3), 3, "a@x"));
			assert.equal(2, committed(path));
			assert.truthy(full:set("u", "f1", msg(4)));
			assert.equal(3, committed(path));
		end);

		local connection_options = {
			{ "storage_native_commit_batch", 1 };
			{ "storage_native_commit_delay", 0.5 };
			{ "storage_native_sync_interval", 2 };
		};
		for i, case in ipairs(connection_options) do
			it("refuses " .. case[1] .. " under a host unless it is the global value, naming the option", function ()
				local path = env.data .. "/connection-options.sqlite";
				local ok, err = env.activate("conn" .. i .. ".test", { storage = "native"; storage_native_path = path;
					[case[1]] = case[2] }, "native");
				assert.falsy(ok);
				assert.matches("option '" .. case[1] .. "'", tostring(err), 1, true);
				assert.matches("global section", tostring(err), 1, true);
				env.config.set("*", case[1], case[2]);
				finally(function () env.config.set("*", case[1], nil); end);
				assert(env.activate("conn-same" .. i .. ".test", { storage = "native"; storage_native_path = path;
					[case[1]] = case[2] }, "native"));
			end);
		end

		it("applies changed connection options when the module is loaded again", function ()
			local path = env.data .. "/reload.sqlite";
			assert(env.activate("reload.test", { storage = "native"; storage_native_path = path }, "native"));
			local store = assert(env.sm.open("reload.test", "archive", "archive"));
			assert(store:append("u", "r1", msg(1), 1, "a@x"));
			assert.equal(0, committed(path));
			env.config.set("*", "storage_native_commit_batch", 1);
			finally(function () env.config.set("*", "storage_native_commit_batch", nil); end);
			assert(env.mm.reload("reload.test", "storage_native"));
			assert.equal(1, committed(path)); -- no batch may stay open
			store = assert(env.sm.open("reload.test", "archive", "archive"));
			assert(store:append("u", "r2", msg(2), 2, "a@x"));
			assert.equal(2, committed(path));
		end);
	end);

	describe("as default_storage", function ()
		it("serves keyval and map stores through the delegate driver", function ()
			assert(env.activate("default.test", { default_storage = "native"; storage_native_delegate = "memory" }, "native"));
			local kv = assert(env.sm.open("default.test", "roster"));
			assert(kv:set("alice", { bob = { subscription = "both" } }));
			assert.same({ bob = { subscription = "both" } }, kv:get("alice"));
			local map = assert(env.sm.open("default.test", "account_details", "map"));
			assert(map:set("alice", "email", "a@x"));
			assert.equal("a@x", map:get("alice", "email"));
			local archive = assert(env.sm.open("default.test", "archive", "archive"));
			assert(archive:append("alice", nil, msg(1), 1, "a@x"));
			assert(env.sm.get_driver("default.test", "archive"));
			assert(env.sm.purge("alice", "default.test"));
			assert.is_nil(kv:get("alice"));
			assert.equal(0, select(2, archive:find("alice", { limit = 0, total = true })));
		end);
	end);

	describe("configuration", function ()
		local bad = {
			{ "storage_native_durability", "fast" };
			{ "storage_native_sync_interval", 0 };
			{ "storage_native_busy_timeout", -1 };
			{ "storage_native_delete_slice", "soon" };
			{ "storage_native_commit_batch", 0 };
			{ "storage_native_commit_batch", 2.5 };
			{ "storage_native_commit_delay", 0 };
			{ "storage_native_commit_delay", "later" };
			{ "storage_archive_item_limit", 2.5 };
			{ "storage_native_delegate", "native" };
		};
		for i, case in ipairs(bad) do
			it("refuses a bad " .. case[1] .. " with the option's name", function ()
				local ok, err = env.activate("bad" .. i .. ".test", { storage = "native"; [case[1]] = case[2] }, "native");
				assert.falsy(ok);
				assert.matches(case[1], tostring(err), 1, true);
			end);
		end

		it("refuses a file that is not a database with a clear error", function ()
			local path = env.data .. "/garbage.sqlite";
			local f = assert(io.open(path, "w"));
			f:write(("this is not an SQLite database\n"):rep(200));
			f:close();
			local ok, err = env.activate("garbage.test", { storage = "native"; storage_native_path = path }, "native");
			assert.falsy(ok);
			assert.matches("garbage.sqlite", tostring(err), 1, true);
			assert.matches("not a database", tostring(err), 1, true);
		end);
	end);
end);
