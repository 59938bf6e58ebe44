-- prosody-native: finds and loads a native engine for a shim.
-- Loaded by each shim with module:require("prosody_native_loader"), so it runs in
-- the shim's environment and sees its `module`.
--
-- Prosody 0.12 never adds its plugin installer tree's lib/lua/5.4 to package.cpath
-- (util/paths.lua tests package.path instead), so a rock installed with
-- `prosodyctl install` would be found as Lua but not as C. We add that entry here,
-- then fall back to a development checkout's build/ directory.

local PACK_ABI = 1; -- bumped whenever a shim needs a newer engine interface

local function add_cpath(template)
	if not package.cpath:find(template, 1, true) then
		package.cpath = package.cpath .. ";" .. template;
	end
end

local function checkout_candidates(engine)
	local dir = module:get_directory();
	local modname = "prosody_native." .. engine;
	local build = os.getenv("PN_BUILD") or "build";
	local path = package.searchpath(modname, dir .. "/../" .. build .. "/?.so");
	return path, modname;
end

local function load_engine(engine)
	local modname = "prosody_native." .. engine;
	local installer = prosody and prosody.paths and prosody.paths.installer;
	if installer then
		add_cpath(installer .. "/lib/lua/5.4/?.so");
	end

	local ok, lib = pcall(require, modname);
	if not ok then
		local path = checkout_candidates(engine);
		if not path then
			error(("native engine %s not found (%s).\n"
				.. "Build it with `make` in the prosody-native checkout, or install the pack with "
				.. "`prosodyctl install prosody-native` / `luarocks --lua-version=5.4 install prosody-native`.")
				:format(modname, tostring(lib):gsub("\n%s*", " ")), 0);
		end
		local opener, err = package.loadlib(path, "luaopen_" .. modname:gsub("%.", "_"));
		if not opener then
			error(("native engine %s at %s could not be loaded: %s. "
				.. "Rebuild it with `make` for Lua 5.4 (liblua5.4-dev)."):format(modname, path, err), 0);
		end
		ok, lib = pcall(opener, modname);
		if not ok then
			error(("native engine %s at %s failed to start: %s. Rebuild it with `make`."):format(modname, path, lib), 0);
		end
		package.loaded[modname] = lib;
	end
	if type(lib) ~= "table" or lib._ABI ~= PACK_ABI then
		error(("native engine %s has interface version %s but this shim needs %d: "
			.. "the .so and the Lua modules come from different versions of prosody-native. "
			.. "Rebuild with `make` or reinstall the pack."):format(modname, tostring(type(lib) == "table" and lib._ABI), PACK_ABI), 0);
	end
	return lib;
end

return { load = load_engine; abi = PACK_ABI };
