-- mod_native_dane: DANE for outgoing server-to-server connections (RFC 6698, 7671,
-- 7673), failing closed where the RFCs say so, with per-domain policy, metrics and a
-- `check` command. Resolution and policy live here (through lua-unbound with DNSSEC
-- status, as Prosody's net.adns); matching TLSA records against the peer's chain is
-- the prosody_native.dane engine's job, on OpenSSL's DANE engine, after the handshake,
-- so it works on every network backend. A decision lives as long as the records it rests
-- on (their RRSIGs' original TTLs), and a target that fails DANE hands its queued stanzas
-- on to the next SRV target.
-- luacheck: globals prosody

module:set_global();

local st = require "util.stanza";
local async = require "util.async";
local promise = require "util.promise";
local configmanager = require "core.configmanager";
local hex = require "util.hex";
local pton = require "util.net".pton;
local xml_parse = require "util.xml".parse;
local engine = module:require("prosody_native_loader").load("dane");

local POLICIES = { required = true; opportunistic = true; off = true };

-- Options: each is checked here, so a bad value stops the module with its name.
local option_error = module:require("prosody_native_options").fail;

local function policy_value(name, value)
	if not POLICIES[value] then
		option_error(name, value, 'one of "off", "opportunistic", "required"');
	end
	return value;
end

local options, verifier;

local function read_options()
	local o = {};
	o.policy = policy_value("dane_policy", module:get_option("dane_policy", "opportunistic"));
	o.domains = {};
	local domains = module:get_option("dane_domain_policy", {});
	if type(domains) ~= "table" then
		option_error("dane_domain_policy", domains, 'a table of domain = "off" | "opportunistic" | "required"');
	end
	for domain, policy in pairs(domains) do
		if type(domain) ~= "string" then
			option_error("dane_domain_policy", domain, "keyed by domain names");
		end
		o.domains[domain:lower()] = policy_value(("dane_domain_policy[%q]"):format(domain), policy);
	end
	local default_ca = "/etc/ssl/certs/ca-certificates.crt";
	local cafile = module:get_option("dane_cafile", default_ca);
	if cafile ~= false and type(cafile) ~= "string" then
		option_error("dane_cafile", cafile, "a file of trusted CA certificates, or false");
	end
	if cafile == default_ca then
		local fh = io.open(default_ca);
		if fh then fh:close(); else cafile = false; end
	end
	o.cafile = cafile or nil;
	o.ee_namechecks = module:get_option("dane_ee_namechecks", false);
	if type(o.ee_namechecks) ~= "boolean" then
		option_error("dane_ee_namechecks", o.ee_namechecks, "true or false");
	end
	o.incoming = module:get_option("dane_incoming", false);
	if type(o.incoming) ~= "boolean" then
		option_error("dane_incoming", o.incoming, "true or false");
	end
	o.cache_ttl = module:get_option("dane_cache_ttl", 60);
	if type(o.cache_ttl) ~= "number" or o.cache_ttl < 0 or o.cache_ttl > 86400 then
		option_error("dane_cache_ttl", o.cache_ttl, "a number of seconds from 0 to 86400");
	end
	o.resolve_timeout = module:get_option("dane_resolve_timeout", 30);
	if type(o.resolve_timeout) ~= "number" or o.resolve_timeout <= 0 or o.resolve_timeout > 600 then
		option_error("dane_resolve_timeout", o.resolve_timeout, "a number of seconds from 0 to 600");
	end
	o.check_timeout = module:get_option("dane_check_timeout", 10);
	if type(o.check_timeout) ~= "number" or o.check_timeout <= 0 or o.check_timeout > 300 then
		option_error("dane_check_timeout", o.check_timeout, "a number of seconds from 0 to 300");
	end
	o.rrsig_warn_days = module:get_option("dane_check_rrsig_warn", 7);
	if type(o.rrsig_warn_days) ~= "number" or o.rrsig_warn_days < 0 or o.rrsig_warn_days > 365 then
		option_error("dane_check_rrsig_warn", o.rrsig_warn_days, "a number of days from 0 to 365");
	end
	local v, err = engine.new({ cafile = o.cafile; ee_namechecks = o.ee_namechecks });
	if not v then
		option_error("dane_cafile", o.cafile, "a readable file of CA certificates (" .. tostring(err) .. ")");
	end
	if verifier then verifier:close(); end
	options, verifier = o, v;
end

-- Without a trust anchor libunbound answers everything "insecure": DANE would never apply.
local function check_resolver()
	local ok_unbound = pcall(require, "lunbound");
	if not ok_unbound then
		return nil, "lua-unbound is not installed: no DNSSEC status, DANE cannot apply (apt install lua-unbound)";
	end
	local ub = configmanager.get("*", "unbound");
	if type(ub) == "table" and type(ub.trusted) == "table" then
		return nil, "the 'unbound' option's 'trusted' must be one string, not an array (lua-unbound 1.0 fails at the first lookup)";
	end
	local uo = type(ub) == "table" and type(ub.options) == "table" and ub.options or {};
	if not (type(ub) == "table" and ub.trusted) and not (uo["trust-anchor-file:"] or uo["auto-trust-anchor-file:"]
	or uo["trust-anchor:"] or uo["trusted-keys-file:"]) then
		return nil, "no DNSSEC trust anchor in the 'unbound' option (trusted = \"<DS record>\", or "
			.. "options = { [\"trust-anchor-file:\"] = \"/usr/share/dns/root.key\" }): every answer will be insecure and DANE will never apply";
	end
	return true;
end

read_options();
do
	local ok, err = check_resolver();
	if not ok then
		module:log("error", "DANE is inactive: %s", err);
		module:set_status("error", err);
	else
		module:log("info", "DANE for s2s: default policy %s, %s%s", options.policy, engine.openssl_version(),
			options.cafile and (", PKIX trust store " .. options.cafile) or ", no PKIX trust store");
	end
end

module:hook_global("config-reloaded", function ()
	local ok, err = pcall(read_options);
	if not ok then module:log("error", "Keeping the previous DANE options: %s", err); end
end);

local function policy_for(domain)
	return options.domains[domain:lower()] or options.policy;
end

-- Metrics -------------------------------------------------------------------------

local m_outcome = module:metric("counter", "outcomes", "", "DANE outcomes of outgoing s2s connections", { "outcome" });
local m_incoming = module:metric("counter", "incoming_outcomes", "", "DANE outcomes of incoming s2s connections", { "outcome" });
local m_refused = module:metric("counter", "refused", "", "Outgoing s2s connections refused by DANE policy", { "reason" });
local m_fallback = module:metric("counter", "fallbacks", "", "Queued stanzas moved to the next SRV target after a DANE failure", { "reason" });
local m_verify = module:metric("histogram", "verify_duration", "seconds", "Time to verify a peer chain against TLSA records", {},
	{ buckets = { 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05 } }):with_labels();
local clock = require "util.time".monotonic; -- expiry must not follow the wall clock's steps

-- Resolution (RFC 7673) --------------------------------------------------------------

-- DNSSEC status of one answer from net.unbound (bogus data is already discarded there).
local function dnssec_status(answer, err)
	if not answer then return "error", tostring(err or "no answer"); end
	if answer.bogus then return "bogus", tostring(answer.bogus); end
	if answer.rcode and answer.rcode ~= 0 and answer.rcode ~= 3 then -- NoError, NXDomain
		return "error", tostring(answer.status or ("rcode " .. answer.rcode));
	end
	if answer.secure then return "secure"; end
	return "insecure";
end

-- lookup_all({ { qname, qtype }, ... }) -> { { answer, err }, ... }, in one of two ways:
-- inside an async runner (routing, the admin shell) or blocking (prosodyctl).
local function async_lookup_all(queries)
	local resolver = require "net.adns".resolver();
	local pending = {};
	for i, q in ipairs(queries) do
		pending[i] = promise.new(function (resolve)
			local id, err = resolver:lookup(function (answer, lerr) resolve({ answer, lerr }); end, q[1], q[2], "IN");
			if not id and err then resolve({ nil, err }); end
		end);
	end
	local results = async.wait_for(promise.all(pending));
	return results;
end

local function sync_lookup_all(queries)
	local dns = require "net.unbound".dns;
	local results = {};
	for i, q in ipairs(queries) do
		local answer, err = dns.lookup(q[1], q[2]);
		results[i] = { answer, err };
	end
	return results;
end

-- Lifetime of a decision (RFC 4034 3.1.4, 3.1.5): lua-unbound 1.0 hands over neither TTLs
-- nor answer packets, but every signed RRset carries its original TTL and its signature
-- expiration in the RRSIGs at its owner name, which a query of type RRSIG returns.
local T_A, T_AAAA, T_SRV, T_TLSA, T_NSEC = 1, 28, 33, 52, 47;

-- bound(lifetime, answer of an RRSIG query, { covered type = what }, now) folds the
-- original TTLs and expirations of the signatures over those types into lifetime
-- { ttl, why, expires }. Only ever shortens: an unvalidated RRSIG answer cannot extend
-- a decision beyond dane_cache_ttl.
local function bound(life, sigs, covered, now)
	for _, rr in ipairs(sigs or {}) do
		local raw = rr.rrsig and rr.rrsig.raw;
		if raw and #raw >= 18 then
			local ctype, _, _, ttl, expires = string.unpack(">I2BBI4I4", raw);
			local what = covered[ctype];
			if what then
				if ttl < life.ttl then
					life.ttl, life.why = ttl, ("TTL %d of %s"):format(ttl, what);
				end
				-- RFC 1982 serial arithmetic is overkill until 2106: plain seconds
				if expires - now < life.ttl then
					life.ttl, life.why = math.max(0, expires - now), ("RRSIG expiry of %s"):format(what);
				end
				if not life.expires or expires < life.expires then life.expires = expires; end
			end
		end
	end
end

-- What DNSSEC says about domain: outcome "dane" (some target has secure usable-looking
-- TLSA), "insecure", "no-tlsa", or a refusal (bogus, resolution-error) with a reason.
-- Both SRV sets Prosody uses are considered: Direct TLS (_xmpps-server, XEP-0368),
-- which it tries first, and STARTTLS (_xmpp-server).
local function resolve(domain, lookup_all)
	local state = { domain = domain; targets = {} };
	local kinds = {
		{ name = "_xmpps-server._tcp." .. domain; field = "srv_direct"; direct = true };
		{ name = "_xmpp-server._tcp." .. domain; field = "srv" };
	};
	local life = { ttl = options.cache_ttl; why = "dane_cache_ttl" };
	state.life = life;
	local now = os.time();
	local srv_answers = lookup_all({ { kinds[1].name, "SRV" }, { kinds[2].name, "SRV" },
		{ kinds[1].name, "RRSIG" }, { kinds[2].name, "RRSIG" } });
	local records, insecure_srv = {}, false;
	for k, kind in ipairs(kinds) do
		local answer, err = srv_answers[k][1], srv_answers[k][2];
		local status, why = dnssec_status(answer, err);
		state[kind.field] = status;
		if status == "bogus" then
			state.outcome, state.refuse = "bogus", ("SRV records of %s are bogus (DNSSEC validation failed: %s)"):format(domain, why);
			return state;
		elseif status == "error" then
			state.outcome, state.refuse = "resolution-error", ("SRV lookup for %s failed (%s)"):format(kind.name, why);
			return state;
		end
		if status == "secure" then
			bound(life, srv_answers[k + 2][1], { [T_SRV] = kind.name .. " SRV"; [T_NSEC] = kind.name .. " NSEC" }, now);
		end
		local these = {};
		for _, rr in ipairs(answer) do
			if rr.srv then these[#these + 1] = rr.srv; end
		end
		if #these == 1 and these[1].target == "." then
			state.note = (state.note and state.note .. "; " or "") .. kind.name .. ": service explicitly unavailable (target \".\")";
			these = {};
		elseif #these == 0 and not kind.direct and status == "secure" and #records == 0 then
			-- secure denial of SRV: Prosody falls back to the domain itself on 5269
			these = { { target = domain; port = 5269; priority = 0 } };
		end
		table.sort(these, function (a, b) return a.priority < b.priority; end);
		for _, rr in ipairs(these) do
			records[#records + 1] = { target = rr.target; port = rr.port; direct = kind.direct; secure = status == "secure" };
		end
		insecure_srv = insecure_srv or (status == "insecure" and (#these > 0 or not kind.direct));
	end

	local queries, secure_targets = {}, {};
	for _, rr in ipairs(records) do
		local host = rr.target:gsub("%.$", ""):lower();
		local t = { host = host; port = rr.port; addrs = {}; tlsa = {}; direct = rr.direct };
		state.targets[#state.targets + 1] = t;
		if rr.secure then
			secure_targets[#secure_targets + 1] = t;
			queries[#queries + 1] = { host, "A" };
			queries[#queries + 1] = { host, "AAAA" };
			queries[#queries + 1] = { ("_%d._tcp.%s"):format(rr.port, host), "TLSA" };
			queries[#queries + 1] = { host, "RRSIG" };
			queries[#queries + 1] = { ("_%d._tcp.%s"):format(rr.port, host), "RRSIG" };
		else
			t.status = "insecure"; -- from an unsigned SRV set: no DANE (RFC 7673 3.1)
		end
	end
	local answers = #queries > 0 and lookup_all(queries) or {};
	local any_dane, any_insecure, usable, reasons = false, insecure_srv, 0, {};
	for i, t in ipairs(secure_targets) do
		local a, aaaa, tlsa = answers[5 * i - 4], answers[5 * i - 3], answers[5 * i - 2];
		local host_sigs, tlsa_sigs = answers[5 * i - 1][1], answers[5 * i][1];
		local a_st, a_why = dnssec_status(a[1], a[2]);
		local aaaa_st, aaaa_why = dnssec_status(aaaa[1], aaaa[2]);
		local tlsa_st, tlsa_why = dnssec_status(tlsa[1], tlsa[2]);
		-- keyed by the binary address, so that any textual form of the peer's matches
		for _, rr in ipairs(a[1] or {}) do if rr.a then t.addrs[pton(rr.a) or rr.a] = rr.a; end end
		for _, rr in ipairs(aaaa[1] or {}) do if rr.aaaa then t.addrs[pton(rr.aaaa) or rr.aaaa] = rr.aaaa; end end
		if a_st == "bogus" or aaaa_st == "bogus" then
			t.status, t.why = "bogus-address", ("address records of %s are bogus (%s)"):format(t.host, a_st == "bogus" and a_why or aaaa_why);
		elseif a_st == "error" and aaaa_st == "error" then
			t.status, t.why = "error", ("address lookup for %s failed (%s)"):format(t.host, a_why);
		elseif a_st ~= "secure" and aaaa_st ~= "secure" then
			t.status = "insecure"; -- RFC 7673 3.2: no TLSA without secure addresses
		-- one secure address RRset makes the target's TLSA records binding: a failed lookup of the
		-- other family (a forged SERVFAIL, say) only means no addresses from it, never less DANE
		elseif tlsa_st == "bogus" then
			t.status, t.why = "bogus-tlsa", ("TLSA records of _%d._tcp.%s are bogus (%s)"):format(t.port, t.host, tlsa_why);
		elseif tlsa_st == "error" then
			t.status, t.why = "error", ("TLSA lookup for _%d._tcp.%s failed (%s)"):format(t.port, t.host, tlsa_why);
		elseif tlsa_st == "secure" and #tlsa[1] > 0 then
			t.status = "dane";
			for _, rr in ipairs(tlsa[1]) do
				local r = rr.tlsa;
				if r and r.use and r.select and r.match then
					t.tlsa[#t.tlsa + 1] = { usage = r.use; selector = r.select; mtype = r.match; data = r.data or "" };
				end
			end
		else
			t.status = tlsa_st == "secure" and "no-tlsa" or "insecure";
		end
		if a_st == "secure" and aaaa_st == "secure" then
			-- NSEC at an existing name: how long "no AAAA" or "no TLSA" may be believed
			bound(life, host_sigs, { [T_A] = t.host .. " A"; [T_AAAA] = t.host .. " AAAA"; [T_NSEC] = t.host .. " NSEC" }, now);
			if tlsa_st == "secure" then
				local tname = ("_%d._tcp.%s"):format(t.port, t.host);
				bound(life, tlsa_sigs, { [T_TLSA] = tname .. " TLSA"; [T_NSEC] = tname .. " NSEC" }, now);
			end
		end
		if t.why then
			reasons[#reasons + 1] = t.why;
		else
			usable = usable + 1;
			any_dane = any_dane or t.status == "dane";
			any_insecure = any_insecure or t.status == "insecure";
		end
	end
	for _, t in ipairs(state.targets) do
		if t.status == "insecure" and not t.why then any_insecure = true; end
	end
	if #secure_targets > 0 and usable == 0 and not any_insecure then
		local bogus = false;
		for _, t in ipairs(secure_targets) do bogus = bogus or t.status:match("^bogus") ~= nil; end
		state.outcome = bogus and "bogus" or "resolution-error";
		state.refuse = ("no usable target for %s: %s"):format(domain, table.concat(reasons, "; "));
	elseif any_dane then
		state.outcome = "dane";
	else
		state.outcome = any_insecure and "insecure" or "no-tlsa";
	end
	return state;
end

-- Routing: resolve before mod_s2s connects ---------------------------------------------

local cache = {};      -- domain -> { state, expires }
local waiting = {};    -- domain -> { { host, event }, ... } while resolving
local routing = {};    -- to_host -> { state, policy } for the s2sout-created that follows

local function bounce(from_host, stanza, text)
	local t = stanza.attr.type;
	if t == "error" or t == "result" or not ({ message = true; presence = true; iq = true })[stanza.name] then
		return;
	end
	local reply = st.error_reply(stanza, "cancel", "remote-server-not-found", "Server-to-server connection failed: DANE: " .. text);
	module:context(from_host):send(reply);
end

local function refuse_route(event, reason, text)
	m_refused:with_labels(reason):add(1);
	module:log("warn", "DANE: not connecting to %s: %s", event.to_host, text);
	bounce(event.from_host, event.stanza, text);
	return true;
end

local function route_with(event, state, policy)
	if state.refuse then
		return refuse_route(event, state.outcome, state.refuse);
	end
	if state.exhausted then -- every target failed DANE within this decision's lifetime
		return refuse_route(event, state.exhausted.reason, state.exhausted.text);
	end
	if policy == "required" and state.outcome ~= "dane" then
		local why = state.outcome == "insecure" and "its DNS records are not DNSSEC-signed" or "it publishes no TLSA records";
		return refuse_route(event, "required", ("DANE is required for %s but %s"):format(event.to_host, why));
	end
	local entry = { state = state; policy = policy };
	routing[event.to_host] = entry;
	-- mod_s2s creates the session and its resolvers synchronously; nothing later may use it
	module:add_timer(0, function ()
		if routing[event.to_host] == entry then routing[event.to_host] = nil; end
	end);
	return nil; -- on to mod_s2s, which creates the session (s2sout-created below)
end

-- A decision lives as long as the shortest-lived record it rests on, at most dane_cache_ttl.
local function remember(domain, state)
	local ttl = math.min(options.cache_ttl, state.life and state.life.ttl or options.cache_ttl);
	state.life = state.life or { ttl = ttl; why = "dane_cache_ttl" };
	if ttl > 0 then
		cache[domain] = { state = state; expires = clock() + ttl };
	else
		cache[domain] = nil;
	end
	module:log("debug", "DANE decision for %s (%s) kept %ds (%s)", domain, state.outcome, ttl,
		ttl < options.cache_ttl and state.life.why or "dane_cache_ttl");
end

local function resolved(domain, state)
	remember(domain, state);
	local queue = waiting[domain] or {};
	waiting[domain] = nil;
	if state.refuse then
		m_outcome:with_labels(state.outcome):add(1);
	end
	for _, item in ipairs(queue) do
		item.event.native_dane_state = state;
		module:context(item.host):fire_event("route/remote", item.event);
	end
end

local function start_resolution(domain)
	local runner = async.runner(function (d)
		resolved(d, resolve(d, async_lookup_all));
	end, {
		error = function (_, err)
			module:log("error", "DANE resolution of %s failed: %s", domain, err);
			resolved(domain, { domain = domain; targets = {}; outcome = "resolution-error";
				refuse = ("internal error resolving %s"):format(domain) });
		end;
	});
	local queue = waiting[domain];
	-- libunbound retries a silent server for minutes: stanzas must not wait that long
	module:add_timer(options.resolve_timeout, function ()
		if waiting[domain] == queue then
			module:log("warn", "DANE resolution of %s timed out after %gs", domain, options.resolve_timeout);
			resolved(domain, { domain = domain; targets = {}; outcome = "resolution-error";
				refuse = ("DNS resolution of %s timed out"):format(domain) });
		end
	end);
	runner:run(domain);
end

local function route_remote(event)
	local to_host = event.to_host;
	routing[to_host] = nil;
	local policy = policy_for(to_host);
	if policy == "off" then return nil; end
	local state = event.native_dane_state;
	if not state then
		local c = cache[to_host];
		if c and c.expires > clock() then state = c.state; end
	end
	if state then
		event.native_dane_state = nil;
		return route_with(event, state, policy);
	end
	local queue = waiting[to_host];
	if not queue then
		queue = {};
		waiting[to_host] = queue;
		queue[1] = { host = event.from_host; event = event };
		start_resolution(to_host);
	else
		queue[#queue + 1] = { host = event.from_host; event = event };
	end
	return true;
end

-- mod_s2s builds its resolver with net.resolvers.service.new() right after route/remote
-- reaches it; wrapping that constructor is the one place where the addresses of targets
-- that must not be used (bogus, or already failed DANE: RFC 7673 3.2, 3.4) can be
-- skipped, so Prosody goes on to the next target instead of connecting to them.
local service_resolvers = require "net.resolvers.service";
local service_new = service_resolvers.new;

local function is_out(state, t)
	return t.why ~= nil or (state.failed ~= nil and state.failed[t] ~= nil);
end

-- "<binary address>|<port>" of the targets to skip, unless a usable target shares it
local function skipped_addresses(state)
	local skip, keep, any = {}, {}, false;
	for _, t in ipairs(state.targets) do
		for key in pairs(t.addrs) do
			local k = key .. "|" .. t.port;
			if is_out(state, t) then skip[k] = true; any = true; else keep[k] = true; end
		end
	end
	if not any then return nil; end
	for k in pairs(keep) do skip[k] = nil; end
	return skip;
end

local function filtered_service_new(hostname, service, conn_type, extra)
	local resolver = service_new(hostname, service, conn_type, extra);
	local r = (service == "xmpp-server" or service == "xmpps-server") and routing[hostname];
	local skip = r and skipped_addresses(r.state);
	if not skip then return resolver; end
	local filtered = setmetatable({}, { __index = resolver });
	function filtered:next(cb)
		resolver:next(function (ctype, ip, port, ...)
			if ctype and skip[(pton(ip) or ip) .. "|" .. tostring(port)] then
				module:log("debug", "DANE: skipping %s port %s for %s: that target is not usable", ip, port, hostname);
				return self:next(cb);
			end
			return cb(ctype, ip, port, ...);
		end);
	end
	return filtered;
end
service_resolvers.new = filtered_service_new;

-- Verification after TLS ----------------------------------------------------------------

local function refuse_session(session, reason, text)
	m_refused:with_labels(reason):add(1);
	(session.log or module._log)("warn", "DANE: refusing s2s connection to %s: %s", session.to_host, text);
	session:close({ condition = "policy-violation"; text = "DANE: " .. text }, nil, "DANE: " .. text);
	return false;
end

-- Replies for queued stanzas, as mod_s2s's bounce_sendq makes them.
local function bounce_queued(from_host, items, text)
	for _, item in ipairs(items) do
		local reply = item[2];
		if reply and not reply.attr.xmlns and ({ message = true; presence = true; iq = true })[reply.name] then
			reply.attr.type = "error";
			reply:tag("error", { type = "cancel"; by = from_host })
				:tag("remote-server-not-found", { xmlns = "urn:ietf:params:xml:ns:xmpp-stanzas" }):up()
				:tag("text", { xmlns = "urn:ietf:params:xml:ns:xmpp-stanzas" }):text("Server-to-server connection failed: DANE: " .. text):up();
			module:context(from_host):send(reply);
		end
	end
end

-- The queued stanzas move to a new outgoing session whose resolver skips the failed
-- targets (RFC 7671 5, RFC 7673 3.4: try the next target). The first one re-enters
-- route/remote only to make mod_s2s open that session; the queue it then carries is the
-- original one, so nothing is re-serialised, dropped or sent twice.
local function reroute(from_host, to_host, state, items, trigger, prior)
	local host = prosody.hosts[from_host];
	local new, fired;
	if host and not host.s2sout[to_host] then -- else the trigger could leave over someone else's session
		module:context(from_host):fire_event("route/remote", { from_host = from_host; to_host = to_host; stanza = trigger;
			native_dane_state = state });
		fired = true;
		new = host.s2sout[to_host];
	end
	if not (new and new.sendq and #new.sendq == 1) then
		module:log("warn", "DANE: could not open a connection to the next target of %s", to_host);
		-- once fired, the trigger is whoever took it's (sent, queued or already bounced)
		return bounce_queued(from_host, fired and { table.unpack(items, 2) } or items, prior);
	end
	new.sendq = items;
	local bounce_sendq = new.bounce_sendq;
	-- a later failure of the next target (TCP, TLS, dialback) still names this one
	function new.bounce_sendq(s, reason)
		if type(reason) == "string" and not s.native_dane_final then
			reason = ("DANE: %s; then the next target: %s"):format(prior, reason);
		end
		return bounce_sendq(s, reason);
	end
end

-- A per-target failure: fall back to the next target while one is left; refuse (and
-- bounce, naming every target's cause) only when none is.
local function fail_target(session, targets, reason, text)
	local state = session.native_dane.state;
	state.reroutes = (state.reroutes or 0) + 1;
	if #targets == 0 or state.reroutes > #state.targets then
		-- not tied to a target (an address no target of this decision has): nothing to skip,
		-- so no next target to try; the next attempt resolves anew
		local c = cache[session.to_host];
		if c and c.state == state then cache[session.to_host] = nil; end
		session.native_dane_final = true;
		return refuse_session(session, reason, text);
	end
	state.failed = state.failed or {};
	for _, t in ipairs(targets) do state.failed[t] = text; end
	local left, causes, seen = 0, {}, {};
	for _, t in ipairs(state.targets) do
		local cause = t.why or state.failed[t];
		if not cause then
			left = left + 1;
		elseif not seen[cause] then
			seen[cause] = true;
			causes[#causes + 1] = cause;
		end
	end
	local items = session.sendq;
	local trigger;
	if left > 0 and items and items[1] then
		-- the serialised first stanza, parsed with the stream's namespaces in scope
		local ok, wrapper = pcall(xml_parse, "<x xmlns='jabber:server' xmlns:db='jabber:server:dialback'>" .. items[1][1] .. "</x>");
		trigger = ok and wrapper and wrapper.tags[1];
	end
	if not trigger then
		if left == 0 and #causes > 1 then
			text = ("no target of %s could be verified: %s"):format(session.to_host, table.concat(causes, "; "));
		end
		if left == 0 then state.exhausted = { reason = reason; text = text }; end
		session.native_dane_final = true;
		return refuse_session(session, reason, text);
	end
	-- closing retires the session (its hosts are gone afterwards)
	local from_host, to_host = session.from_host, session.to_host;
	session.sendq = nil; -- carried over to the next target below
	refuse_session(session, reason, text);
	m_fallback:with_labels(reason):add(1);
	module:log("info", "DANE: %d queued stanza(s) for %s go to its next target (%d left)", #items, to_host, left);
	reroute(from_host, to_host, state, items, trigger, text);
	return false;
end

-- The decision's targets this connection reached (Prosody chose one of the SRV targets), by the
-- peer's address and port: targets sharing an address are told apart by port. -> targets, ip
local function reached_targets(state, session)
	local ip, port = session.conn:ip(), session.conn:serverport();
	local key = ip and (pton(ip) or ip);
	local hit = {};
	for _, t in ipairs(state.targets) do
		if key and t.addrs[key] and (not port or tonumber(port) == t.port) then hit[#hit + 1] = t; end
	end
	return hit, ip;
end

local function peer_chain(session)
	local sock = session.conn and session.conn:socket();
	if not (sock and sock.getpeerchain) then return nil; end
	local certs = sock:getpeerchain();
	if not certs or #certs == 0 then return nil; end
	local pems = {};
	for i, c in ipairs(certs) do pems[i] = c:pem(); end
	return pems;
end

-- Incoming (optional): the remote server's own domain's SRV targets' TLSA records.
-- The stream is handled in an async runner, so the lookups wait without blocking.
local function check_incoming(session, host)
	local policy = policy_for(host);
	if policy == "off" then return; end
	local c = cache[host];
	if not async.ready() and not (c and c.expires > clock()) then
		-- mod_s2s runs stream events in a runner; should that ever change, "required" stays closed
		session.log("debug", "DANE: cannot resolve %s outside an async runner", host);
		if policy == "required" then
			m_refused:with_labels("incoming-resolution-error"):add(1);
			session:close({ condition = "policy-violation"; text = "DANE is required for " .. host });
			return false;
		end
		return;
	end
	local state = c and c.expires > clock() and c.state;
	if not state then
		state = resolve(host, async_lookup_all);
		remember(host, state);
	end
	if state.outcome ~= "dane" then
		m_incoming:with_labels(state.outcome):add(1);
		if policy == "required" then
			m_refused:with_labels("incoming-" .. state.outcome):add(1);
			session.log("warn", "DANE: refusing incoming s2s from %s: DANE is required (%s)", host, state.refuse or state.outcome);
			session:close({ condition = "policy-violation"; text = "DANE is required for " .. host });
			return false;
		end
		return;
	end
	local records, base, names = {}, nil, { host };
	for _, t in ipairs(state.targets) do
		if t.status == "dane" then
			if base then names[#names + 1] = t.host; else base = t.host; end
			for _, r in ipairs(t.tlsa) do records[#records + 1] = r; end
		end
	end
	local pems = peer_chain(session);
	local res = pems and verifier:verify(pems, records, { base = base; names = names });
	local verdict = res and res.verdict or "mismatch";
	m_incoming:with_labels(verdict):add(1);
	if verdict == "verified" then
		session.cert_chain_status = "valid";
		session.cert_identity_status = "valid";
		session.native_dane_verified = true;
		session.log("info", "DANE: incoming %s verified by TLSA %d %d %d at depth %d", host, res.usage, res.selector, res.mtype, res.depth);
		return;
	end
	local why = not pems and "no client certificate" or res and res.error or "unusable TLSA records only";
	session.log("warn", "DANE: incoming %s not authenticated by its TLSA records: %s", host, why);
	if verdict == "mismatch" then
		session.cert_chain_status = "invalid";
	end
	if policy == "required" then
		m_refused:with_labels("incoming-" .. verdict):add(1);
		session:close({ condition = "not-authorized"; text = "DANE: your certificate does not match your TLSA records" });
		return false;
	end
end

local function check_certificate(event)
	local session = event.session;
	if session.direction == "incoming" then
		if options.incoming and event.host then
			return check_incoming(session, event.host);
		end
		return;
	end
	if session.direction ~= "outgoing" then return; end
	local dane = session.native_dane;
	if not dane then return; end
	local state, policy = dane.state, dane.policy;
	if state.outcome ~= "dane" then
		m_outcome:with_labels(state.outcome):add(1);
		if policy == "required" then
			return refuse_session(session, "required", "DANE is required but no TLSA records apply");
		end
		return;
	end
	local pems = peer_chain(session);
	local hit, ip = reached_targets(state, session);
	local records, base, names, skipped, nondane, nondane_status = {}, nil, { session.to_host }, nil, nil, nil;
	local all_dane = true;
	for _, t in ipairs(state.targets) do
		if not t.why and t.status ~= "dane" then all_dane = false; end
	end
	for _, t in ipairs(hit) do
		if t.why then
			skipped = skipped or t.why;
		elseif t.status == "dane" then
			if base then names[#names + 1] = t.host; else base = t.host; end
			for _, r in ipairs(t.tlsa) do records[#records + 1] = r; end
		else
			nondane, nondane_status = t.host, t.status;
		end
	end
	if skipped and not base then
		m_outcome:with_labels("bogus"):add(1);
		return fail_target(session, hit, "bogus", skipped);
	end
	if not base and not nondane and all_dane then
		-- every usable target has TLSA records, yet this address is none of theirs: the
		-- decision may be older than Prosody's own lookup, so the next attempt resolves anew
		m_outcome:with_labels("mismatch"):add(1);
		local c = cache[session.to_host];
		if c and c.state == state then cache[session.to_host] = nil; end
		return refuse_session(session, "unmatched-address",
			("connected to %s, which is not an address of any DNSSEC-validated target"):format(tostring(ip)));
	end
	if not base then
		-- a target reached without TLSA records is "no-tlsa" or "insecure" by its own status; an
		-- address of no target is "insecure" (nothing DNSSEC-validated vouches for it)
		m_outcome:with_labels(nondane_status == "no-tlsa" and "no-tlsa" or "insecure"):add(1);
		if policy == "required" then
			return fail_target(session, hit, "required", ("connected to %s, which has no DNSSEC-signed TLSA records"):format(nondane or ip));
		end
		session.log("debug", "DANE: %s is not among the targets with TLSA records, leaving it to PKIX", ip);
		return;
	end
	dane.tls_required = true; -- RFC 7673 3.4: this target publishes TLSA records
	if not pems then
		m_outcome:with_labels("mismatch"):add(1);
		return fail_target(session, hit, "mismatch", ("%s publishes TLSA records but presented no certificate"):format(base));
	end
	local started = clock();
	local res, err = verifier:verify(pems, records, { base = base; names = names });
	m_verify:sample(clock() - started);
	if not res then
		m_outcome:with_labels("mismatch"):add(1);
		return fail_target(session, hit, "mismatch", ("the certificate chain of %s could not be read (%s)"):format(base, err));
	end
	if res.verdict == "verified" then
		m_outcome:with_labels("verified"):add(1);
		-- RFC 7673/7712: a DANE match on a secure SRV target authenticates the service domain
		session.cert_chain_status = "valid";
		session.cert_identity_status = "valid";
		session.native_dane_verified = true;
		session.log("info", "DANE: %s verified by TLSA %d %d %d at depth %d (target %s)", session.to_host,
			res.usage, res.selector, res.mtype, res.depth, base);
		return;
	elseif res.verdict == "mismatch" then
		m_outcome:with_labels("mismatch"):add(1);
		return fail_target(session, hit, "mismatch", ("certificate of %s does not match its TLSA records (%s)"):format(base, res.error));
	end
	-- every record unusable: encrypted, not authenticated by DANE (RFC 7672 style)
	m_outcome:with_labels("unusable-only"):add(1);
	if policy == "required" then
		return fail_target(session, hit, "unusable-only", ("every TLSA record of %s is unusable"):format(base));
	end
	session.log("warn", "DANE: every TLSA record of %s is unusable; continuing with PKIX", base);
end

module:hook("s2s-check-certificate", check_certificate, 500); -- after mod_s2s_auth_certs (509), before the policy (-1)

-- Must this unencrypted stream have been TLS? Yes if a target it reached publishes TLSA records;
-- at an address of no target, as strict as the domain's decision.
local function tls_required(dane, session)
	if dane.tls_required then return true; end
	local hit = reached_targets(dane.state, session);
	if #hit == 0 then return dane.state.outcome == "dane"; end
	for _, t in ipairs(hit) do
		if t.status == "dane" then return true; end
	end
	return false;
end

function module.add_host(host_module)
	host_module:hook("route/remote", route_remote, -5); -- after existing sessions (-1), before new ones (-10)
	host_module:hook("s2sout-created", function (event)
		local session = event.session;
		-- kept in routing[] for the resolver mod_s2s builds next (filtered_service_new)
		local r = routing[session.to_host];
		if r then session.native_dane = { state = r.state; policy = r.policy }; end
	end);
	-- TLSA published by the target reached means TLS is mandatory (RFC 7673 3.4)
	host_module:hook("s2s-authenticated", function (event)
		local session = event.session;
		local dane = session.native_dane;
		if session.direction == "outgoing" and dane and not session.secure and tls_required(dane, session) then
			m_refused:with_labels("no-tls"):add(1);
			session.log("warn", "DANE: %s publishes TLSA records but the stream is not encrypted", session.to_host);
			session:close({ condition = "policy-violation"; text = "DANE: TLSA records are published, TLS is required" }, nil,
				"DANE: TLSA records are published but the connection was not encrypted");
			return false;
		end
	end, 10);
end

-- Operator check: SRV -> DNSSEC -> addresses -> TLSA -> STARTTLS -> each record's verdict

local USAGES = { [0] = "PKIX-TA"; [1] = "PKIX-EE"; [2] = "DANE-TA"; [3] = "DANE-EE" };
local SELECTORS = { [0] = "Cert"; [1] = "SPKI" };
local MTYPES = { [0] = "Full"; [1] = "SHA2-256"; [2] = "SHA2-512" };

local function record_text(r)
	local data = hex.encode(r.data or "");
	if #data > 64 then data = data:sub(1, 28) .. "..." .. data:sub(-28); end
	return ("%d %d %d %s (%s %s %s)"):format(r.usage, r.selector, r.mtype, data, USAGES[r.usage] or "?",
		SELECTORS[r.selector] or "?", MTYPES[r.mtype] or "?");
end

-- STARTTLS (xmpp-server), or Direct TLS (xmpps-server), to addr:port for domain, on a
-- non-blocking socket; wait(sock, "r"|"w", deadline) -> true | nil waits for it in the
-- caller's way (select() in prosodyctl, async sleeps in the admin shell, so the server
-- keeps running). Returns the presented chain as PEM strings.
local function probe(addr, port, domain, direct, timeout, wait)
	local socket = require "socket";
	local ssl = require "ssl";
	local deadline = socket.gettime() + timeout;
	local conn = addr:find(":", 1, true) and socket.tcp6() or socket.tcp();
	conn:settimeout(0);
	local ok, err = conn:connect(addr, port);
	while not ok and err ~= "already connected" do
		if err ~= "timeout" and err ~= "Operation already in progress" then
			conn:close();
			return nil, "connect: " .. tostring(err);
		end
		if not wait(conn, "w", deadline) then conn:close(); return nil, "connect: timed out"; end
		ok, err = conn:connect(addr, port);
	end
	local buf = "";
	local function send(data)
		local i = 0;
		while i < #data do
			local sent, serr, last = conn:send(data, i + 1);
			i = sent or last or i;
			if not sent then
				if serr ~= "timeout" then return nil, serr; end
				if not wait(conn, "w", deadline) then return nil, "timed out"; end
			end
		end
		return true;
	end
	local function read_until(pattern)
		while not buf:find(pattern) do
			local data, rerr, partial = conn:receive(4096);
			data = data or partial;
			if data and data ~= "" then
				buf = buf .. data;
				if #buf > 65536 then return nil, "too much data"; end
			elseif rerr == "timeout" then
				if not wait(conn, "r", deadline) then return nil, "timed out"; end
			else
				return nil, rerr or "closed";
			end
		end
		return true;
	end
	if not direct then
		ok, err = send(("<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
			.. " xmlns:db='jabber:server:dialback' to='%s' version='1.0'>"):format(domain));
		if ok then ok, err = read_until("</stream:features>"); end
		if not ok then conn:close(); return nil, "no stream features: " .. tostring(err) .. " " .. buf:sub(-200); end
		if not buf:find("urn:ietf:params:xml:ns:xmpp%-tls") then conn:close(); return nil, "the server does not offer STARTTLS"; end
		buf = "";
		ok, err = send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
		if ok then ok, err = read_until("<proceed[^>]*>"); end
		if not ok then conn:close(); return nil, "STARTTLS refused: " .. tostring(err) .. " " .. buf; end
	end
	local sconn, werr = ssl.wrap(conn, { mode = "client"; protocol = "any"; verify = "none"; options = { "all", "no_sslv2", "no_sslv3" } });
	if not sconn then conn:close(); return nil, "TLS: " .. tostring(werr); end
	-- as Prosody does: its s2s STARTTLS sends no SNI (net/server_epoll sets none for it), so a
	-- receiver choosing certificates by SNI must show the check what it shows Prosody
	if direct then sconn:sni(domain); end
	sconn:settimeout(0);
	repeat
		ok, err = sconn:dohandshake();
		if not ok then
			if err ~= "wantread" and err ~= "wantwrite" then sconn:close(); return nil, "TLS handshake: " .. tostring(err); end
			if not wait(sconn, err == "wantread" and "r" or "w", deadline) then sconn:close(); return nil, "TLS handshake: timed out"; end
		end
	until ok;
	local pems = {};
	for i, c in ipairs(sconn:getpeerchain() or {}) do pems[i] = c:pem(); end
	sconn:close();
	return pems;
end

local function select_wait(sock, mode, deadline)
	local socket = require "socket";
	local left = deadline - socket.gettime();
	if left <= 0 then return nil; end
	socket.select(mode == "r" and { sock } or nil, mode == "w" and { sock } or nil, math.min(left, 1));
	return true;
end

local function async_wait(_, _, deadline)
	if require "socket".gettime() >= deadline then return nil; end
	async.sleep(0.005);
	return true;
end

local function local_cert_suggestion(domain, say)
	if not rawget(configmanager.getconfig(), domain) then return; end -- not one of ours
	local ok, certmanager = pcall(require, "core.certmanager");
	local cfg = ok and certmanager.find_host_cert(domain);
	local file = cfg and cfg.certificate;
	local ssl_opt = configmanager.get(domain, "ssl");
	if not file and type(ssl_opt) == "table" then file = ssl_opt.certificate; end
	if not file then return; end
	local f = io.open(file);
	if not f then return; end
	local pem = f:read("a");
	f:close();
	local data = engine.digest(pem, 1, 1);
	if data then
		say(("  suggested TLSA for the local certificate of %s (%s): 3 1 1 %s"):format(domain, file, hex.encode(data)));
	end
end

-- The first chain a target presented: its leaf, and how each TLSA record fares against it.
local function describe_chain(t, chain, domain, say, warn)
	local info = engine.certinfo(chain[1]);
	if info then
		say(("    leaf %s, issued by %s, expires %s"):format(info.subject, info.issuer, os.date("!%Y-%m-%d", info.not_after)));
		if info.not_after < os.time() + 14 * 86400 then warn("the certificate of %s expires within 14 days", t.host); end
	end
	for i, r in ipairs(t.tlsa) do
		local one = verifier:verify(chain, { r }, { base = t.host; names = { domain } });
		local text;
		if not one then text = "error";
		elseif one.verdict == "verified" then text = ("matches (depth %d)"):format(one.depth);
		elseif one.verdict == "mismatch" then text = "does not match: " .. one.error;
		else text = "unusable: " .. tostring(one.unusable[1]); end
		say(("    TLSA #%d %s"):format(i, text));
		if one and one.verdict == "mismatch" and one.x509_error == 65 then
			warn("TLSA #%d of %s matches nothing the server presents (stale record, or a next key not yet deployed)", i, t.host);
		end
	end
end

-- Runs the check, printing with say(); returns true when DANE (or its absence) is in order.
local function check(domain, lookup_all, wait, say)
	domain = domain:lower();
	local healthy, warnings = true, 0;
	local function warn(fmt, ...) warnings = warnings + 1; say("  WARNING: " .. fmt:format(...)); end
	local policy = policy_for(domain);
	say(("DANE check for %s (local policy: %s)"):format(domain, policy));
	local state = resolve(domain, lookup_all);
	say(("  SRV _xmpps-server._tcp.%s (Direct TLS): %s"):format(domain, state.srv_direct or "not looked up"));
	say(("  SRV _xmpp-server._tcp.%s: %s"):format(domain, state.srv or "not looked up"));
	if state.note then say("  " .. state.note); end
	if state.life then
		say(("  the server keeps this decision %ds (bounded by %s)"):format(state.life.ttl, state.life.why));
		local expires = state.life.expires;
		if expires then
			say(("  the first signature it rests on (SRV, address or TLSA) expires %s"):format(os.date("!%Y-%m-%d %H:%M", expires)));
			if expires - os.time() < options.rrsig_warn_days * 86400 then
				warn("a signature of the DNS records of %s expires within %g days: re-sign the zone", domain, options.rrsig_warn_days);
			end
		end
	end
	for _, t in ipairs(state.targets) do
		local addrs = {};
		for _, a in pairs(t.addrs) do addrs[#addrs + 1] = a; end
		table.sort(addrs);
		say(("  target %s:%d%s  addresses %s  -> %s%s"):format(t.host, t.port, t.direct and " (Direct TLS)" or "",
			#addrs > 0 and table.concat(addrs, " ") or "(none)", t.status, t.why and (": " .. t.why) or ""));
		local by_usage = {};
		for i, r in ipairs(t.tlsa) do
			say(("    TLSA #%d %s"):format(i, record_text(r)));
			by_usage[r.usage] = (by_usage[r.usage] or 0) + 1;
		end
		if t.status == "dane" then
			-- when the TLSA signatures run out (RRSIG expiration, RFC 4034 3.1.5)
			local tlsa_name = ("_%d._tcp.%s"):format(t.port, t.host);
			local sigs = lookup_all({ { tlsa_name, "RRSIG" } })[1][1];
			for _, rr in ipairs(sigs or {}) do
				local raw = rr.rrsig and rr.rrsig.raw;
				if raw and #raw >= 18 then
					local covered, _, _, _, expires = string.unpack(">I2BBI4I4", raw);
					if covered == 52 then
						say(("    TLSA signature expires %s"):format(os.date("!%Y-%m-%d %H:%M", expires)));
						if expires - os.time() < options.rrsig_warn_days * 86400 then
							warn("the signature of the TLSA records of %s expires within %g days: re-sign the zone", t.host, options.rrsig_warn_days);
						end
					end
				end
			end
			if (by_usage[3] or 0) == 1 and not by_usage[2] then
				warn("only one DANE-EE record for %s and no DANE-TA: publish the next key's record before changing keys (rollover hazard)", t.host);
			end
			-- every address: Prosody may reach any of them (a stale key on one must show)
			local how, reached = t.direct and "Direct TLS" or "STARTTLS", 0;
			for _, addr in ipairs(addrs) do
				local chain, err = probe(addr, t.port, domain, t.direct, options.check_timeout, wait);
				if not chain then
					say(("    %s %s port %d failed: %s"):format(how, addr, t.port, err));
				else
					say(("    %s %s port %d: %d certificate(s)"):format(how, addr, t.port, #chain));
					reached = reached + 1;
					if reached == 1 then describe_chain(t, chain, domain, say, warn); end
					local all = verifier:verify(chain, t.tlsa, { base = t.host; names = { domain } });
					if not all then
						say("    verdict: cannot verify");
						healthy = false;
					else
						say(("    verdict: %s%s"):format(all.verdict, all.error and (" (" .. all.error .. ")") or ""));
						healthy = healthy and (all.verdict == "verified" or (all.verdict == "unusable-only" and policy ~= "required"));
					end
				end
			end
			if reached == 0 then
				healthy = false;
			elseif reached < #addrs then
				warn("%d of the %d addresses of %s could not be reached from here", #addrs - reached, #addrs, t.host);
			end
		elseif t.why then
			warn("target %s: %s; Prosody will not connect to it", t.host, t.why);
			healthy = false;
		end
	end
	local verdict;
	if state.refuse then
		verdict, healthy = "REFUSED: " .. state.refuse, false;
	elseif state.outcome == "dane" then
		verdict = healthy and "DANE verified" or "DANE FAILED";
	else
		verdict = ("no DANE (%s): PKIX applies"):format(state.outcome);
		if policy == "required" then verdict, healthy = verdict .. ", but the local policy requires DANE", false; end
	end
	local_cert_suggestion(domain, say);
	say(("Result for %s: %s%s"):format(domain, verdict, warnings > 0 and (" (%d warning%s)"):format(warnings, warnings > 1 and "s" or "") or ""));
	return healthy;
end

function module.command(arg)
	local cmd, domain = arg[1], arg[2];
	if cmd ~= "check" or not domain then
		print("usage: prosodyctl mod_native_dane check <domain>");
		return 2;
	end
	local ok, err = check_resolver();
	if not ok then print("WARNING: " .. err); end
	return check(domain, sync_lookup_all, select_wait, print) and 0 or 1;
end

-- Admin shell (0.12): dane:check(domain), dane:show() ------------------------------------

local env = module:shared("/*/admin_shell/env");
local shell = {};

function shell:check(domain)
	if type(domain) ~= "string" then return nil, "usage: dane:check(\"domain\")"; end
	local print = self.session.print;
	local ok = check(domain, async_lookup_all, async_wait, print);
	return ok, ok and "DANE check passed" or "DANE check found problems";
end

function shell:show()
	local print = self.session.print;
	local n = 0;
	for domain, c in pairs(cache) do
		n = n + 1;
		local life = c.state.life or {};
		print(("%s: %s%s (policy %s, cached %ds more, bounded by %s)"):format(domain, c.state.outcome,
			c.state.refuse and (" - " .. c.state.refuse) or "", policy_for(domain), math.max(0, math.floor(c.expires - clock())),
			life.why or "dane_cache_ttl"));
		for _, t in ipairs(c.state.targets) do
			local failed = c.state.failed and c.state.failed[t];
			if failed then print(("  target %s:%d skipped: %s"):format(t.host, t.port, failed)); end
		end
	end
	return true, ("%d domain(s) in the DANE cache"):format(n);
end

env.dane = shell;
function module.unload()
	if env.dane == shell then env.dane = nil; end
	if service_resolvers.new == filtered_service_new then service_resolvers.new = service_new; end
	if verifier then verifier:close(); end
end
