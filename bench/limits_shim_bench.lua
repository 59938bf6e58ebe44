-- prosody-native: what mod_native_limits adds to every stanza of a limited session, measured in
-- one process: Prosody's core (configmanager, hostmanager, modulemanager) with two hosts, one
-- with the module and one without, and the same "pre-stanza" event fired at each.
--   sh bench/lua_bench.sh limits_shim [--quick]
-- The module's limits are set high enough never to refuse, so this is the allow path every
-- stanza takes: the session's state, the staff check, its budget and its address's.
local ROOT = assert(arg[0]:match("^(.*)/bench/[^/]*$"), "run as bench/limits_shim_bench.lua");
_G.CFG_PLUGINDIR = "/usr/lib/prosody/modules/;" .. ROOT .. "/modules/"; -- before util.pluginloader loads
package.loaded["net.server"] = require "net.server_select";
local data = os.tmpname();
os.remove(data);
assert(os.execute("mkdir -p " .. data));
_G.prosody = { core_post_stanza = function () end; events = require "util.events".new(); hosts = {};
	paths = { data = data; config = data }; full_sessions = {}; bare_sessions = {} };

local config = require "core.configmanager";
local hostmanager = require "core.hostmanager";
local modulemanager = require "core.modulemanager";
local st = require "util.stanza";

local quick = arg[1] == "--quick";
local N = quick and 200000 or 1000000;
local ROUNDS = quick and 1 or 5;

local PLAIN, LIMITED = "plain.example", "anon.example";
for _, h in ipairs({ PLAIN, LIMITED }) do
	config.set(h, "authentication", "anonymous");
	config.set(h, "native_limits_exempt_loopback", false);
	config.set(h, "native_limits_session_stanzas", "1000000/s burst 1000000");
	config.set(h, "native_limits_stanzas", { address = "1000000/s burst 1000000" });
	assert(hostmanager.activate(h, {}));
end
assert(modulemanager.load(LIMITED, "native_limits"));

local function session(host)
	return { type = "c2s"; host = host; ip = "203.0.113.5"; username = "visitor"; resource = "web";
		full_jid = "visitor@" .. host .. "/web"; send = function () end; log = function () end };
end

local stanza = st.message({ to = "support@conference.example", type = "groupchat" }):tag("body"):text("hello"):up();

-- ns per event, the fastest of ROUNDS rounds (CPU time); hosts alternate, so drift hits both
local function per_event(host)
	local fire, event = prosody.hosts[host].events.fire_event, { origin = session(host), stanza = stanza };
	for _ = 1, 1000 do fire("pre-stanza", event); end
	local t = os.clock();
	for _ = 1, N do fire("pre-stanza", event); end
	return (os.clock() - t) * 1e9 / N;
end
local best = { [PLAIN] = math.huge, [LIMITED] = math.huge };
for _ = 1, ROUNDS do
	for _, h in ipairs({ PLAIN, LIMITED }) do best[h] = math.min(best[h], per_event(h)); end
end

print(("limits shim bench: %d pre-stanza events per round, best of %d rounds"):format(N, ROUNDS));
print(("%-64s %10.1f ns/stanza"):format("pre-stanza event, host without mod_native_limits", best[PLAIN]));
print(("%-64s %10.1f ns/stanza"):format("pre-stanza event, host with mod_native_limits", best[LIMITED]));
print(("%-64s %10.1f ns/stanza"):format("added by mod_native_limits", best[LIMITED] - best[PLAIN]));
os.execute("rm -rf " .. data);
