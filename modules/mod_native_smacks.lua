-- mod_native_smacks: XEP-0198 stream management for client streams, a replacement
-- for Prosody's mod_smacks with a native outgoing queue (prosody_native.smqueue) and
-- an expiry policy that neither loses a message silently nor bounces one that another
-- device of the user already has.
--
-- The engine keeps each unacknowledged stanza as the bytes that went on the wire plus
-- a small record; stanza objects are rebuilt only to replay them on resume or to run
-- the expiry policy. Everything Prosody-specific (which error, which session, which
-- event) is decided here.
-- luacheck: globals prosody

local st = require "util.stanza";
local jid_bare = require "util.jid".bare;
local jid_join = require "util.jid".join;
local datetime = require "util.datetime";
local filters = require "util.filters";
local timer = require "util.timer";
local now = require "util.time".monotonic; -- ack timing must not jump with the wall clock
local watchdog = require "util.watchdog";
local async = require "util.async";
local xml_parse = require "util.xml".parse;
local new_token = require "util.id".medium;
local sessionmanager = require "core.sessionmanager";
local modulemanager = require "core.modulemanager";
local engine = module:require("prosody_native_loader").load("smqueue");

local xmlns_errors = "urn:ietf:params:xml:ns:xmpp-stanzas";
local xmlns_streams = "urn:ietf:params:xml:ns:xmpp-streams";
local xmlns_delay = "urn:xmpp:delay";
local xmlns_mam = "urn:xmpp:mam:2";
local xmlns_sid = "urn:xmpp:sid:0";
local xmlns_carbons = "urn:xmpp:carbons:2";
local xmlns_forward = "urn:xmpp:forward:0";
local xmlns_client = "jabber:client";
local xmlns_sm2 = "urn:xmpp:sm:2";
local xmlns_sm3 = "urn:xmpp:sm:3";
local H_MOD = 4294967296;

local host = module.host;

-- Refuse to run next to core mod_smacks: both would answer the same elements.
if modulemanager.is_loaded(host, "smacks") then
	local msg = ("mod_native_smacks replaces mod_smacks and cannot run next to it on %s: "
		.. "put \"smacks\" in modules_disabled (and keep \"native_smacks\" in modules_enabled)"):format(host);
	module:log_status("error", "%s", msg);
	error(msg, 0);
end

-- ---------------------------------------------------------------- options

local options = module:require("prosody_native_options");
local option_error, number_option, boolean_option = options.fail, options.number, options.boolean;

local DAY = 86400;
local resume_timeout = number_option("smacks_hibernation_time", 600, 1, 365 * DAY);
local min_resume_timeout = number_option("smacks_min_hibernation_time", math.min(60, resume_timeout), 1, 365 * DAY);
if min_resume_timeout > resume_timeout then
	option_error("smacks_min_hibernation_time", min_resume_timeout,
		("at most smacks_hibernation_time (%s)"):format(resume_timeout));
end
local queue_size = number_option("smacks_max_queue_size", 500, 1, 1000000, true);
-- A connected stream's queue may run this many times fuller while it waits for acks: what a burst
-- (a roster's presence, the offline store at login) wrote is delivered, not "lost", so it must not
-- go through the expiry policy. Only hibernating sessions are held to smacks_max_queue_size.
local LIVE_QUEUE_FACTOR = 4;
local live_queue_size = math.min(queue_size * LIVE_QUEUE_FACTOR, 1000000);
local max_unacked_stanzas = number_option("smacks_max_unacked_stanzas", 0, 0, 1000000, true);
local max_inactive_unacked_stanzas = number_option("smacks_max_inactive_unacked_stanzas", 256, 0, 1000000, true);
local delayed_ack_timeout = number_option("smacks_max_ack_delay", 30, 0, DAY);
local ack_timeout = number_option("smacks_ack_timeout", 60, 0, DAY);
local max_old_sessions = number_option("smacks_max_old_sessions", 10, 0, 10000, true);
local old_session_ttl = number_option("smacks_old_sessions_ttl", DAY, 1, 365 * DAY);
local max_hibernated = number_option("smacks_max_hibernated_sessions", 10, 1, 10000, true);
local storage_retries = number_option("smacks_offline_retries", 3, 0, 100, true);
local initial_h = number_option("smacks_debug_initial_h", 0, 0, H_MOD - 1, true);
local s2s_smacks = boolean_option("smacks_enabled_s2s", true);
local s2s_resend = boolean_option("smacks_s2s_resend", false);
local ack_interval = number_option("smacks_ack_request_interval", 0.1, 0, 60);
local pace_limit = math.max(1, queue_size // 2);

-- ---------------------------------------------------------------- metrics

local m_queued = module:metric("counter", "stanzas_queued", "", "Stanzas put in a stream management queue", {}):with_labels();
local m_acked = module:metric("counter", "stanzas_acked", "", "Queued stanzas acknowledged by the client", {}):with_labels();
local m_replayed = module:metric("counter", "stanzas_replayed", "", "Queued stanzas re-sent on resumption", {}):with_labels();
local m_evicted = module:metric("counter", "stanzas_overflowed", "",
	"Stanzas pushed out of a full queue and handed to the expiry policy", {}):with_labels();
local m_outcome = module:metric("counter", "stanza_outcomes", "",
	"Fate of unacknowledged stanzas when a queue is discarded (expiry, overflow, disconnect, shutdown)", { "outcome" });
local m_sessions = module:metric("counter", "sessions", "", "Stream management session events", { "event" });
local m_resume_failed = module:metric("counter", "resume_failures", "", "Refused resumption attempts", { "reason" });
local m_memory = module:metric("gauge", "queue_memory", "bytes", "Memory held by every stream management queue of the server", {}):with_labels();
local m_hibernating = module:metric("gauge", "hibernating_sessions", "", "Sessions hibernating on this host", {}):with_labels();

local outcome_counters = {};
for _, o in ipairs({ "ephemeral", "iq_error", "elsewhere", "archived", "redirected", "offline", "handled", "bounced",
	"resent", "unreadable", "unconfirmed" }) do
	outcome_counters[o] = m_outcome:with_labels(o);
end
local function session_event(name) return m_sessions:with_labels(name); end
local ev_started, ev_hibernated, ev_resumed, ev_expired, ev_evicted =
	session_event("started"), session_event("hibernated"), session_event("resumed"), session_event("expired"), session_event("evicted");

-- ---------------------------------------------------------------- state

local c2s_sessions = module:shared("/*/c2s/sessions");
local local_sessions = prosody.hosts[host].sessions;
local session_registry = module:shared("registry"); -- user@host/token -> session
local old_sessions = module:open_store("smacks_h"); -- user -> { token = { h, t } } (same store as mod_smacks)
local old_session_map = module:open_store("smacks_h", "map");
local mam_clients = module:open_store("smacks_mam_clients", "map"); -- user, resource -> last MAM query time
local mam_clients_kv = module:open_store("smacks_mam_clients");
local hibernating_count = 0;
local hibernation_seq = 0;

local KIND = { message = engine.MESSAGE, presence = engine.PRESENCE, iq = engine.IQ };

local function format_h(h) return h and ("%d"):format(h) or nil; end

local function sm_send(session, stanza)
	return (session.sends2s or session.send)(stanza);
end

-- ---------------------------------------------------------------- stanzas from bytes

-- Bytes captured from a WebSocket session carry xmlns='jabber:client' on the stanza
-- and its inherited children; a stanza object in Prosody has none there.
local function strip_client_ns(el)
	if el.attr.xmlns == xmlns_client then
		el.attr.xmlns = nil;
		for _, child in ipairs(el.tags) do
			if child.attr.xmlns == xmlns_client then strip_client_ns(child); end
		end
	end
end

-- Rebuilds a queued stanza, with the <delay/> of the time it was queued (not for iq).
local function rebuild(session, bytes, kind, stamp)
	local stanza = xml_parse(bytes);
	if not stanza then
		session.log("error", "Could not rebuild a queued stanza (%d bytes)", #bytes);
		return nil;
	end
	strip_client_ns(stanza);
	if kind ~= KIND.iq and not stanza:get_child("delay", xmlns_delay) then
		stanza:tag("delay", {
			xmlns = xmlns_delay;
			from = jid_bare(session.full_jid or session.host);
			stamp = datetime.datetime(math.floor(stamp));
		}):up();
	end
	return stanza;
end

-- ---------------------------------------------------------------- the queue object

-- session.outgoing_stanza_queue: util.smqueue's interface over the native queue, so
-- modules reading it (mod_csi_battery_saver, mod_cloud_notify) keep working.
local queue_methods = {};
local queue_mt = { __index = queue_methods, __name = "native_smqueue" };

local function new_queue(session)
	return setmetatable({ q = engine.new(live_queue_size, initial_h); session = session }, queue_mt);
end

function queue_methods:count_unacked() return self.q:unacked(); end
function queue_methods:count_acked() return self.q:acked(); end
function queue_methods:expected_h() return self.q:sent(); end
function queue_methods:resumable() return true; end
function queue_methods:resume()
	local list = self:table();
	local i = 0;
	return function ()
		i = i + 1;
		if list[i] then return i, list[i]; end
	end;
end
-- Stanza objects handed to event handlers are kept per h while queued, so a handler that
-- marks them (mod_cloud_notify's _push_notify) sees its mark again in the next event.
function queue_methods:table()
	local t, q = {}, self.q;
	local cache, seen = self.cache or {}, {};
	self.cache = cache;
	for i = 1, q:count() do
		local bytes, kind, _, stamp, h = q:get(i);
		local stanza = cache[h] or rebuild(self.session, bytes, kind, stamp);
		cache[h], seen[h] = stanza, true;
		t[#t+1] = stanza;
	end
	for h in pairs(cache) do
		if not seen[h] then cache[h] = nil; end
	end
	return t;
end

-- A queue snapshot for event payloads, built only if a handler reads it.
local function lazy_queue_table(queue)
	local snapshot;
	local function materialise(t)
		if not snapshot then
			snapshot = true;
			local ok, list = pcall(queue.table, queue);
			setmetatable(t, nil);
			if ok then
				for i, v in ipairs(list) do rawset(t, i, v); end
			end
		end
		return t;
	end
	return setmetatable({}, {
		__index = function (t, k) return rawget(materialise(t), k); end;
		__len = function (t) return rawlen(materialise(t)); end;
		__pairs = function (t) return next, materialise(t), nil; end;
	});
end

-- ---------------------------------------------------------------- deliveries elsewhere
-- Which session of a user received which message (directly, by bare-JID fan-out, or as
-- a carbon copy), recorded when it is written to the session, so that at expiry a
-- message another live device already has is not sent again or bounced.

local delivered = {}; -- username -> { keys = { key -> session | set | true }, order = { keys }, first, last }
local sm_users = {}; -- username -> number of sessions with stream management
local RECORD_LIMIT = math.max(2 * queue_size, 256);

local function message_key(stanza)
	local from, id = stanza.attr.from, stanza.attr.id;
	if not id then
		local body = stanza:get_child_text("body");
		if not body then return nil; end
		id = "\1" .. body;
	end
	return (from or "") .. "\0" .. id;
end

-- The message a carbon copy wraps, or nil.
local function carbon_inner(stanza)
	for _, tag in ipairs(stanza.tags) do
		if tag.attr.xmlns == xmlns_carbons and (tag.name == "received" or tag.name == "sent") then
			local fwd = tag:get_child("forwarded", xmlns_forward);
			local inner = fwd and fwd:get_child("message", xmlns_client);
			return inner or false;
		end
	end
	return nil;
end

local function record_delivery(username, key, value)
	local rec = delivered[username];
	if not rec then
		rec = { keys = {}, order = {}, first = 1, last = 0 };
		delivered[username] = rec;
	end
	local old = rec.keys[key];
	if old == nil then
		rec.last = rec.last + 1;
		rec.order[rec.last] = key;
		if rec.last - rec.first >= RECORD_LIMIT then
			rec.keys[rec.order[rec.first]] = nil;
			rec.order[rec.first] = nil;
			rec.first = rec.first + 1;
		end
		rec.keys[key] = value;
	elseif old == true or value == true then
		rec.keys[key] = true;
	elseif old ~= value then
		if old.set then
			old[value] = true;
		else
			rec.keys[key] = { set = true, [old] = true, [value] = true };
		end
	end
end

-- true if a session other than the dying one, still live and connected, received the
-- message, or the message was already dealt with by the expiry of another session.
local function delivered_elsewhere(who, key)
	local session = who.session;
	local rec = key and delivered[who.username];
	local v = rec and rec.keys[key];
	if v == nil then return false; end
	if v == true then return true; end
	local function live(s)
		return s ~= session and not s.destroyed and not s.hibernating and s.conn ~= nil;
	end
	if not v.set then return live(v); end
	for s in pairs(v) do
		if s ~= "set" and live(s) then return true; end
	end
	return false;
end

local function record_out(stanza, session)
	if stanza.name == "message" and not stanza.attr.xmlns and not session.hibernating then
		local key = message_key(carbon_inner(stanza) or stanza);
		if key then record_delivery(session.username, key, session); end
	end
	return stanza;
end

-- Users with stream management on at least one session and at least two sessions: only
-- their messages can be queued on one session and delivered to another, so only their
-- sessions carry the filter that records deliveries. Kept up to date as sessions come
-- and go (and a resumed session gets its filters anew).
local recorded_users = {};
local function refresh_recording(username)
	local user = local_sessions[username];
	local sessions = user and user.sessions;
	local on = sm_users[username] ~= nil and sessions ~= nil and next(sessions, (next(sessions))) ~= nil;
	if on then
		for _, session in pairs(sessions) do filters.add_filter(session, "stanzas/out", record_out, -990); end
	elseif recorded_users[username] and sessions then
		for _, session in pairs(sessions) do filters.remove_filter(session, "stanzas/out", record_out); end
	end
	recorded_users[username] = on or nil;
end
local function refresh_recording_event(event)
	local username = event.session.username;
	if username then refresh_recording(username); end
end
module:hook("resource-bind", refresh_recording_event);
module:hook("resource-unbind", refresh_recording_event);

local function sm_user_add(username, n)
	local c = (sm_users[username] or 0) + n;
	sm_users[username] = c > 0 and c or nil;
	if c <= 0 then delivered[username] = nil; end
	refresh_recording(username);
end

-- ---------------------------------------------------------------- per-client MAM use

-- Keyed by resource: the clients that hibernate (Conversations, Monal, Siskin, Gajim, Dino)
-- keep one generated resource per account, so it names the client across sessions. Clients
-- with a new resource per login get a new entry each time: only the newest
-- MAM_CLIENTS_PER_USER are kept, so the store stays bounded.
local MAM_CLIENTS_PER_USER = 20;

local function prune_mam_clients(username)
	local all = mam_clients_kv:get(username);
	if type(all) ~= "table" then return; end
	local list = {};
	for resource, t in pairs(all) do list[#list+1] = { resource, tonumber(t) or 0 }; end
	if #list <= MAM_CLIENTS_PER_USER then return; end
	table.sort(list, function (a, b) return a[2] > b[2]; end);
	for i = MAM_CLIENTS_PER_USER + 1, #list do all[list[i][1]] = nil; end
	local ok, err = mam_clients_kv:set(username, all);
	if not ok and err then module:log("warn", "Could not prune the MAM clients of %s: %s", username, err); end
end

local function note_mam_query(event)
	local origin = event.origin;
	if origin.username and origin.resource and not origin.native_smacks_mam then
		origin.native_smacks_mam = true;
		local known = mam_clients:get(origin.username, origin.resource);
		local ok, err = mam_clients:set(origin.username, origin.resource, os.time());
		if not ok and err then module:log("warn", "Could not remember MAM use of %s: %s", origin.full_jid, err); end
		if ok and known == nil then prune_mam_clients(origin.username); end
	end
end
module:hook("iq-set/self/" .. xmlns_mam .. ":query", note_mam_query, 10);
module:hook("iq-get/self/" .. xmlns_mam .. ":metadata", note_mam_query, 10);

local function client_uses_mam(session)
	if session.mam_requested or session.native_smacks_mam then return true; end
	return mam_clients:get(session.username, session.resource) ~= nil;
end

-- ---------------------------------------------------------------- expiry policy

-- mod_mam's own predicate when it is loaded on the host, otherwise the same rules.
local function local_should_store(stanza)
	if stanza:get_child("no-store", "urn:xmpp:hints") or stanza:get_child("no-permanent-store", "urn:xmpp:hints") then
		return false;
	end
	if stanza:get_child("store", "urn:xmpp:hints") or stanza:get_child("body") or stanza:get_child("subject")
	or stanza:get_child("encryption", "urn:xmpp:eme:0") or stanza:get_child(nil, "urn:xmpp:receipts")
	or stanza:get_child(nil, "urn:xmpp:chat-markers:0") or stanza:get_child("x", "jabber:x:conference")
	or stanza:find("{http://jabber.org/protocol/muc#user}x/invite")
	or stanza:get_child(nil, "urn:xmpp:jingle-message:0") or stanza:get_child(nil, "urn:xmpp:jingle-message:1") then
		return true;
	end
	return false;
end

local function worth_storing(who, stanza)
	if modulemanager.is_loaded(host, "mam") then
		return module:fire_event("archive-should-store", { stanza = stanza; session = who.session }) and true or false;
	end
	return local_should_store(stanza);
end

local function available_resources(who)
	local out, session = {}, who.session;
	local user = local_sessions[who.username];
	if user then
		for _, s in pairs(user.sessions) do
			if s ~= session and not s.destroyed and not s.hibernating and s.presence and (s.priority or 0) >= 0 then
				out[#out+1] = s;
			end
		end
	end
	return out;
end

local function bounce(who, stanza, condition, text)
	local reply = st.error_reply(stanza, "cancel", condition, text);
	reply.attr.from = who.bare;
	module:send(reply);
end

-- Decides and carries out the fate of one unacknowledged stanza; returns the outcome.
local function dispose(who, stanza)
	local name, stype = stanza.name, stanza.attr.type;
	if name == "presence" then
		return "ephemeral";
	elseif name == "iq" then
		if stype == "get" or stype == "set" then
			bounce(who, stanza, "service-unavailable", "The recipient's session ended before it could answer");
			return "iq_error";
		end
		return "ephemeral";
	end
	stype = stype or "normal";
	if stype == "headline" or stype == "groupchat" or stype == "error"
	or stanza:get_child("result", xmlns_mam) or carbon_inner(stanza) ~= nil
	or not worth_storing(who, stanza) then
		return "ephemeral";
	end
	local username = who.username;
	local key = message_key(stanza);
	if delivered_elsewhere(who, key) then
		return "elsewhere";
	end
	local archived = stanza:get_child_with_attr("stanza-id", xmlns_sid, "by", who.bare) ~= nil;
	local function done(outcome)
		if key then record_delivery(username, key, true); end
		return outcome;
	end
	if archived and who.uses_mam then
		return done("archived");
	end
	local targets = available_resources(who);
	if #targets > 0 then
		stanza.attr.to = who.bare;
		for _, target in ipairs(targets) do
			target.send(stanza);
		end
		return done("redirected");
	end
	-- without mod_offline nothing will store it: one attempt (mod_mam may still claim it)
	local attempts = modulemanager.is_loaded(host, "offline") and storage_retries or 0;
	for attempt = 0, attempts do
		local ok, stored = pcall(module.fire_event, module, "message/offline/handle",
			{ origin = who.session; username = username; stanza = stanza });
		if ok and stored then
			return done("offline");
		end
		if attempts > 0 then
			who.log("warn", "Offline storage refused a message from an expired session (attempt %d): %s",
				attempt + 1, ok and "not stored" or tostring(stored));
		end
		if attempt < attempts and async.ready() then
			pcall(async.sleep, 0.5 * (attempt + 1));
		end
	end
	if archived then
		return done("archived");
	end
	if module:fire_event("delivery/failure", { session = who.session; stanza = stanza }) then
		return done("handled");
	end
	if stanza.attr.from ~= who.full_jid then
		bounce(who, stanza, "recipient-unavailable",
			"The recipient's session expired before the message could be delivered");
	end
	return "bounced";
end

-- The policy may wait (storage retries) while the session is retired and its fields
-- cleared: it works on this snapshot of who the session was.
local function snapshot(session)
	return {
		session = session; log = session.log; host = session.host;
		username = session.username; resource = session.resource; full_jid = session.full_jid;
		bare = session.username .. "@" .. session.host;
		uses_mam = client_uses_mam(session);
	};
end

local function run_policy(job)
	local who = job.who;
	for _, item in ipairs(job.items) do
		local stanza = rebuild(who, item[1], item[2], item[4]);
		local outcome = stanza and dispose(who, stanza) or "unreadable";
		outcome_counters[outcome]:add(1);
		who.log("debug", "Unacked stanza (%s): %s", job.reason, outcome);
		module:fire_event("smacks-redirect", { origin = who.session; stanza = stanza; outcome = outcome; reason = job.reason });
	end
	if job.release then
		sm_user_add(who.username, -1);
	end
end

local policy_runner = async.runner(run_policy, {
	error = function (_, err) module:log("error", "Expiry policy failed: %s", err); end;
});

-- Hands every stanza still held by the session's queue to the policy; the queue is gone afterwards.
-- The oldest items shifted out of an engine queue until it holds `keep`, as the policy takes them.
local function shift_items(q, keep)
	local items = {};
	while q:count() > keep do
		local bytes, kind, flags, stamp = q:shift();
		items[#items + 1] = { bytes, kind, flags, stamp };
	end
	return items;
end

local function discard_queue(session, reason)
	local queue = session.outgoing_stanza_queue;
	if not queue then return; end
	session.outgoing_stanza_queue = nil;
	session.smacks = false;
	local items = shift_items(queue.q, 0);
	queue.q:close();
	session.log("debug", "Discarding queue with %d unacked stanzas (%s)", #items, reason);
	policy_runner:run({ who = snapshot(session); items = items; reason = reason; release = true });
end

-- s2s stream gone with stanzas unacknowledged: re-route them (smacks_s2s_resend) or return
-- an error to their senders, as mod_smacks does; errors and results are never answered.
local function s2s_dispose(session, bytes, kind, stamp, reason)
	local who = { log = session.log; host = session.from_host or session.to_host };
	local stanza = rebuild(who, bytes, kind, stamp);
	local outcome;
	if not stanza then
		outcome = "unreadable";
	elseif s2s_resend then
		module:send(stanza);
		outcome = "resent";
	elseif stanza.attr.type == "error" or stanza.attr.type == "result" then
		outcome = "ephemeral";
	elseif module:fire_event("delivery/failure", { session = session; stanza = stanza }) then
		outcome = "handled";
	else
		module:send(st.error_reply(stanza, "cancel", "recipient-unavailable"));
		outcome = "bounced";
	end
	outcome_counters[outcome]:add(1);
	module:fire_event("smacks-redirect", { origin = session; stanza = stanza; outcome = outcome; reason = reason });
end

local function handle_s2s_destroyed(event)
	local session = event.session;
	local queue = session.outgoing_stanza_queue;
	if not queue then return; end
	session.outgoing_stanza_queue = nil;
	session.smacks = false;
	local n = 0;
	while true do
		local bytes, kind, _, stamp = queue.q:shift();
		if not bytes then break; end
		n = n + 1;
		s2s_dispose(session, bytes, kind, stamp, "s2s");
	end
	queue.q:close();
	if n > 0 then
		session.log("warn", "s2s stream destroyed with %d unacked stanzas (%s)", n, s2s_resend and "re-routed" or "bounced");
	end
end
module:hook("s2sout-destroyed", handle_s2s_destroyed);
module:hook("s2sin-destroyed", handle_s2s_destroyed);

-- ---------------------------------------------------------------- outgoing stanzas

local stanza_mt = st.stanza_mt;
local getmetatable = getmetatable;

-- The engine's kind of a client stanza (message, presence, iq), or nil for anything else.
local function stanza_kind(stanza)
	local kind = KIND[stanza.name];
	if kind then
		local xmlns = stanza.attr.xmlns;
		if (xmlns == nil or xmlns == xmlns_client) and getmetatable(stanza) == stanza_mt then return kind; end
	end
	return nil;
end

-- A client that left a whole live queue unacknowledged has its connection closed, after the
-- write in progress: it resumes (acknowledging what it got) or its session ends.
local function close_unacking(session)
	if session.native_smacks_closing then return; end
	session.native_smacks_closing = true;
	module:add_timer(0, function ()
		session.native_smacks_closing = nil;
		local conn = session.conn;
		if conn and not session.destroyed and not session.hibernating then conn:close(); end
	end);
end

-- A push evicted the oldest unacknowledged stanza (the queue was full).
local function evicted(session, ev_bytes, ev_kind, ev_flags, ev_stamp)
	m_evicted:add(1);
	local capacity = session.outgoing_stanza_queue.q:capacity();
	if session.username then
		session.log("warn", "Stream management queue full (%d), handing the oldest unacked stanza to the expiry policy", capacity);
		policy_runner:run({ who = snapshot(session); items = { { ev_bytes, ev_kind, ev_flags, ev_stamp } }; reason = "overflow" });
		if not session.hibernating then close_unacking(session); end
	else
		-- s2s streams do not hibernate: it was written on this live stream, whose peer is far
		-- behind with its acks. Re-sending or bouncing it would only duplicate it (a re-send
		-- would even land in this very queue again); the ack timeout deals with a dead peer.
		outcome_counters.unconfirmed:add(1);
		session.log("warn", "Stream management queue full (%d): the oldest unacked stanza is no longer held (written, not yet acknowledged)",
			capacity);
	end
end

-- A session starting to hibernate is held to smacks_max_queue_size: what a burst queued beyond
-- it goes through the expiry policy now, the oldest first.
local function hold_for_hibernation(session)
	local queue = session.outgoing_stanza_queue;
	if not queue then return; end
	local q = queue.q;
	local items = shift_items(q, queue_size);
	q:set_capacity(queue_size);
	if #items > 0 then
		m_evicted:add(#items);
		session.log("warn", "Hibernating with %d unacked stanzas beyond smacks_max_queue_size (%d): handing them to the expiry policy",
			#items, queue_size);
		policy_runner:run({ who = snapshot(session); items = items; reason = "overflow" });
	end
end

local function queue_push(session, bytes, kind)
	local h, ev_bytes, ev_kind, ev_flags, ev_stamp = session.outgoing_stanza_queue.q:push(bytes, kind);
	m_queued:add(1);
	if ev_bytes then evicted(session, ev_bytes, ev_kind, ev_flags, ev_stamp); end
	return h;
end

-- What goes on the wire is queued as written: the first bytes/out filter sees each
-- stanza's serialization, and the engine recognises the stanzas XEP-0198 counts, so a
-- stanza is serialized once and no stanzas/out filter runs on a live TCP or WebSocket
-- stream.
local function outgoing_bytes_filter(data, session)
	local queue = session.outgoing_stanza_queue;
	if queue and not session.resending_unacked then
		local h, ev_bytes, ev_kind, ev_flags, ev_stamp = queue.q:push_stanza(data, xmlns_client);
		if h then
			m_queued:add(1);
			if ev_bytes then evicted(session, ev_bytes, ev_kind, ev_flags, ev_stamp); end
		end
	end
	return data;
end

-- The last stanzas/out filter of sessions whose bytes are not seen: a hibernating
-- session writes nothing (it gets this filter when it starts hibernating), and mod_bosh
-- has no bytes/out stage. Their stanzas are serialized and queued here.
local function unwritten_stanza_filter(stanza, session)
	if session.resending_unacked or not session.outgoing_stanza_queue then return stanza; end
	local kind = stanza_kind(stanza);
	if not kind then return stanza; end
	queue_push(session, tostring(stanza), kind);
	if session.hibernating then
		module:fire_event("smacks-hibernation-stanza-queued", {
			origin = session; queue = lazy_queue_table(session.outgoing_stanza_queue); stanza = stanza;
		});
		return nil;
	end
	return stanza;
end

local function count_incoming(stanza, session)
	if not stanza.attr.xmlns and session.handled_stanza_count then
		session.handled_stanza_count = (session.handled_stanza_count + 1) % H_MOD;
	end
	return stanza;
end

-- Queue what goes out (and count it); on s2s only the sending side does this.
local function wrap_session_out(session, resume)
	if not resume then
		session.outgoing_stanza_queue = new_queue(session);
		if session.username then sm_user_add(session.username, 1); end
	end
	if session.bosh_version or session.hibernating then
		filters.add_filter(session, "stanzas/out", unwritten_stanza_filter, -999);
	end
	-- first of the bytes/out filters, so that what is queued is the serialization itself
	filters.add_filter(session, "bytes/out", outgoing_bytes_filter, 1e9);
end

-- Count what comes in (for <a h/>).
local function wrap_session_in(session, resume)
	if not resume then
		session.handled_stanza_count = initial_h;
		ev_started:add(1);
	end
	filters.add_filter(session, "stanzas/in", count_incoming, 999);
end

local function wrap_session(session, resume)
	wrap_session_out(session, resume);
	wrap_session_in(session, resume);
	return session;
end

-- ---------------------------------------------------------------- acknowledgement requests

-- One timer per session watches the outstanding <r/> (smacks_max_ack_delay, smacks_ack_timeout).
-- It is armed when a request goes out and none is armed, and re-arms itself for what is
-- left of the newest request, so a peer that answers promptly costs no timer work per
-- round trip.
local function stop_ack_timers(session)
	if session.native_smacks_ack_timer then
		timer.stop(session.native_smacks_ack_timer);
		session.native_smacks_ack_timer = nil;
	end
	if session.native_smacks_pace_timer then
		timer.stop(session.native_smacks_pace_timer);
		session.native_smacks_pace_timer = nil;
	end
end

local function ack_delayed(session)
	if delayed_ack_timeout > 0 and session.awaiting_ack and not session.hibernating and not session.destroyed
	and session.outgoing_stanza_queue then
		module:fire_event("smacks-ack-delayed", {
			origin = session; queue = lazy_queue_table(session.outgoing_stanza_queue); stanza = nil;
		});
	end
end

-- No <a/> within smacks_ack_timeout of an <r/>: treat the link as dead and let the
-- session hibernate (or end, if it is not resumable) now instead of waiting for TCP.
-- An s2s stream is closed (what mod_s2s_smacks_timeout does, and Prosody 13): its
-- unacknowledged stanzas are then bounced or re-routed, and the next stanza for that
-- server opens a fresh connection.
local function ack_timed_out(session)
	session.log("info", "No acknowledgement within %ss, considering the connection dead", ack_timeout);
	if session.type == "s2sout" then
		session:close({ condition = "connection-timeout"; text = "No acknowledgement of stanzas" });
		return;
	end
	session.conn:close();
end

-- Dead-link detection applies to resumable client sessions and to outgoing s2s streams.
local function times_out(session)
	return ack_timeout > 0 and (session.resumption_token ~= nil or session.type == "s2sout");
end

local function ack_watch(session)
	local sent_at = session.native_smacks_r_time;
	if not session.awaiting_ack or not sent_at or session.hibernating or session.destroyed or not session.conn then
		session.native_smacks_ack_timer = nil;
		return nil;
	end
	local elapsed = now() - sent_at;
	local due;
	if delayed_ack_timeout > 0 and not session.native_smacks_delay_fired then
		if elapsed >= delayed_ack_timeout then
			session.native_smacks_delay_fired = true;
			ack_delayed(session);
			if session.destroyed or not session.awaiting_ack or not session.conn then
				session.native_smacks_ack_timer = nil;
				return nil;
			end
		else
			due = delayed_ack_timeout - elapsed;
		end
	end
	if times_out(session) then
		if elapsed >= ack_timeout then
			session.native_smacks_ack_timer = nil;
			ack_timed_out(session);
			return nil;
		end
		if not due or ack_timeout - elapsed < due then due = ack_timeout - elapsed; end
	end
	if not due then session.native_smacks_ack_timer = nil; end
	return due;
end

local function should_ack(session, force)
	if not session or session.destroyed or not session.smacks or session.hibernating or session.awaiting_ack then
		return false;
	end
	local queue = session.outgoing_stanza_queue;
	if not queue then return false; end
	if force then return true; end
	local max_unacked = session.state == "inactive" and max_inactive_unacked_stanzas or max_unacked_stanzas;
	return queue.q:unacked() > max_unacked and queue.q:sent() ~= session.last_requested_h;
end

local function request_ack(session, reason)
	local queue = session.outgoing_stanza_queue;
	session.log("debug", "Sending <r> (%s), %d unacked", reason, queue.q:unacked());
	session.awaiting_ack = true; -- before sending: the send may re-enter through pre-drain
	sm_send(session, st.stanza("r", { xmlns = session.smacks }));
	if session.destroyed or not session.outgoing_stanza_queue then return; end
	session.last_requested_h = queue.q:sent();
	session.native_smacks_r_time = now();
	session.native_smacks_delay_fired = nil;
	if not session.native_smacks_ack_timer and (delayed_ack_timeout > 0 or times_out(session)) then
		local first = delayed_ack_timeout > 0 and delayed_ack_timeout or ack_timeout;
		if times_out(session) and ack_timeout < first then first = ack_timeout; end
		session.native_smacks_ack_timer = timer.add_task(first, function () return ack_watch(session); end);
	end
end

-- A busy stream (at least PACE_BATCH stanzas since the last <r/>) gets at most one <r/>
-- per smacks_ack_request_interval while less than half the queue is unacknowledged: a
-- flood is acknowledged in a few round trips instead of one per write. A request that is
-- due but paced is sent when the interval is over. Light traffic is asked at once, so
-- the last stanzas before a pause are acknowledged as quickly as before.
local PACE_BATCH = 8;
local function request_ack_if_needed(session, force, reason)
	if not should_ack(session, force) then return; end
	if not force and ack_interval > 0 then
		local last = session.native_smacks_r_time;
		local wait = last and last + ack_interval - now();
		local q = session.outgoing_stanza_queue.q;
		if wait and wait > 0 and q:unacked() < pace_limit
		and (q:sent() - (session.last_requested_h or q:acked())) % H_MOD >= PACE_BATCH then
			if not session.native_smacks_pace_timer then
				session.native_smacks_pace_timer = timer.add_task(wait, function ()
					session.native_smacks_pace_timer = nil;
					if should_ack(session, false) then request_ack(session, "paced"); end
				end);
			end
			return;
		end
	end
	request_ack(session, reason);
end

for event_name, force in pairs({ ["csi-client-active"] = true; ["csi-flushing"] = false; ["c2s-pre-ondrain"] = false;
	["s2s-pre-ondrain"] = false }) do
	module:hook(event_name, function (event)
		request_ack_if_needed(event.session or event.origin, force, event_name);
	end);
end

local function handle_read_timeout(event)
	local session = event.session;
	if session.smacks then
		if session.awaiting_ack then
			stop_ack_timers(session);
			return false; -- a second read timeout with an <r/> unanswered: kick
		end
		request_ack_if_needed(session, true, "read timeout");
		return true;
	end
end
module:hook("c2s-read-timeout", handle_read_timeout);
module:hook("s2s-read-timeout", handle_read_timeout);

-- ---------------------------------------------------------------- enable

local function can_do_smacks(session, advertise_only)
	if session.smacks then return false, "unexpected-request", "Stream management is already enabled"; end
	if s2s_smacks and (session.type == "s2sin" or session.type == "s2sout") then
		return true;
	end
	if not session.username or not (session.type == "c2s" or session.type == "c2s_unbound") then
		return false, "not-authorized", "Stream management is available after authentication only";
	end
	if not advertise_only and not session.resource then
		return false, "unexpected-request", "Client must bind a resource before enabling stream management";
	end
	return true;
end

local function advertise(event)
	if can_do_smacks(event.origin, true) then
		event.features:tag("sm", { xmlns = xmlns_sm2 }):tag("optional"):up():up();
		event.features:tag("sm", { xmlns = xmlns_sm3 }):tag("optional"):up():up();
	end
end
module:hook("stream-features", advertise);
module:hook("s2s-stream-features", advertise);

local function failed(session, xmlns_sm, condition, h, extra)
	local f = st.stanza("failed", { xmlns = xmlns_sm; h = format_h(h) }):tag(condition, { xmlns = xmlns_errors }):up();
	if extra then f:add_child(extra); end
	sm_send(session, f);
	return true;
end

-- Old resumption ids kept for <failed h=.../>: at most smacks_max_old_sessions per user,
-- none older than smacks_old_sessions_ttl.
local function prune_old_sessions(username)
	local list, err = old_sessions:get(username);
	if not list then
		if err then module:log("error", "Unable to read old resumption counters: %s", err); end
		return;
	end
	local now, tokens = os.time(), {};
	for token, info in pairs(list) do
		if type(info) == "table" and (info.t or 0) > now - old_session_ttl then
			tokens[#tokens+1] = token;
		end
	end
	table.sort(tokens, function (a, b) return (list[a].t or 0) > (list[b].t or 0); end);
	local keep = {};
	for i = 1, math.min(#tokens, max_old_sessions) do keep[tokens[i]] = list[tokens[i]]; end
	old_sessions:set(username, next(keep) and keep or nil);
end

local function clamp_timeout(requested)
	local max = requested and engine.parse_h(requested);
	if not max then return resume_timeout; end
	return math.max(min_resume_timeout, math.min(resume_timeout, max));
end

local function handle_enable(session, stanza, xmlns_sm)
	local ok, condition, text = can_do_smacks(session);
	if not ok then
		session.log("warn", "Failed to enable stream management: %s", text);
		return failed(session, xmlns_sm, condition);
	end
	if session.username then prune_old_sessions(session.username); end
	session.smacks = xmlns_sm;
	wrap_session(session, false);
	local resume = stanza.attr.resume;
	local token, max;
	-- no resumption on s2s, nor over BOSH: mod_bosh keeps that session across requests itself,
	-- and a BOSH request has no stream of its own to carry another session over to
	if (resume == "true" or resume == "1") and session.username and not session.bosh_version then
		repeat
			token = new_token();
		until not session_registry[jid_join(session.username, host, token)];
		session_registry[jid_join(session.username, host, token)] = session;
		session.resumption_token = token;
		session.native_smacks_timeout = clamp_timeout(stanza.attr.max);
		max = ("%d"):format(session.native_smacks_timeout);
	end
	sm_send(session, st.stanza("enabled", {
		xmlns = xmlns_sm; id = token; resume = token and "true" or nil; max = max;
	}));
	return true;
end
module:hook_tag(xmlns_sm2, "enable", function (session, stanza) return handle_enable(session, stanza, xmlns_sm2); end, 100);
module:hook_tag(xmlns_sm3, "enable", function (session, stanza) return handle_enable(session, stanza, xmlns_sm3); end, 100);

-- s2s, sending side: enable when the remote offered it on an authenticated stream (after the
-- send queue of the connection attempt was flushed: those were never counted), as mod_smacks does.
module:hook_tag("http://etherx.jabber.org/streams", "features", function (session, stanza)
	timer.add_task(1e-6, function ()
		if session.type ~= "s2sout" or not can_do_smacks(session) then return; end
		local xmlns_sm;
		if stanza:get_child("sm", xmlns_sm3) then
			xmlns_sm = xmlns_sm3;
		elseif stanza:get_child("sm", xmlns_sm2) then
			xmlns_sm = xmlns_sm2;
		else
			return;
		end
		session.sends2s(st.stanza("enable", { xmlns = xmlns_sm }));
		session.smacks = xmlns_sm;
		wrap_session_out(session, false);
	end);
end);

local function handle_enabled(session, _, xmlns_sm)
	if session.type ~= "s2sout" then return; end
	session.smacks = xmlns_sm;
	wrap_session_in(session, false);
	return true;
end
module:hook_tag(xmlns_sm2, "enabled", function (session, stanza) return handle_enabled(session, stanza, xmlns_sm2); end, 100);
module:hook_tag(xmlns_sm3, "enabled", function (session, stanza) return handle_enabled(session, stanza, xmlns_sm3); end, 100);

-- ---------------------------------------------------------------- <r/> and <a/>

local function handle_r(session, _, xmlns_sm)
	if not session.smacks then return; end
	sm_send(session, st.stanza("a", { xmlns = xmlns_sm; h = format_h(session.handled_stanza_count) }));
	request_ack_if_needed(session, false, "piggybacked on <a/>");
	return true;
end
module:hook_tag(xmlns_sm2, "r", function (session, stanza) return handle_r(session, stanza, xmlns_sm2); end);
module:hook_tag(xmlns_sm3, "r", function (session, stanza) return handle_r(session, stanza, xmlns_sm3); end);

-- The error for an h the queue refuses: h beyond what was sent, or behind what was acknowledged.
local function ack_error(queue, h, code)
	if code == "head" then
		return {
			condition = "undefined-condition";
			text = "Client acknowledged more stanzas than sent by server";
			extra = st.stanza("handled-count-too-high", { xmlns = xmlns_sm3; h = format_h(h); ["send-count"] = format_h(queue.q:sent()) });
		};
	end
	return { condition = "undefined-condition"; text = "Client acknowledged fewer stanzas than already acknowledged" };
end

local function handle_a(session, stanza)
	if not session.smacks then return; end
	session.awaiting_ack = nil; -- the watch timer, if armed, ends itself
	local h = engine.parse_h(stanza.attr.h);
	if not h then
		session:close({ condition = "invalid-xml"; text = "Missing or invalid 'h' attribute" });
		return true;
	end
	local queue = session.outgoing_stanza_queue;
	local held = queue.q:count();
	local n, _, code = queue.q:ack(h);
	if not n then
		session.log("warn", "Client acknowledged h=%d; %d sent, %d acknowledged before", h, queue.q:sent(), queue.q:acked());
		session:close(ack_error(queue, h, code));
		return true;
	end
	m_acked:add(held - queue.q:count());
	request_ack_if_needed(session, false, "after <a/>");
	return true;
end
module:hook_tag(xmlns_sm2, "a", handle_a);
module:hook_tag(xmlns_sm3, "a", handle_a);

-- ---------------------------------------------------------------- closing and hibernation

module:hook("pre-session-close", function (event)
	local session = event.session;
	if session.smacks == nil then return; end
	if session.resumption_token then
		session_registry[jid_join(session.username, host, session.resumption_token)] = nil;
		old_session_map:set(session.username, session.resumption_token, nil);
		session.resumption_token = nil;
	end
	if session.hibernating_watchdog then
		session.hibernating_watchdog:cancel();
		session.hibernating_watchdog = nil;
	end
	stop_ack_timers(session);
	-- final <a/> (XEP-0198 1.5.2)
	if session.smacks and session.conn and session.handled_stanza_count then
		sm_send(session, st.stanza("a", { xmlns = session.smacks; h = format_h(session.handled_stanza_count) }));
	end
end);

local function forget_resumption(session)
	local token = session.resumption_token;
	if not token then return; end
	session_registry[jid_join(session.username, host, token)] = nil;
	old_session_map:set(session.username, token, { h = session.handled_stanza_count; t = os.time() });
	session.resumption_token = nil;
end

local function end_hibernation_count(session)
	if session.native_smacks_hibernating then
		session.native_smacks_hibernating = nil;
		hibernating_count = hibernating_count - 1;
		m_hibernating:set(hibernating_count);
	end
end

local function expire(session, why)
	if session.destroyed or not session.resumption_token then return; end
	session.log("debug", "Hibernation over (%s), destroying the session", why);
	if session.hibernating_watchdog then -- (expired early, by the per-user cap: its timer must not live on)
		session.hibernating_watchdog:cancel();
		session.hibernating_watchdog = nil;
	end
	forget_resumption(session);
	end_hibernation_count(session);
	session.resending_unacked = true; -- nothing more is queued
	sessionmanager.destroy_session(session, why);
	ev_expired:add(1);
end

-- The per-user cap: the oldest hibernating sessions beyond it expire now.
local function enforce_hibernation_cap(username)
	local user = local_sessions[username];
	if not user then return; end
	local list = {};
	for _, s in pairs(user.sessions) do
		if s.hibernating and s.resumption_token and not s.destroyed then list[#list+1] = s; end
	end
	if #list <= max_hibernated then return; end
	table.sort(list, function (a, b) return (a.native_smacks_hibernated or 0) < (b.native_smacks_hibernated or 0); end);
	for i = 1, #list - max_hibernated do
		ev_evicted:add(1);
		expire(list[i], "Too many hibernating sessions");
	end
end

-- mod_csi_battery_saver holds unimportant stanzas of an inactive client in its own queue
-- (session.pump) in front of ours. When the connection goes they are moved into ours, so
-- hibernation, resumption and the expiry policy see them instead of their dying with the
-- session; a hibernating session's pump then passes everything straight on (to be queued).
local function take_csi_pump(session, hibernating)
	local pump = session.pump;
	if type(pump) ~= "table" or type(pump.flush) ~= "function" or not session.outgoing_stanza_queue then return; end
	pump:flush(function (stanza)
		local kind = stanza_kind(stanza);
		if kind and session.outgoing_stanza_queue then
			queue_push(session, tostring(stanza), kind);
		end
	end);
	if hibernating and type(pump.resume) == "function" then pump:resume(); end
end

module:hook("pre-resource-unbind", function (event)
	local session = event.session;
	if not session.smacks then
		if session.outgoing_stanza_queue then
			take_csi_pump(session, false);
			discard_queue(session, "disconnect");
		end
		return;
	end
	if not session.resumption_token then
		end_hibernation_count(session);
		take_csi_pump(session, false);
		discard_queue(session, session.hibernating and "expired" or "disconnect");
		return;
	end
	if session.hibernating then return true; end

	session.hibernating = os.time();
	hold_for_hibernation(session);
	filters.add_filter(session, "stanzas/out", unwritten_stanza_filter, -999);
	take_csi_pump(session, true);
	hibernation_seq = hibernation_seq + 1;
	session.native_smacks_hibernated = hibernation_seq; -- orders sessions within the same second
	session.awaiting_ack = nil;
	stop_ack_timers(session);
	session.native_smacks_hibernating = true;
	hibernating_count = hibernating_count + 1;
	m_hibernating:set(hibernating_count);
	ev_hibernated:add(1);
	session.hibernating_watchdog = watchdog.new(session.native_smacks_timeout or resume_timeout, function ()
		expire(session, "Hibernating too long");
	end);
	if session.conn then
		local conn = session.conn;
		c2s_sessions[conn] = nil;
		session.conn = nil;
		conn:close();
	end
	session.log("debug", "Session hibernating for up to %ds", session.native_smacks_timeout or resume_timeout);
	module:fire_event("smacks-hibernation-start", {
		origin = session; queue = lazy_queue_table(session.outgoing_stanza_queue);
	});
	enforce_hibernation_cap(session.username);
	return true; -- not destroyed yet
end);

-- ---------------------------------------------------------------- resume

local function handle_resume(session, stanza, xmlns_sm)
	if session.full_jid then
		m_resume_failed:with_labels("after-bind"):add(1);
		return failed(session, xmlns_sm, "unexpected-request");
	end
	if not session.username or not (session.type == "c2s" or session.type == "c2s_unbound") then
		m_resume_failed:with_labels("unauthenticated"):add(1);
		return failed(session, xmlns_sm, "not-authorized");
	end
	if session.bosh_version or not session.rawsend then -- checked before the original is touched
		m_resume_failed:with_labels("bosh"):add(1);
		return failed(session, xmlns_sm, "feature-not-implemented");
	end
	local id = stanza.attr.previd;
	local h = engine.parse_h(stanza.attr.h);
	if type(id) ~= "string" or id == "" or not h then
		m_resume_failed:with_labels("bad-request"):add(1);
		return failed(session, xmlns_sm, "bad-request");
	end
	local original = session_registry[jid_join(session.username, host, id)];
	if not original or original.destroyed then
		local old = old_session_map:get(session.username, id);
		if type(old) == "table" and (old.t or 0) > os.time() - old_session_ttl then
			m_resume_failed:with_labels("expired"):add(1);
			return failed(session, xmlns_sm, "item-not-found", old.h);
		end
		m_resume_failed:with_labels("unknown"):add(1);
		return failed(session, xmlns_sm, "item-not-found");
	end

	-- Check h before touching anything: a refused resume leaves the original session as it was.
	local queue = original.outgoing_stanza_queue;
	local unacked = queue.q:unacked();
	local d = (h - queue.q:acked()) % H_MOD;
	if d > unacked then
		local code = d < H_MOD / 2 and "head" or "tail";
		m_resume_failed:with_labels("handled-count-too-high"):add(1);
		local err = ack_error(queue, h, code);
		return failed(session, xmlns_sm, err.condition, original.handled_stanza_count, err.extra);
	end

	if original.hibernating_watchdog then
		original.hibernating_watchdog:cancel();
		original.hibernating_watchdog = nil;
	end
	local age = original.hibernating and os.time() - original.hibernating or 0;
	if original.conn then
		-- still connected: tell the old connection it was replaced
		original.log("debug", "Resumed from another connection, closing this one with <conflict/>");
		local conn = original.conn;
		c2s_sessions[conn] = nil;
		pcall(original.rawsend, st.stanza("stream:error"):tag("conflict", { xmlns = xmlns_streams }):up()
			:tag("text", { xmlns = xmlns_streams }):text("Replaced by a resumed session"):up());
		pcall(original.rawsend, "</stream:stream>");
		conn:close();
	end
	stop_ack_timers(original);
	end_hibernation_count(original);

	-- Move the new connection into the original session (as mod_smacks does).
	local migrated_log = session.log;
	original.ip = session.ip;
	original.conn = session.conn;
	original.rawsend = session.rawsend;
	original.rawsend.session = original;
	original.rawsend.conn = original.conn;
	original.send = session.send;
	original.send.session = original;
	original.close = session.close;
	original.filter = session.filter;
	original.filter.session = original;
	original.filters = session.filters;
	original.send.filter = original.filter;
	original.stream = session.stream;
	original.secure = session.secure;
	original.hibernating = nil;
	original.resumption_counter = (original.resumption_counter or 0) + 1;
	session.log = original.log;
	session.type = original.type;
	wrap_session(original, true);
	if original.username then refresh_recording(original.username); end
	original.stream:set_session(original);
	c2s_sessions[session.conn] = original;

	queue.q:set_capacity(live_queue_size); -- connected again
	local held = queue.q:count();
	queue.q:ack(h);
	m_acked:add(held - queue.q:count());
	original.send(st.stanza("resumed", { xmlns = xmlns_sm; h = format_h(original.handled_stanza_count); previd = id }));

	session.resending_unacked = true;
	original.resending_unacked = true;
	local n = 0;
	for _, bytes, kind, _, stamp in queue.q:items() do
		local s = rebuild(original, bytes, kind, stamp);
		if s then
			session.send(s);
			n = n + 1;
		end
	end
	session.resending_unacked = nil;
	original.resending_unacked = nil;
	m_replayed:add(n);
	function session.send(s) -- luacheck: ignore 432
		migrated_log("error", "Tried to send stanza on old session migrated by smacks resume: %s", tostring(s));
		return false;
	end
	ev_resumed:add(1);
	original.log("debug", "Resumed after %ds, %d stanzas replayed", age, n);
	module:fire_event("smacks-hibernation-end", { origin = session; resumed = original; queue = lazy_queue_table(queue) });
	original.awaiting_ack = nil;
	original.last_requested_h = nil;
	request_ack_if_needed(original, true, "resumed");
	return true;
end
module:hook_tag(xmlns_sm2, "resume", function (session, stanza) return handle_resume(session, stanza, xmlns_sm2); end);
module:hook_tag(xmlns_sm3, "resume", function (session, stanza) return handle_resume(session, stanza, xmlns_sm3); end);

-- ---------------------------------------------------------------- shutdown

module:hook_global("server-stopping", function (event)
	for _, user in pairs(local_sessions) do
		for _, session in pairs(user.sessions) do
			if session.resumption_token then
				forget_resumption(session);
				end_hibernation_count(session);
				discard_queue(session, "shutdown");
				if session.conn then
					session.conn:close();
					session.conn = nil;
				end
				session:close({ condition = "system-shutdown"; text = event.reason });
			end
		end
	end
end, -90);

module:hook_global("stats-update", function ()
	m_memory:set(engine.memory());
end);

-- Core mod_smacks loaded after us on the same host: step aside (both would answer the
-- same elements) and say what to change.
module:hook("module-loaded", function (event)
	if event.host == host and event.module == "smacks" then
		module:log_status("error", "mod_smacks was loaded on %s next to mod_native_smacks, which unloads itself: "
			.. "put \"smacks\" in modules_disabled", host);
		timer.add_task(0, function () modulemanager.unload(host, "native_smacks"); end);
	end
end);

-- A module reload keeps the bookkeeping of the sessions that outlive it (their queues and
-- filters live in the sessions): without it, a session from before the reload would end by
-- subtracting from counts it never added to.
local reloading = false;
function module.save()
	reloading = true; -- only a reload saves: module.unload then leaves the sessions as they are
	return { delivered = delivered; sm_users = sm_users; hibernating_count = hibernating_count;
		hibernation_seq = hibernation_seq };
end

-- Unloaded for good (or stepping aside for mod_smacks): no session may keep this module's
-- queue and filters, which nothing would serve any more. A hibernating session can no longer
-- be resumed and expires; a connected one goes on without stream management, its unacked
-- stanzas handed to the expiry policy as at a disconnect.
local function leave_session(session)
	filters.remove_filter(session, "bytes/out", outgoing_bytes_filter);
	filters.remove_filter(session, "stanzas/out", unwritten_stanza_filter);
	filters.remove_filter(session, "stanzas/out", record_out);
	filters.remove_filter(session, "stanzas/in", count_incoming);
	local queue = session.outgoing_stanza_queue;
	if getmetatable(queue) ~= queue_mt then return; end
	stop_ack_timers(session);
	if not session.username then -- s2s: written on a stream that goes on, most likely delivered
		local n = queue.q:count();
		outcome_counters.unconfirmed:add(n);
		queue.q:close();
		session.outgoing_stanza_queue, session.smacks = nil, false;
		if n > 0 then session.log("warn", "mod_native_smacks unloaded with %d unacked stanzas on this stream", n); end
		return;
	end
	if session.hibernating and session.resumption_token then
		expire(session, "mod_native_smacks unloaded");
		return;
	end
	forget_resumption(session);
	discard_queue(session, "unload");
	session.smacks = nil;
end

function module.unload()
	if reloading then return; end
	for _, user in pairs(local_sessions) do
		for _, session in pairs(user.sessions or {}) do leave_session(session); end
	end
	for _, session in pairs(prosody.hosts[host].s2sout or {}) do leave_session(session); end
	for session in pairs(prosody.incoming_s2s or {}) do
		if session.to_host == host then leave_session(session); end
	end
end

function module.restore(state)
	delivered = state.delivered or delivered;
	sm_users = state.sm_users or sm_users;
	hibernating_count = state.hibernating_count or hibernating_count;
	hibernation_seq = state.hibernation_seq or hibernation_seq;
	m_hibernating:set(hibernating_count);
	for username in pairs(sm_users) do refresh_recording(username); end
end
