-- mod_native_limits: abuse limiting for anonymous VirtualHosts and MUC components, keyed by
-- client address and network prefix, on the prosody_native.limiter engine.
-- Policy (what is limited where, how a refusal escalates) lives here; the engine keeps the
-- fixed-size rate, strike and ban tables.
-- luacheck: globals prosody

local st = require "util.stanza";
local async = require "util.async";
local cache = require "util.cache";
local jid_bare = require "util.jid".bare;
local jid_resource = require "util.jid".resource;
local engine = module:require("prosody_native_loader").load("limiter");

local host = module.host;
local is_component = module:get_host_type() == "component";
local FIELD = "native_limits/" .. host; -- per-session state of this host's instance
local xmlns_sasl = "urn:ietf:params:xml:ns:xmpp-sasl";

-- ---------------------------------------------------------------- options

local options = module:require("prosody_native_options");
local option_error, boolean_option, number_option = options.fail, options.boolean, options.number;

local units = { s = 1, sec = 1, second = 1, seconds = 1, m = 60, min = 60, minute = 60, minutes = 60,
	h = 3600, hour = 3600, hours = 3600, d = 86400, day = 86400, days = 86400 };

-- "300", 300, "5min", "1 h", "2 days" -> seconds
local function parse_duration(value)
	if type(value) == "number" then return value == value and value or nil; end
	if type(value) ~= "string" then return nil; end
	local n, unit = value:match("^%s*(%d+%.?%d*)%s*(%a*)%s*$");
	n = tonumber(n);
	if not n then return nil; end
	if unit == "" then return n; end
	return units[unit] and n * units[unit] or nil;
end

local function duration_option(name, default, min, max)
	local value = module:get_option(name, default);
	local seconds = parse_duration(value);
	if not seconds or seconds < min or seconds > max then
		option_error(name, value, ("a duration from %s to %s seconds (a number, or like \"5min\", \"1h\")"):format(min, max));
	end
	return seconds;
end

-- A rate string, or false to disable.
local function rate_option(name, default)
	local value = module:get_option(name, default);
	if value == false then return nil; end
	local rate, burst = nil, nil;
	if type(value) == "string" then rate, burst = engine.parse_rate(value); end
	if not rate then option_error(name, value, "a rate like \"10/min\" or \"3/s burst 10\", or false"); end
	return { rate = rate; burst = burst; text = value };
end

-- Level names in options: "address" (an IPv4 or IPv6 address), "ipv4/N", "ipv6/N", "global".
local function level_spec(name, key)
	if key == "address" then
		return { { family = "ipv4", bits = 32 }, { family = "ipv6", bits = 128 } }, 1000;
	elseif key == "global" then
		return { { family = "any", bits = 0 } }, -1;
	end
	local fam, bits = tostring(key):match("^ipv([46])/(%d+)$");
	bits = tonumber(bits);
	if not fam or bits > (fam == "4" and 32 or 128) then
		option_error(name, key, "keyed by \"address\", \"global\", \"ipv4/<0-32>\" or \"ipv6/<0-128>\"");
	end
	return { { family = "ipv" .. fam, bits = bits } }, (fam == "4" and 96 or 0) + bits;
end

local function sorted_levels(name, merged, convert)
	local out = {};
	for key, value in pairs(merged) do
		if value ~= false then
			local specs, order = level_spec(name, key);
			for _, spec in ipairs(specs) do
				spec.label = key;
				spec.order = order;
				convert(spec, value, key);
				out[#out+1] = spec;
			end
		end
	end
	table.sort(out, function (a, b)
		if a.order ~= b.order then return a.order > b.order; end
		return a.family < b.family;
	end);
	return out;
end

-- A table of level -> rate (false disables one level; false for the whole option disables the rule),
-- merged over the defaults.
local function levels_option(name, defaults)
	local value = module:get_option(name, defaults);
	if value == false then return nil; end
	if type(value) ~= "table" then
		option_error(name, value, "a table like { address = \"20/min\"; [\"ipv6/64\"] = \"20/min\" }, or false");
	end
	local merged = {};
	for k, v in pairs(defaults) do merged[k] = v; end
	for k, v in pairs(value) do merged[k] = v; end
	local levels = sorted_levels(name, merged, function (spec, v, key)
		local rate, burst = nil, nil;
		if type(v) == "string" then rate, burst = engine.parse_rate(v); end
		if not rate then option_error(name .. "[" .. key .. "]", v, "a rate like \"10/min\" or \"3/s burst 10\", or false"); end
		spec.rate, spec.burst, spec.text = rate, burst, v;
	end);
	if #levels > engine.max_levels then
		option_error(name, value, ("at most %d levels (\"address\" counts as two: IPv4 and IPv6)"):format(engine.max_levels));
	end
	return #levels > 0 and levels or nil;
end

-- A table of level -> maximum count (false disables a level).
local function counts_option(name, defaults)
	local value = module:get_option(name, defaults);
	if value == false then return nil; end
	if type(value) ~= "table" then option_error(name, value, "a table like { address = 25 }, or false"); end
	local merged = {};
	for k, v in pairs(defaults) do merged[k] = v; end
	for k, v in pairs(value) do merged[k] = v; end
	local levels = sorted_levels(name, merged, function (spec, v, key)
		if type(v) ~= "number" or v < 1 or v % 1 ~= 0 then
			option_error(name .. "[" .. key .. "]", v, "a positive integer, or false");
		end
		spec.max = v;
	end);
	return #levels > 0 and levels or nil;
end

local function cidr_list_option(name, default)
	local value = module:get_option(name, default);
	if type(value) == "string" then value = { value }; end
	if type(value) ~= "table" then option_error(name, value, "a list of IP addresses or CIDR prefixes"); end
	local list = {};
	for _, text in ipairs(value) do
		local key, bits = engine.prefix(tostring(text));
		if not key then option_error(name, text, "a list of IP addresses or CIDR prefixes"); end
		list[#list+1] = { bits = bits; text = engine.format(key, bits) };
	end
	return list;
end

local function in_list(list, key)
	for _, p in ipairs(list) do
		if engine.format(key, p.bits) == p.text then return true; end
	end
	return false;
end

local function read_config()
	local c = {};
	c.dry_run = boolean_option("native_limits_dry_run", false);
	c.exempt_loopback = boolean_option("native_limits_exempt_loopback", true);
	c.exempt = cidr_list_option("native_limits_exempt", {});
	c.strict = cidr_list_option("native_limits_strict", {});
	local strict_file = module:get_option("native_limits_strict_file");
	if strict_file ~= nil then
		if type(strict_file) ~= "string" then option_error("native_limits_strict_file", strict_file, "a file name"); end
		local path = require "util.paths".resolve_relative_path(prosody.paths.config, strict_file);
		local f, err = io.open(path);
		if not f then option_error("native_limits_strict_file", strict_file, "a readable file (" .. tostring(err) .. ")"); end
		local n = 0;
		for line in f:lines() do
			n = n + 1;
			local text = line:gsub("#.*", ""):match("^%s*(.-)%s*$");
			if text ~= "" then
				local key, bits = engine.prefix(text);
				if not key then
					f:close();
					option_error("native_limits_strict_file", ("%s line %d: %s"):format(path, n, text), "a file of IP addresses or CIDR prefixes");
				end
				c.strict[#c.strict+1] = { bits = bits; text = engine.format(key, bits) };
			end
		end
		f:close();
	end
	c.strict_factor = number_option("native_limits_strict_factor", 0.25, 0.001, 1);
	c.staff = module:get_option_set("native_limits_staff", {});
	c.has_staff = not c.staff:empty();
	c.max_delay = duration_option("native_limits_max_delay", 2, 0, 60);
	c.close_after = number_option("native_limits_close_after", 3, 1, 1000, true);
	c.stanza_close_after = number_option("native_limits_stanza_close_after", 10, 1, 100000, true);
	c.log_interval = duration_option("native_limits_log_interval", 60, 1, 86400);
	c.capacity = number_option("native_limits_capacity", 65536, 64, 2^26, true);
	c.offenders = number_option("native_limits_offenders", 4096, 64, 2^22, true);
	c.ban = {
		ban_strikes = number_option("native_limits_ban_strikes", 3, 1, 1000);
		ban_window = duration_option("native_limits_ban_window", 600, 1, 86400 * 30);
		ban_initial = duration_option("native_limits_ban_initial", 300, 1, 86400 * 365);
		ban_factor = number_option("native_limits_ban_factor", 2, 1, 100);
		ban_max = duration_option("native_limits_ban_max", 86400, 1, 86400 * 365);
		ban_forgive = duration_option("native_limits_ban_forgive", 3600, 1, 86400 * 365);
	};
	if c.ban.ban_max < c.ban.ban_initial then
		option_error("native_limits_ban_max", c.ban.ban_max, "at least native_limits_ban_initial");
	end
	if not is_component then
		c.rules = {
			connections = levels_option("native_limits_connections", {
				address = "30/min burst 30"; ["ipv6/64"] = "30/min burst 30"; ["ipv6/48"] = "120/min burst 60";
				["ipv4/24"] = "120/min burst 60"; global = "50/s burst 200";
			});
			logins = levels_option("native_limits_logins", {
				address = "20/min burst 20"; ["ipv6/64"] = "20/min burst 20"; ["ipv6/48"] = "60/min burst 60";
				["ipv4/24"] = "60/min burst 60"; global = "20/s burst 100";
			});
			stanzas = levels_option("native_limits_stanzas", { address = "50/s burst 200" });
		};
		c.session_stanzas = rate_option("native_limits_session_stanzas", "10/s burst 30");
		c.session_kinds = {
			message = rate_option("native_limits_session_messages", false);
			presence = rate_option("native_limits_session_presences", false);
			iq = rate_option("native_limits_session_iqs", false);
		};
		c.unsolicited = rate_option("native_limits_unsolicited", "10/min burst 5");
		c.max_sessions = counts_option("native_limits_max_sessions", {
			address = 25; ["ipv6/64"] = 25; ["ipv6/48"] = 100; ["ipv4/24"] = 100;
		});
		c.max_unauthenticated = counts_option("native_limits_max_unauthenticated", { address = 10 });
	else
		c.rules = {
			muc_joins = levels_option("native_limits_muc_joins", { address = "20/min burst 25" });
			muc_creations = levels_option("native_limits_muc_creations", { address = "2/10min" });
		};
		c.muc_messages = rate_option("native_limits_muc_messages", "1/s burst 5");
		c.muc_room_joins = rate_option("native_limits_muc_room_joins", false);
		c.muc_max_body = number_option("native_limits_muc_max_body", 5664, 1, 2^31, true);
		c.muc_max_lines = number_option("native_limits_muc_max_lines", 23, 1, 2^31, true);
		c.muc_max_nick = number_option("native_limits_muc_max_nick", 23, 1, 1023, true);
		local ban = module:get_option("native_limits_muc_ban_duration", "escalate");
		c.muc_ban_duration = ban ~= "escalate" and duration_option("native_limits_muc_ban_duration", nil, 1, 86400 * 365) or nil;
	end
	return c;
end

local config = read_config();

-- trusted_proxies (mod_http, global): a BOSH or WebSocket session whose address is one of these
-- means the proxy sent no X-Forwarded-For; never treat the proxy as one client.
local function read_proxies()
	local list = {};
	for _, text in ipairs(module:get_option_array("trusted_proxies", { "127.0.0.1", "::1" })) do
		local key, bits = engine.prefix(text);
		if key then list[#list+1] = { bits = bits; text = engine.format(key, bits) }; end
	end
	return list;
end
local proxies = read_proxies();
local loopback = { { bits = 104; text = "127.0.0.0/8" }, { bits = 128; text = "::1" } };

-- ---------------------------------------------------------------- engine state

-- The engine's own options: a change of any of them needs a new table (see switch_table).
local function table_options(c)
	local o = { capacity = c.capacity; offenders = c.offenders };
	for k, v in pairs(c.ban) do o[k] = v; end
	return o;
end

local function same_options(a, b)
	for k, v in pairs(a) do if b[k] ~= v then return false; end end
	for k in pairs(b) do if a[k] == nil then return false; end end
	return true;
end

local lim_options = table_options(config);
local lim = assert(engine.new(lim_options));
local rule_ids, rule_levels = {}, {};

-- Each bucket's { rate, burst } table: a config reload makes new ones, so a bucket whose table is
-- not the current one takes the new limits (its state kept) the next time it is used.
local bucket_rate = setmetatable({}, { __mode = "k" });

-- The token bucket t[key] for `r` ({ rate, burst }), made on first use.
local function bucket_in(t, key, r)
	local b = t[key];
	if not b then
		b = lim:bucket(r.rate, r.burst);
		t[key] = b;
		bucket_rate[b] = r;
	elseif bucket_rate[b] ~= r then
		b:set(r.rate, r.burst);
		bucket_rate[b] = r;
	end
	return b;
end

local function define_rules()
	for name, levels in pairs(config.rules) do
		local defs = {};
		for i, l in ipairs(levels) do defs[i] = { family = l.family; bits = l.bits; rate = l.rate; burst = l.burst }; end
		rule_ids[name] = lim:rule(name, defs);
		rule_levels[name] = levels;
		if #config.strict > 0 then -- the stricter profile for listed networks: same levels, scaled rates
			local strict = {};
			for i, l in ipairs(defs) do
				strict[i] = { family = l.family; bits = l.bits; rate = l.rate * config.strict_factor;
					burst = math.max(1, math.floor(l.burst * config.strict_factor)) };
			end
			rule_ids[name .. "/strict"] = lim:rule(name .. "/strict", strict);
		else
			rule_ids[name .. "/strict"] = nil;
		end
	end
	for name in pairs(rule_ids) do
		local base = name:gsub("/strict$", "");
		if not config.rules[base] then rule_ids[name] = nil; rule_levels[name] = nil; end
	end
end
define_rules();

module.limiter = lim; -- reachable from the admin shell's Lua: prosody.hosts[host].modules.native_limits.module.limiter

-- ---------------------------------------------------------------- metrics and logging

local m_decisions = module:metric("counter", "decisions", "", "Limit decisions other than allow, by rule and action",
	{ "rule", "action", "mode" });
local m_tracked = module:metric("gauge", "tracked_keys", "", "Rate-table entries in use", {});
local m_capacity = module:metric("gauge", "table_capacity", "", "Rate-table capacity", {});
local m_offenders = module:metric("gauge", "offenders", "", "Addresses and prefixes with strikes or bans", {});
local m_bans = module:metric("gauge", "bans", "", "Active bans", {});
local m_evictions = module:metric("counter", "evictions", "", "Rate-table entries replaced, idle or busy", { "kind" });
local m_exempt = module:metric("counter", "exempt_sessions", "", "Sessions never limited (exempt, loopback, proxy)", { "reason" });
local m_ban_closed = module:metric("counter", "ban_closed_sessions", "", "Open sessions closed because a new ban covers their address",
	{ "transport", "mode" });

local evicted = { idle = 0; busy = 0 }; -- what the counters have of the table's totals (kept across reloads)
module:hook_global("stats-update", function ()
	local s = lim:stats();
	m_tracked:with_labels():set(s.tracked);
	m_capacity:with_labels():set(s.capacity);
	m_offenders:with_labels():set(s.offenders);
	m_bans:with_labels():set(s.bans);
	m_evictions:with_labels("idle"):add(s.evictions_idle - evicted.idle);
	m_evictions:with_labels("busy"):add(s.evictions_busy - evicted.busy);
	evicted.idle, evicted.busy = s.evictions_idle, s.evictions_busy;
end);

local summary = {};
local function count(rule, action)
	m_decisions:with_labels(rule, action, config.dry_run and "dry_run" or "enforce"):add(1);
	local k = rule .. " " .. action;
	summary[k] = (summary[k] or 0) + 1;
end

module:add_timer(config.log_interval, function ()
	local parts = {};
	for k, n in pairs(summary) do parts[#parts+1] = ("%s: %d"):format(k, n); end
	if #parts > 0 then
		table.sort(parts);
		local top = lim:top(1)[1];
		module:log("info", "%sLast %ds: %s%s", config.dry_run and "[dry run] " or "", config.log_interval, table.concat(parts, ", "),
			top and (("; top offender %s (level %d, %.1f strikes%s)"):format(top.prefix, top.level, top.strikes,
				top.ban_left > 0 and (", banned %ds"):format(math.ceil(top.ban_left)) or "")) or "");
		summary = {};
	end
	return config.log_interval;
end);

-- ---------------------------------------------------------------- per-session state

local proxy_warned_at = 0;
local weak_keys = { __mode = "k" };
-- Per-address sets of sessions are held by the sessions' own states (s.sets) and only weakly by the
-- index that finds them: a set lives exactly as long as a session in it, so a flood of addresses
-- that each connect once leaves nothing behind.
local weak_values = { __mode = "v" };
-- Every limited session of this instance (its own c2s sessions; on a component, the sessions that joined one of
-- its rooms without an affiliation there): a new ban closes those it covers. Weak: a destroyed session leaves.
local tracked = setmetatable({}, weak_keys);
local tracked_by_key = setmetatable({}, weak_values); -- address key -> set of those sessions: a ban needs no sweep

-- Puts the session into index[label]'s set (made if need be), which its state `s` then holds.
local function join_set(index, label, session, s)
	local set = index[label];
	if not set then set = setmetatable({}, weak_keys); index[label] = set; end
	set[session] = true;
	local held = s.sets;
	if not held then held = {}; s.sets = held; end
	held[set] = true;
end

-- Takes the session out of every set its state holds (tracking and concurrency).
local function leave_sets(session, s)
	for set in pairs(s.sets or {}) do set[session] = nil; end
end

local function track(session, s)
	if tracked[session] then return; end
	tracked[session] = s;
	join_set(tracked_by_key, s.key, session, s);
end

local function untrack(session)
	local s = tracked[session];
	if not s then return; end
	tracked[session] = nil;
	local set = tracked_by_key[s.key];
	if set then set[session] = nil; end
end

local function transport_of(session)
	if session.websocket_request then return "websocket"; end
	if session.requests or session.bosh_version then return "bosh"; end
	return "tcp";
end

-- Why an address on a transport is never limited, or nil.
local function exemption(key, transport)
	if in_list(config.exempt, key) then return "exempt"; end
	if transport ~= "tcp" and in_list(proxies, key) then return "proxy"; end
	if config.exempt_loopback and in_list(loopback, key) then return "loopback"; end
end

local function is_strict(key)
	return #config.strict > 0 and in_list(config.strict, key);
end

-- The session's limiter key, computed once; false when the session is never limited.
local function session_state(session)
	local s = session[FIELD];
	if s ~= nil then
		-- a session limited by a previous instance (module reload) is tracked again
		if s and not is_component and not tracked[session] then track(session, s); end
		return s or nil;
	end
	if session.outgoing or not (session.type == "c2s" or session.type == "c2s_unauthed") then return nil; end
	local key = session.ip and engine.address(session.ip);
	if not key then
		session[FIELD] = false;
		return nil;
	end
	local transport = transport_of(session);
	local reason = exemption(key, transport);
	if reason == "proxy" and os.time() - proxy_warned_at > 300 then
		proxy_warned_at = os.time();
		module:log("warn", "A %s session comes from %s, a trusted proxy: the proxy sends no X-Forwarded-For, so every "
			.. "client looks alike. Such sessions are not limited by address; fix the proxy configuration.", transport, session.ip);
	end
	if reason then
		m_exempt:with_labels(reason):add(1);
		session[FIELD] = false;
		return nil;
	end
	s = { key = key; ip = session.ip; transport = transport; refused = 0; strict = is_strict(key) };
	session[FIELD] = s;
	if not is_component then track(session, s); end
	return s;
end

local function rule_for(s, name)
	return s.strict and rule_ids[name .. "/strict"] or rule_ids[name];
end

-- Labels of a session's prefix at each configured level, for concurrency sets.
local function level_key(key, level)
	return level.family == "any" and "global" or engine.format(key, level.bits + (level.family == "ipv4" and 96 or 0));
end

local function family_matches(key, level)
	if level.family == "any" then return true; end
	local v4 = key:sub(1, 12) == "\0\0\0\0\0\0\0\0\0\0\255\255";
	return (level.family == "ipv4") == v4;
end

local concurrency = { unauth = setmetatable({}, weak_values), bound = setmetatable({}, weak_values) };

local function live(kind, session)
	if kind == "unauth" then return session.type == "c2s_unauthed" and not session.destroyed; end
	return session.type == "c2s" and not session.destroyed;
end

-- The first level whose count of live sessions would exceed its maximum, or nil.
local function over_concurrency(kind, levels, key)
	if not levels then return nil; end
	for _, level in ipairs(levels) do
		if family_matches(key, level) then
			local set = concurrency[kind][level_key(key, level)];
			local n = 0;
			if set then
				for other in pairs(set) do
					if live(kind, other) then n = n + 1; else set[other] = nil; end
				end
			end
			if n >= level.max then return level, n; end
		end
	end
end

local function add_concurrency(kind, levels, key, session)
	if not levels then return; end
	for _, level in ipairs(levels) do
		if family_matches(key, level) then
			join_set(concurrency[kind], level_key(key, level), session, session[FIELD]);
		end
	end
end

-- ---------------------------------------------------------------- actions

local function banned_text(left)
	return ("Too many violations from your network; try again in %d seconds"):format(math.ceil(left));
end

-- Is the packed address `key` inside the prefix `pkey`/`bits` (bits counted on the 16-byte form)?
local function within(key, pkey, bits)
	local whole = bits // 8;
	if key:sub(1, whole) ~= pkey:sub(1, whole) then return false; end
	local rest = bits % 8;
	if rest == 0 then return true; end
	local mask = (0xff << (8 - rest)) & 0xff;
	return key:byte(whole + 1) & mask == pkey:byte(whole + 1) & mask;
end

-- A new ban of `pkey`/`bits` closes the open sessions it covers (bound, unauthenticated, hibernated; TCP,
-- WebSocket, BOSH). Deferred to the next tick: the ban may be decided inside a hook of one of those sessions, or
-- inside a MUC affiliation change, which should finish first. Bans decided within one tick are handled together:
-- address bans through tracked_by_key, prefix bans (rarer) by one sweep of every tracked session, so a burst of
-- bans costs no more than one sweep per tick.
local pending_bans = nil;

local function close_session(session, s, mode)
	local left = not session.destroyed and session.close and lim:banned(s.key);
	if not left then return 0; end
	m_ban_closed:with_labels(session.hibernating and "hibernated" or s.transport, mode):add(1);
	if not config.dry_run then
		session:close({ condition = "policy-violation"; text = banned_text(left) });
	end
	return 1;
end

local function close_pending_bans()
	local bans = pending_bans;
	pending_bans = nil;
	local mode = config.dry_run and "dry_run" or "enforce";
	local n, prefixes, names = 0, {}, {};
	for _, ban in ipairs(bans) do
		names[#names+1] = engine.format(ban.key, ban.bits);
		if ban.bits == 128 then
			for session in pairs(tracked_by_key[ban.key] or {}) do n = n + close_session(session, tracked[session], mode); end
		else
			prefixes[#prefixes+1] = ban;
		end
	end
	if #prefixes > 0 then
		for session, s in pairs(tracked) do
			for _, ban in ipairs(prefixes) do
				if within(s.key, ban.key, ban.bits) then
					n = n + close_session(session, s, mode);
					break;
				end
			end
		end
	end
	if n > 0 then
		module:log("info", "%s %d open session(s) of %s: banned", config.dry_run and "[dry run] Would have closed" or "Closed", n,
			table.concat(names, ", "));
	end
end

local function close_banned(pkey, bits)
	if not pending_bans then
		pending_bans = {};
		module:add_timer(0, close_pending_bans);
	end
	pending_bans[#pending_bans+1] = { key = pkey; bits = bits };
end

local function close(session, rule, text)
	count(rule, "close");
	if config.dry_run then return; end
	session:close({ condition = "policy-violation"; text = text });
end

-- A strike against the address; may start a ban (logged: bans are rare), and on its /64 or /24.
local function strike(s, rule)
	local ban, strikes, level, started = lim:strike(s.key);
	if strikes == 1 and level == 0 then
		module:log("info", "First offence from %s (%s)", s.ip, rule);
	end
	if started then -- not while a ban runs: that offence only counts, or one address would ban its prefix
		count(rule, "ban");
		module:log("info", "%sBanned %s for %ds (level %d) after repeated %s violations", config.dry_run and "[dry run] " or "",
			s.ip, math.floor(ban), level, rule);
		local v4 = s.key:sub(1, 12) == "\0\0\0\0\0\0\0\0\0\0\255\255";
		local pbits = v4 and 120 or 64;
		local pban, _, plevel, pstarted = lim:strike(s.key, pbits); -- three banned addresses ban the prefix
		if pstarted then
			count(rule, "ban");
			module:log("info", "Banned %s for %ds (level %d): several banned addresses in it", engine.format(s.key, pbits),
				math.floor(pban), plevel);
			close_banned(s.key, pbits);
		else
			close_banned(s.key, 128);
		end
	end
	return ban;
end

-- Is this code running in the session's own runner, where it may sleep? BOSH opens its stream from
-- inside the XML parser, in the HTTP request's runner: a sleep there would yield across the parser
-- (a C call), which fails the request with a 500.
local function in_own_runner(session)
	local runner = session.thread;
	return runner ~= nil and async.ready() and runner.thread == coroutine.running();
end

-- Delays the session's processing (and, on a socket, its reading) for `seconds`; where it cannot
-- wait (see in_own_runner), the event goes ahead at once, its slot already reserved. Returns true
-- when the session was closed meanwhile: the event must then stop (a destroyed session has no host
-- to route from).
local function delay(session, rule, seconds)
	count(rule, "delay");
	if config.dry_run or seconds <= 0 or not in_own_runner(session) then return false; end
	local conn = session.conn;
	local paused = conn and transport_of(session) ~= "bosh" and conn.pause and pcall(conn.pause, conn);
	async.sleep(seconds);
	if session.destroyed then return true; end
	if paused and conn.resume then pcall(conn.resume, conn); end
	return false;
end

local function check_ban(session, s, rule)
	local left = lim:banned(s.key);
	if left then
		count(rule, "refuse_banned");
		if not config.dry_run then
			close(session, rule, banned_text(left));
			return true;
		end
	end
end

-- ---------------------------------------------------------------- the anonymous VirtualHost

if not is_component then
	-- Stream open: bans, unauthenticated sessions, connection rate.
	module:hook("stream-features", function (event)
		local session = event.origin;
		local s = session_state(session);
		if not s or s.opened then return; end
		s.opened = true;
		if check_ban(session, s, "connections") then return true; end
		local level, n = over_concurrency("unauth", config.max_unauthenticated, s.key);
		if level then
			count("max_unauthenticated", "close");
			module:log("debug", "%s has %d unauthenticated sessions (%s limit %d)", s.ip, n, level.label, level.max);
			if not config.dry_run then
				session:close({ condition = "policy-violation"; text = "Too many unauthenticated connections from your address" });
				return true;
			end
		end
		add_concurrency("unauth", config.max_unauthenticated, s.key, session);
		local rule = rule_for(s, "connections");
		if not rule then return; end
		local ok, wait = lim:check(rule, s.key, 1, config.max_delay);
		if ok then
			if wait > 0 and delay(session, "connections", wait) then return true; end
			return;
		end
		count("connections", "refuse");
		strike(s, "connections");
		if not config.dry_run then
			session:close({ condition = "policy-violation";
				text = ("Too many connections from your network; try again in %d seconds"):format(math.ceil(wait)) });
			return true;
		end
	end, 200);

	-- SASL: the login rate (every mechanism; on an anonymous host that is ANONYMOUS).
	module:hook("stanza/" .. xmlns_sasl .. ":auth", function (event)
		local session = event.origin;
		local s = session_state(session);
		if not s then return; end
		if check_ban(session, s, "logins") then return true; end
		local rule = rule_for(s, "logins");
		if not rule then return; end
		local ok, wait = lim:check(rule, s.key, 1, config.max_delay);
		if ok then
			if wait > 0 and delay(session, "logins", wait) then return true; end
			return;
		end
		count("logins", "refuse");
		strike(s, "logins");
		if config.dry_run then return; end
		s.refused = s.refused + 1;
		if s.refused >= config.close_after then
			close(session, "logins", "Too many refused logins");
			return true;
		end
		session.send(st.stanza("failure", { xmlns = xmlns_sasl }):tag("temporary-auth-failure"):up()
			:tag("text"):text(("Too many logins from your network; try again in %d seconds"):format(math.ceil(wait))));
		return true;
	end, 100);

	module:hook("authentication-success", function (event)
		local s = session_state(event.session);
		if s and config.max_sessions then s.authenticated = true; end
	end);

	-- Resource bind: concurrent bound sessions (hibernated stream-management sessions stay bound).
	module:hook("pre-resource-bind", function (event)
		local session = event.session;
		local s = session_state(session);
		if not s then return; end
		local level, n = over_concurrency("bound", config.max_sessions, s.key);
		if level then
			count("max_sessions", "refuse");
			module:log("debug", "%s has %d sessions (%s limit %d)", s.ip, n, level.label, level.max);
			if not config.dry_run then
				event.error = { type = "wait"; condition = "resource-constraint";
					text = "Too many sessions from your network" };
				return false;
			end
		end
	end, 100);

	module:hook("resource-bind", function (event)
		local s = session_state(event.session);
		if s then add_concurrency("bound", config.max_sessions, s.key, event.session); end
	end);

	-- A resumed stream-management session goes on over the new connection, from its address; the
	-- temporary session that brought that connection stays behind with it and must not be what a
	-- ban closes (that would only send the resumed session back into hibernation).
	module:hook("smacks-hibernation-end", function (event)
		local carrier, resumed = event.origin, event.resumed;
		if not (carrier and resumed) or carrier == resumed then return; end
		local s = carrier[FIELD];
		untrack(carrier);
		if s == nil then return; end
		untrack(resumed);
		local old = resumed[FIELD];
		if old then leave_sets(resumed, old); end -- it counts under its new address now
		resumed[FIELD] = s;
		if s then
			track(resumed, s);
			add_concurrency("bound", config.max_sessions, s.key, resumed);
		end
	end);

	local function refuse_stanza(session, stanza, text)
		local t = stanza.attr.type;
		if t == "error" or (stanza.name == "iq" and t == "result") then return; end
		session.send(st.error_reply(stanza, "wait", "policy-violation", text, host));
	end

	-- Is `to` (any JID) one of the staff's? They are bare JIDs, and a JID's resource starts at its
	-- first "/": this is util.jid.bare's answer for them without its cost, a third of a stanza's check.
	local function to_staff(to)
		if not to or not config.has_staff then return false; end
		local slash = to:find("/", 1, true);
		return config.staff:contains(slash and to:sub(1, slash - 1) or to);
	end

	-- Every stanza of a session: its own budget, then its address's.
	module:hook("pre-stanza", function (event)
		local session, stanza = event.origin, event.stanza;
		local s = session_state(session);
		if not s then return; end
		if to_staff(stanza.attr.to) then return; end
		local ok, wait, rule = true, 0, nil;
		if config.session_stanzas then
			ok, wait = bucket_in(s, "bucket", config.session_stanzas):take(1, config.max_delay);
			rule = "session_stanzas";
		end
		local kind_rate = config.session_kinds[stanza.name];
		if ok and kind_rate then
			local buckets = s.kind_buckets;
			if not buckets then buckets = {}; s.kind_buckets = buckets; end
			local ok2, wait2 = bucket_in(buckets, stanza.name, kind_rate):take(1, config.max_delay);
			if not ok2 or wait2 > wait then ok, wait, rule = ok2, wait2, "session_" .. stanza.name; end
		end
		local r = rule_for(s, "stanzas");
		if ok and r then
			-- bound once per session (and rule, table and max_delay, which a reload may change)
			if s.stanza_rule ~= r or s.stanza_lim ~= lim or s.stanza_max_delay ~= config.max_delay then
				s.stanza_rule, s.stanza_lim, s.stanza_max_delay = r, lim, config.max_delay;
				s.stanza_check = lim:handle(r, s.key, config.max_delay);
			end
			local ok2, wait2 = s.stanza_check();
			if not ok2 or wait2 > wait then ok, wait, rule = ok2, wait2, "stanzas"; end
		end
		if ok then
			if wait > 0 and delay(session, rule, wait) then return true; end
			return;
		end
		count(rule, "refuse");
		if config.dry_run then return; end
		s.refused = s.refused + 1;
		if s.refused >= config.stanza_close_after then
			strike(s, rule);
			close(session, rule, "Too many stanzas; slow down");
			return true;
		end
		refuse_stanza(session, stanza, "You are sending too fast; slow down");
		return true;
	end, 100);

	-- Messages to JIDs that are neither rooms the session joined (directed presence) nor staff.
	local function unsolicited(event)
		local session, stanza = event.origin, event.stanza;
		if not config.unsolicited then return; end
		local t = stanza.attr.type;
		if t == "error" or t == "groupchat" then return; end
		local s = session_state(session);
		if not s then return; end
		local to = jid_bare(stanza.attr.to or "");
		if not to or to == "" or config.staff:contains(to) then return; end
		if session.directed then
			for full in pairs(session.directed) do
				if jid_bare(full) == to then return; end
			end
		end
		if bucket_in(s, "unsolicited_bucket", config.unsolicited):take() then return; end
		count("unsolicited", "refuse");
		if config.dry_run then return; end
		session.send(st.error_reply(stanza, "wait", "policy-violation",
			"Too many messages to people you have not talked to; slow down", host));
		return true;
	end
	module:hook("pre-message/bare", unsolicited, 100);
	module:hook("pre-message/full", unsolicited, 100);
end

-- ---------------------------------------------------------------- the MUC component

if is_component then
	local recent = cache.new(1000); -- real bare JID -> address key, for bans of occupants who left

	-- Key for a MUC event's sender: only local c2s sessions have an address we trust.
	local function origin_state(origin)
		if not origin or origin.type ~= "c2s" then return nil; end
		return session_state(origin);
	end

	local function muc_error(event, etype, condition, text)
		local reply = st.error_reply(event.stanza, etype, condition, text, event.room and event.room.jid or host);
		-- (error_reply leaves its cursor inside <error/>; the <x/> belongs to the presence)
		if event.stanza.name == "presence" then reply:up():tag("x", { xmlns = "http://jabber.org/protocol/muc" }):up(); end
		event.origin.send(reply);
		return true;
	end

	local function affiliated(room, jid)
		local a = room:get_affiliation(jid);
		return a == "owner" or a == "admin" or a == "member";
	end

	-- One join budget per room, whoever joins: a flood from many addresses. Weak keys: an evicted room forgets it.
	local room_buckets = setmetatable({}, weak_keys);

	local function room_join_allowed(room)
		local r = config.muc_room_joins;
		if not r then return true; end
		return bucket_in(room_buckets, room, r):take();
	end

	-- (new limits reach the buckets through bucket_in; turned off, they are forgotten)
	module:hook_global("config-reloaded", function ()
		if config.muc_room_joins then return; end
		for room in pairs(room_buckets) do room_buckets[room] = nil; end
	end, -1); -- after the options are re-read (priority 0)

	local function refuse_long_nick(event)
		local nick = jid_resource(event.stanza.attr.to) or "";
		if not (utf8.len(nick) and utf8.len(nick) > config.muc_max_nick) then return; end
		count("muc_nick", "refuse");
		if not config.dry_run then return muc_error(event, "modify", "policy-violation", "Your nickname is too long"); end
	end

	-- A nickname change is held to the same length as a join's.
	module:hook("muc-occupant-pre-change", function (event)
		if event.orig_occupant.nick == event.dest_occupant.nick then return; end
		if not origin_state(event.origin) or affiliated(event.room, event.stanza.attr.from) then return; end
		return refuse_long_nick(event);
	end, 20);

	module:hook("muc-occupant-pre-join", function (event)
		local s = origin_state(event.origin);
		if not s then return; end
		recent:set(jid_bare(event.stanza.attr.from), s.key);
		if affiliated(event.room, event.stanza.attr.from) then return; end
		track(event.origin, s);
		local left = lim:banned(s.key);
		if left then
			count("muc_joins", "refuse_banned");
			if not config.dry_run then
				return muc_error(event, "auth", "forbidden",
					("You are banned from this service for %d more seconds"):format(math.ceil(left)));
			end
		end
		if refuse_long_nick(event) then return true; end
		local rule = rule_for(s, "muc_joins");
		if rule then
			local ok, wait = lim:check(rule, s.key);
			if not ok then
				count("muc_joins", "refuse");
				strike(s, "muc_joins");
				if not config.dry_run then
					return muc_error(event, "wait", "policy-violation",
						("Too many joins from your network; try again in %d seconds"):format(math.ceil(wait)));
				end
			end
		end
	end, 20);

	-- The room's own join rate, after the per-address one (an address refused there spends no room budget).
	-- Every sender counts, local or remote; no strike: the joiner did nothing wrong by itself.
	module:hook("muc-occupant-pre-join", function (event)
		if not config.muc_room_joins or affiliated(event.room, event.stanza.attr.from) then return; end
		local origin = event.origin;
		if origin and origin.type == "c2s" and not session_state(origin) then return; end -- exempt addresses
		local ok, wait = room_join_allowed(event.room);
		if ok then return; end
		count("muc_room_joins", "refuse");
		if not config.dry_run then
			return muc_error(event, "wait", "resource-constraint",
				("This room has too many people joining right now; try again in %d seconds"):format(math.max(1, math.ceil(wait))));
		end
	end, 19);

	module:hook("muc-room-pre-create", function (event)
		local s = origin_state(event.origin);
		if not s then return; end
		local rule = rule_for(s, "muc_creations");
		if not rule then return; end
		local ok, wait = lim:check(rule, s.key);
		if ok then return; end
		count("muc_creations", "refuse");
		if not config.dry_run then
			return muc_error(event, "wait", "policy-violation",
				("Too many new rooms from your network; try again in %d seconds"):format(math.ceil(wait)));
		end
	end, 20);

	module:hook("muc-occupant-groupchat", function (event)
		local s = origin_state(event.origin);
		if not s then return; end
		local occupant = event.occupant;
		if (occupant and occupant.role == "moderator") or affiliated(event.room, event.from) then return; end
		local body = event.stanza:get_child_text("body");
		if body then
			local _, lines = body:gsub("\n", "");
			if (utf8.len(body) or #body) > config.muc_max_body or lines + 1 > config.muc_max_lines then
				count("muc_size", "refuse");
				if not config.dry_run then return muc_error(event, "modify", "policy-violation", "Your message is too long"); end
			end
		end
		if not config.muc_messages then return; end
		local buckets = s.muc_buckets; -- one budget per occupant: this session in this room
		if not buckets then buckets = {}; s.muc_buckets = buckets; end
		if bucket_in(buckets, event.room.jid, config.muc_messages):take() then return; end
		count("muc_messages", "refuse");
		if not config.dry_run then
			s.refused = s.refused + 1;
			if s.refused % config.stanza_close_after == 0 then strike(s, "muc_messages"); end
			return muc_error(event, "wait", "policy-violation", "You are sending messages too fast; slow down");
		end
	end, 20);

	-- A moderator's ban of an occupant bans its address (an anonymous JID is thrown away with a page reload).
	module:hook("muc-set-affiliation", function (event)
		if event.affiliation ~= "outcast" or event.previous_affiliation == "outcast" then return; end
		local keys = {};
		local bare = prosody.bare_sessions[event.jid];
		if bare then
			for _, session in pairs(bare.sessions) do
				local s = session_state(session);
				if s then keys[s.key] = s.ip; end
			end
		end
		local key = recent:get(event.jid);
		if key and not keys[key] then keys[key] = engine.format(key); end
		for k, ip in pairs(keys) do
			local seconds = lim:ban(k, 128, config.muc_ban_duration);
			if seconds then close_banned(k, 128); end
			count("muc_ban", "ban");
			module:log("info", "%sBanned %s for %ds: %s was banned from %s", config.dry_run and "[dry run] " or "", ip,
				math.floor(seconds or 0), event.jid, event.room.jid);
		end
	end);
end

-- ---------------------------------------------------------------- hot reload, state across reloads

-- Open sessions follow changed lists: the strict networks (a session's rule is looked up per
-- check) and the exemptions, both ways. Unauthenticated sessions becoming limited are left alone:
-- only bound ones can be found, and the others are short-lived.
local function reclassify_open_sessions()
	for session, s in pairs(tracked) do
		if exemption(s.key, s.transport) then
			session[FIELD] = false;
			untrack(session);
			leave_sets(session, s);
		else
			s.strict = is_strict(s.key);
		end
	end
	for _, session in pairs(prosody.full_sessions) do
		if session[FIELD] == false then
			local key = session.ip and engine.address(session.ip);
			if key and not exemption(key, transport_of(session)) then
				session[FIELD] = nil; -- a component looks again at its next MUC event
				if not is_component then session_state(session); end -- tracked now: a ban closes it
			end
		end
	end
end

-- Moves onto a table made with the current options, taking over `old`'s bans, strikes and busy
-- budgets: how a new capacity or new ban options apply on a reload without forgetting anyone.
local function switch_table(old)
	lim_options = table_options(config);
	lim = assert(engine.new(lim_options));
	module.limiter = lim;
	define_rules();
	local rates, offenders, dropped = lim:absorb(old);
	local s = lim:stats(); -- the eviction counters go on from here: the copy's evictions are not news
	evicted.idle, evicted.busy = s.evictions_idle, s.evictions_busy;
	module:log("info", "New limiter table (%d entries, %d offender entries): kept %d budgets and %d offenders, dropped %d",
		s.capacity, s.offender_capacity, rates, offenders, dropped);
end

-- A dry run records strikes and bans to tell what it would have done; once it is over they are
-- forgotten, or switching to enforcement would ban at once everyone the dry run only counted.
local function end_dry_run()
	local n = lim:unban(string.rep("\0", 16), 0);
	module:log("info", "Dry run over: forgot %d simulated offender entries (strikes and bans)", n);
end

module:hook_global("config-reloaded", function ()
	local ok, new = pcall(read_config);
	if not ok then
		module:log("error", "Keeping the previous limits: %s", new);
		return;
	end
	local was_dry_run = config.dry_run;
	config = new;
	proxies = read_proxies();
	if same_options(table_options(config), lim_options) then
		define_rules();
	else
		switch_table(lim);
	end
	reclassify_open_sessions();
	if was_dry_run and not config.dry_run then end_dry_run(); end
	module:log("info", "Limits reloaded%s", config.dry_run and " (dry run)" or "");
end);

function module.save()
	return { limiter = lim; options = lim_options; dry_run = config.dry_run; evicted = evicted; concurrency = concurrency };
end

function module.restore(state)
	if state and state.limiter then
		evicted = state.evicted or evicted; -- the counters survive a reload: they already hold these
		concurrency = state.concurrency or concurrency; -- the open sessions keep counting
		if same_options(state.options or {}, lim_options) then
			lim = state.limiter;
			module.limiter = lim;
			define_rules();
		else
			switch_table(state.limiter);
		end
		if state.dry_run and not config.dry_run then end_dry_run(); end
	end
	-- the bound sessions limited by the previous instance, hibernated ones included, are tracked
	-- again, so that a ban still closes them
	local this_host = not is_component and prosody.hosts[host];
	for _, user in pairs(this_host and this_host.sessions or {}) do
		for _, session in pairs(user.sessions or {}) do
			if session[FIELD] then session_state(session); end
		end
	end
end

-- ---------------------------------------------------------------- admin shell

local instances = module:shared("/*/native_limits/instances");
instances[host] = {
	get = function () return lim; end;
	dry_run = function () return config.dry_run; end;
	close_banned = close_banned;
};

local function each_instance(only)
	local hosts = {};
	for h in pairs(instances) do
		if not only or only == h then hosts[#hosts+1] = h; end
	end
	table.sort(hosts);
	local i = 0;
	return function ()
		i = i + 1;
		local h = hosts[i];
		if h then return h, instances[h].get(); end
	end;
end

local function parse_target(text)
	local key, bits = engine.prefix(tostring(text or ""));
	if not key then return nil, ("%q is not an IP address or CIDR prefix"):format(tostring(text)); end
	return key, bits;
end

local commands = {};

function commands:show(target, only_host)
	local key, bits = parse_target(target);
	if not key then return nil, bits; end
	local print = self.session.print;
	for h, l in each_instance(only_host) do
		local info = l:show(key, bits);
		local left, bbits = l:banned(key);
		print(("%s: %s %s"):format(h, engine.format(key, bits),
			left and ("banned %ds (as %s)"):format(math.ceil(left), engine.format(key, bbits)) or "not banned"));
		for _, o in ipairs(info.offenders) do
			print(("  offender %-24s level %d  strikes %.2f  refused %d  bans %d%s"):format(o.prefix, o.level, o.strikes,
				o.refused, o.bans, o.ban_left > 0 and ("  banned %ds"):format(math.ceil(o.ban_left)) or ""));
		end
		for _, r in ipairs(info.rules) do
			print(("  %-16s %-24s %.1f of %d left"):format(r.rule, r.prefix, r.tokens, r.burst));
		end
	end
	return true, "Shown";
end

function commands:top(n, only_host)
	n = tonumber(n) or 10;
	local print = self.session.print;
	for h, l in each_instance(only_host) do
		local list = l:top(n);
		print(("%s: %d offender(s)"):format(h, #list));
		for _, o in ipairs(list) do
			print(("  %-24s level %d  strikes %.2f  refused %d  bans %d%s"):format(o.prefix, o.level, o.strikes, o.refused,
				o.bans, o.ban_left > 0 and ("  banned %ds"):format(math.ceil(o.ban_left)) or ""));
		end
	end
	return true, "Listed";
end

function commands:ban(target, duration, only_host)
	local key, bits = parse_target(target);
	if not key then return nil, bits; end
	local seconds = duration ~= nil and parse_duration(duration) or nil;
	if duration ~= nil and not (seconds and seconds > 0) then return nil, ("%q is not a duration"):format(tostring(duration)); end
	local done = 0;
	for h, l in each_instance(only_host) do
		local ok, err = l:ban(key, bits, seconds);
		if not ok then return nil, err; end
		instances[h].close_banned(key, bits);
		done = done + 1;
	end
	return true, ("Banned %s on %d host(s)"):format(engine.format(key, bits), done);
end

function commands:unban(target, only_host)
	local key, bits = parse_target(target);
	if not key then return nil, bits; end
	local n = 0;
	for _, l in each_instance(only_host) do n = n + l:unban(key, bits); end
	return true, ("Unbanned %s (%d entries)"):format(engine.format(key, bits), n);
end

function commands:reset(target, only_host)
	local n = 0;
	if target == nil then
		for _, l in each_instance(only_host) do n = n + l:reset(); end
		return true, ("Reset everything (%d entries)"):format(n);
	end
	local key, bits = parse_target(target);
	if not key then return nil, bits; end
	for _, l in each_instance(only_host) do n = n + l:reset(key, bits); end
	return true, ("Reset %s (%d entries)"):format(engine.format(key, bits), n);
end

-- Help text and arguments, for Prosody 13's shell-command items (help, `prosodyctl shell limits top 10`).
local command_help = {
	{ "show", "Show ban state, offender entries and the budget left at every rule level",
		{ { name = "address_or_prefix", type = "string" }, { name = "host", type = "string" } } };
	{ "top", "List offenders: banned first, then by level, strikes and refusals",
		{ { name = "n", type = "number" }, { name = "host", type = "string" } } };
	{ "ban", "Ban an address or prefix now (for a duration like \"1h\", or the escalating duration) and close its sessions",
		{ { name = "address_or_prefix", type = "string" }, { name = "duration", type = "string" }, { name = "host", type = "string" } } };
	{ "unban", "Forget bans, strikes and levels inside an address or prefix",
		{ { name = "address_or_prefix", type = "string" }, { name = "host", type = "string" } } };
	{ "reset", "Forget all limiter state (or that inside an address or prefix)",
		{ { name = "address_or_prefix", type = "string" }, { name = "host", type = "string" } } };
};

-- Prosody 13 registers shell commands as "shell-command" items; 0.12 has only the shell's shared env table.
local major = tonumber(tostring(prosody.version or ""):match("^(%d+)%."));
local shell_items = not major or major >= 13; -- trunk/nightly builds report no number and are 13-style

-- The commands act on every instance through `instances`, so one registration serves all hosts. It is made in the
-- global context: a host module's items need a host_selector argument on 13, which would make `host` mandatory.
-- Its own items table keeps it out of this host's item list, which 13 would unregister when this host unloads.
local shell = module:shared("/*/native_limits/shell");

local function register_shell()
	if not shell_items then -- any instance's table serves: the last one loaded is kept
		shell.commands = commands;
		module:shared("/*/admin_shell/env").limits = commands;
		return;
	end
	if shell.context then return; end
	local context = setmetatable({ host = "*"; global = true; items = {} }, { __index = module });
	shell.context, shell.items = context, {};
	for _, c in ipairs(command_help) do
		local name = c[1];
		local item = { section = "limits"; section_desc = "Abuse limits of anonymous hosts (mod_native_limits)";
			name = name; desc = c[2]; args = c[3]; handler = commands[name] };
		shell.items[#shell.items+1] = item;
		context:add_item("shell-command", item);
	end
end

local function unregister_shell()
	if not shell_items then
		local env = module:shared("/*/admin_shell/env");
		if env.limits == shell.commands then env.limits = nil; end
		shell.commands = nil;
		return;
	end
	local context = shell.context;
	if not context then return; end
	for _, item in ipairs(shell.items) do context:remove_item("shell-command", item); end
	shell.context, shell.items = nil, nil;
end

register_shell();

-- 13: mod_admin_shell (re)loaded after this module only sees items of loaded modules; offer ours again.
module:hook_global("module-loaded", function (event)
	if shell_items and event.module == "admin_shell" and shell.context then
		for _, item in ipairs(shell.items) do shell.context:fire_event("item-added/shell-command", { source = module; item = item }); end
	end
end);

function module.unload()
	instances[host] = nil;
	if next(instances) == nil then unregister_shell(); end
end

module:log("info", "Limits active%s (%d-entry table)", config.dry_run and " in dry-run mode" or "", lim:stats().capacity);
