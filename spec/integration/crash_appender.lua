-- Crash-safety helper: drives the native archive driver through Prosody's real storage manager, no server.
--
--   lua5.4 crash_appender.lua append <data_dir> <durability> <users> [max]
--       appends to the archives of users u1..u<users> round-robin, forever (or max times), and prints
--       "<user>\t<key>" on stdout, flushed, after every append that returned a key;
--   lua5.4 crash_appender.lua list <data_dir> <durability> <users>
--       prints "<user>\t<key>" for every archived item, then "total\t<user>\t<n>" with the driver's total.
--
-- Needs LUA_PATH='/usr/lib/prosody/?.lua;;' LUA_CPATH='/usr/lib/prosody/?.so;;' (harness.lua_env()).

local mode, data_dir, durability, n_users, max = arg[1], arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5]);
assert(mode == "append" or mode == "list", "usage: crash_appender.lua append|list <data_dir> <durability> <users> [max]");
assert(data_dir and durability and n_users, "missing arguments");

local here = arg[0]:match("^(.*)/[^/]*$") or ".";
local repo = here .. "/../..";
-- must be set before util.pluginloader is first required
CFG_PLUGINDIR = "/usr/lib/prosody/modules/;" .. repo .. "/modules/";

package.loaded["net.server"] = require "net.server_select";

_G.prosody = {
	core_post_stanza = function() end;
	events = require "util.events".new();
	hosts = {};
	paths = { data = data_dir };
};

local config = require "core.configmanager";
local hm = require "core.hostmanager";
local sm = require "core.storagemanager";
local st = require "util.stanza";

local host = "localhost";
config.set(host, "storage", { archive = "native" });
config.set(host, "default_storage", "internal");
config.set(host, "storage_native_durability", durability);
assert(hm.activate(host, {}));
sm.initialize_host(host);

local archive = assert(sm.open(host, "archive", "archive"));
assert(archive.name ~= "null", "the native driver did not load (null storage)");

local out = io.stdout;
out:setvbuf("full");

if mode == "list" then
	for i = 1, n_users do
		local user = "u" .. i;
		local iter, total = archive:find(user, { total = true });
		assert(iter, total);
		for key in iter do
			out:write(user, "\t", key, "\n");
		end
		out:write("total\t", user, "\t", tostring(total), "\n");
	end
	out:flush();
	os.exit(0);
end

local padding = string.rep("x", 200);
local i = 0;
while not max or i < max do
	i = i + 1;
	local user = "u" .. (i % n_users + 1);
	local msg = st.message({ to = user .. "@localhost", from = "peer@example.com/r", type = "chat", id = "m" .. i })
		:text_tag("body", ("crash test message %d %s"):format(i, padding));
	local key, err = archive:append(user, nil, msg, os.time(), "peer@example.com");
	if not key then
		io.stderr:write("append failed: ", tostring(err), "\n");
		os.exit(2);
	end
	out:write(user, "\t", key, "\n");
	out:flush();
end
os.exit(0);
