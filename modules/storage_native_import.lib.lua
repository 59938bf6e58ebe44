-- prosodyctl mod_storage_native import <driver> [store ...]
-- Copies archives from another storage driver (internal, sql, ...) through its archive
-- API into the native database, keeping every item's key, time and peer. Items whose
-- key is already present are skipped, so an interrupted import simply runs again.
-- luacheck: globals prosody

local config = require "core.configmanager";
local startup = require "util.startup";
local storagemanager = require "core.storagemanager";

local DEFAULT_STORES = { "archive", "muc_log", "offline" };
local PAGE = 256;

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

-- key -> when of everything the native archive of this owner holds
local function native_items(db, host, store, owner)
	local items, query = {}, { limit = PAGE };
	repeat
		local rows, n, _, last = db:find(host, store, owner, query);
		if not rows then return nil, n; end
		for i = 0, n - 1 do
			items[rows[4 * i + 1]] = rows[4 * i + 3];
		end
		query.cursor = last;
	until n < PAGE
	return items;
end

-- Items are appended, so they sort after what the native archive already holds. Once
-- Prosody archives there, an import would put old history after the newer messages:
-- the newest MAM page would show it, and a client catching up "after" its last id
-- would get all of it as new. So an owner whose native archive holds items the source
-- does not, newer than what is left to copy, is refused (nothing copied).
local function import_user(db, append, src, host, store, user)
	local owner = user or "";
	local present, err = native_items(db, host, store, owner);
	if not present then return nil, err; end
	local iter;
	iter, err = src:find(user);
	if not iter then return nil, err; end
	local in_source, n_source, todo, oldest = {}, 0, 0, nil;
	for key, _, when in iter do
		in_source[key] = true;
		n_source = n_source + 1;
		if present[key] == nil then
			todo = todo + 1;
			when = tonumber(when);
			if when and (not oldest or when < oldest) then oldest = when; end
		end
	end
	if todo == 0 then return 0, n_source; end
	local newer = 0;
	for key, when in pairs(present) do
		if not in_source[key] and oldest and when > oldest then newer = newer + 1; end
	end
	if newer > 0 then
		local msg = "refused: the native archive already holds %d item(s) newer than some of the %d to import"
			.. " (archived since storage was switched?): imported now, that older history would sort after them";
		return nil, msg:format(newer, todo), "newer-items";
	end
	local copied, skipped = 0, 0;
	iter, err = src:find(user);
	if not iter then return nil, err; end
	for key, value, when, with in iter do
		if present[key] ~= nil then
			skipped = skipped + 1;
		else
			local ok, aerr = append(host, store, owner, key, value, when or os.time(), with or "");
			if not ok then return nil, ("%s (item %s)"):format(tostring(aerr), key); end
			present[key] = when or 0;
			copied = copied + 1;
		end
	end
	return copied, skipped;
end

-- db: the engine (reads); append(host, store, user, key, value, when, with): the
-- driver's write path, which waits for a running Prosody's write lock.
local function run(source, stores, db, append)
	if not source or source == "native" then
		print("usage: prosodyctl mod_storage_native import <driver> [store ...]   (driver: internal, sql, ...)");
		return 2;
	end
	if #stores == 0 then stores = DEFAULT_STORES; end
	local total, failures, refused = 0, 0, 0;
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
					local copied, skipped, code = import_user(db, append, src, host, store, user);
					local name = user ~= "" and user or "(host)";
					if copied then
						total = total + copied;
						if copied + skipped > 0 then
							print(("%s %s %s: %d copied, %d already present"):format(host, store, name, copied, skipped));
						end
					else
						failures = failures + 1;
						if code == "newer-items" then refused = refused + 1; end
						print(("%s %s %s: FAILED: %s"):format(host, store, name, tostring(skipped)));
					end
				end
			end
		end
	end
	print(("%d items imported%s"):format(total, failures > 0 and (", " .. failures .. " archives failed") or ""));
	if refused > 0 then
		print("Import before archives are written to natively: while Prosody still uses the old driver, then once"
			.. " more with Prosody stopped (it copies only what came since), then switch storage to native.");
	end
	return failures > 0 and 1 or 0;
end

return { run = run };
