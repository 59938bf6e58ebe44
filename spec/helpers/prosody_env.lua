-- Sets up a Prosody core (configmanager, hostmanager, modulemanager, storagemanager)
-- inside the busted process, as Prosody's own storage specs do, with our modules/
-- on the plugin path. Returns helpers to activate hosts with a given config.
local repo = assert(os.getenv("PN_ROOT") or io.popen("pwd"):read("*l"));
local data = os.tmpname();
os.remove(data);
assert(os.execute("mkdir -p " .. data));

-- Must be set before util.pluginloader is first required.
_G.CFG_PLUGINDIR = "/usr/lib/prosody/modules/;" .. repo .. "/modules/";
package.loaded["net.server"] = require "net.server_select";

_G.prosody = {
	core_post_stanza = function () end;
	events = require "util.events".new();
	hosts = {};
	paths = { data = data; config = data };
};

local config = require "core.configmanager";
local hm = require "core.hostmanager";
local mm = require "core.modulemanager";
local sm = require "core.storagemanager";

local env = { data = data; repo = repo; config = config; sm = sm; mm = mm };

-- Activates `host` with `options` and loads the storage driver named by its
-- `storage` option (or `driver`). Returns true or nil, err from the module manager.
function env.activate(host, options, driver)
	for k, v in pairs(options) do
		config.set(host, k, v);
	end
	assert(hm.activate(host, {}));
	sm.initialize_host(host);
	if driver then
		return mm.load(host, "storage_" .. driver);
	end
	return true;
end

function env.cleanup()
	os.execute("rm -rf " .. data);
end

return env;
