-- prosodyctl mod_storage_native import <driver> [store ...]
-- Copies archives from another storage driver (internal, sql, ...) through its archive
-- API into the native database, keeping every item's key, time and peer. Items whose
-- key is already present are skipped, so an interrupted import simply runs again.
-- luacheck: globals prosody

local config = require "core.configmanager";
local startup = require "util.startup";
local storagemanager = require "core.storagemanager";

local DEFAULT_STORES = { "archive", "muc_log", "offline" };

local function configured_hosts()
	local list = {};
	for host in pairs(config.getconfig()) do
		if host ~= "*" and config.get(host, "enabled") ~= false then
			list[#list+1] = host;
		end
	end
	table.sort(list);
	return list;
end

local function import_user(db, src, host, store, user)
	local copied, skipped = 0, 0;
	local iter, err = src:find(user);
	if not iter then return nil, err; end
	for key, value, when, with in iter do
		if db:get(host, store, user or "", key) ~= nil then
			skipped = skipped + 1;
		else
			local ok, aerr = db:append(host, store, user or "", key, value, when or os.time(), with or "");
			if not ok then return nil, ("%s (item %s)"):format(tostring(aerr), key); end
			copied = copied + 1;
		end
	end
	return copied, skipped;
end

local function run(source, stores, db)
	if not source or source == "native" then
		print("usage: prosodyctl mod_storage_native import <driver> [store ...]   (driver: internal, sql, ...)");
		return 2;
	end
	if #stores == 0 then stores = DEFAULT_STORES; end
	local total, failures = 0, 0;
	for _, host in ipairs(configured_hosts()) do
		if not prosody.hosts[host] then
			prosody.hosts[host] = startup.make_host(host);
		end
		storagemanager.initialize_host(host);
		local driver, err = storagemanager.load_driver(host, source);
		if not driver then
			print(("%s: cannot load storage driver %q: %s"):format(host, source, tostring(err)));
			return 1;
		end
		for _, store in ipairs(stores) do
			local src = driver:open(store, "archive");
			if src and src.users then
				for user in src:users() do
					local copied, skipped = import_user(db, src, host, store, user);
					if copied then
						total = total + copied;
						if copied + skipped > 0 then
							print(("%s %s %s: %d copied, %d already present"):format(host, store, user ~= "" and user or "(host)", copied, skipped));
						end
					else
						failures = failures + 1;
						print(("%s %s %s: FAILED: %s"):format(host, store, tostring(user), tostring(skipped)));
					end
				end
			end
		end
	end
	print(("%d items imported%s"):format(total, failures > 0 and (", " .. failures .. " archives failed") or ""));
	return failures > 0 and 1 or 0;
end

return { run = run };
