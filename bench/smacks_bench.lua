-- prosody-native: stream management queue benchmark, side by side with Prosody 0.12's mod_smacks path.
--   sh bench/lua_bench.sh smacks [--quick]
-- Needs LUA_PATH with Prosody's source (util.stanza, util.smqueue, util.datetime, util.jid) and LUA_CPATH with
-- this checkout's build directory; `sh bench/lua_bench.sh smacks` sets both.
--
-- What is timed, per outgoing stanza on a stream-management session (the part that differs between the modules;
-- both serialise the stanza once for the wire, which is not counted):
--   prosody  mod_smacks' stanzas/out filter: st.clone(stanza) + <delay/> + util.smqueue push
--   native   mod_native_smacks' bytes/out filter: push_stanza the bytes the send path produced into
--            prosody_native.smqueue, which recognises the stanza's kind
-- plus the acknowledgement (ack every 1, 10, 100 stanzas), with counters started near 2^32 for the native queue.
-- Each case asserts the queue's counts and order inside the loop, so a fast but wrong queue cannot win.
-- Memory: bytes per queued small chat message at depth 500 x SESSIONS hibernated sessions (default 1000; env
-- SMACKS_BENCH_SESSIONS), measured as Lua heap growth plus, for native, the engine's own accounting.
-- Output: one line per measurement, then "ratio" lines (prosody / native), medians of REPS runs.

local st = require "util.stanza";
local smqueue = require "util.smqueue";
local datetime = require "util.datetime";
local jid_bare = require "util.jid".bare;
local native = require "prosody_native.smqueue";

local quick = arg[1] == "--quick";
local N = quick and 20000 or 100000;
local REPS = quick and 3 or 5;
local SESSIONS = tonumber(os.getenv("SMACKS_BENCH_SESSIONS")) or (quick and 100 or 1000);
local DEPTH = 500;

local function median(t)
	table.sort(t);
	return t[(#t + 1) // 2];
end

local results = {};
local function report(name, value, unit)
	results[name] = value;
	print(("%-66s %10.2f %s"):format(name, value, unit));
end

-- A small chat message as routed to a client (≈450 bytes serialized), and its bytes.
local function chat(i)
	return st.message({ to = "juliet@capulet.example/phone", from = "romeo@montague.example/orchard",
		type = "chat", id = ("msg-%08d"):format(i), ["xml:lang"] = "en" })
		:tag("body"):text("Wherefore art thou, Romeo? Deny thy father and refuse thy name; or, if thou wilt not, "
			.. "be but sworn my love, and I'll no longer be a Capulet."):up()
		:tag("active", { xmlns = "http://jabber.org/protocol/chatstates" }):up()
		:tag("request", { xmlns = "urn:xmpp:receipts" }):up()
		:tag("stanza-id", { xmlns = "urn:xmpp:sid:0", by = "juliet@capulet.example", id = ("K2b%013d"):format(i) }):up()
		:tag("origin-id", { xmlns = "urn:xmpp:sid:0", id = ("o-%08d"):format(i) }):up();
end

local stanzas, bytes = {}, {};
for i = 1, 256 do
	stanzas[i] = chat(i);
	bytes[i] = tostring(stanzas[i]);
end
local avg_len = 0;
for i = 1, #bytes do avg_len = avg_len + #bytes[i]; end
avg_len = avg_len / #bytes;

-- ---------------------------------------------------------------- the two per-stanza paths

local session = { full_jid = "juliet@capulet.example/phone", host = "capulet.example", smacks = "urn:xmpp:sm:3" };
local xmlns_delay = "urn:xmpp:delay";

-- mod_smacks 0.12.3 outgoing_stanza_filter, minus logging (the part that runs per stanza)
local function prosody_filter(stanza, queue)
	local is_stanza = st.is_stanza(stanza) and (not stanza.attr.xmlns or stanza.attr.xmlns == "jabber:client")
		and not stanza.name:find":";
	if is_stanza then
		local cached_stanza = st.clone(stanza);
		if cached_stanza.name ~= "iq" and cached_stanza:get_child("delay", xmlns_delay) == nil then
			cached_stanza = cached_stanza:tag("delay", {
				xmlns = xmlns_delay,
				from = jid_bare(session.full_jid or session.host),
				stamp = datetime.datetime()
			});
		end
		queue:push(cached_stanza);
	end
	return stanza;
end

-- mod_native_smacks outgoing_bytes_filter (same statements as the module; the overflow branch never runs here)
local function native_bytes_filter(data, s)
	local queue = s.outgoing_stanza_queue;
	if queue and not s.resending_unacked then
		local h, ev_bytes = queue.q:push_stanza(data, "jabber:client");
		if h then
			if ev_bytes then error("bench: the queue overflowed"); end
		end
	end
	return data;
end

-- ---------------------------------------------------------------- per-stanza cost

local function run_prosody(n, ack_every)
	local queue = smqueue.new(DEPTH);
	collectgarbage();
	local t0 = os.clock();
	for i = 1, n do
		prosody_filter(stanzas[(i & 255) + 1], queue);
		if i % ack_every == 0 then
			assert(queue:ack(i));
			assert(queue:count_unacked() == 0);
		end
	end
	local t = os.clock() - t0;
	assert(queue:count_acked() == n - n % ack_every);
	return t * 1e9 / n;
end

local H0 = 4294967295 - 1000; -- wraps during the run
local function run_native(n, ack_every)
	local s = { smacks = "urn:xmpp:sm:3"; outgoing_stanza_queue = { q = native.new(DEPTH, H0) } };
	local q = s.outgoing_stanza_queue.q;
	collectgarbage();
	local t0 = os.clock();
	for i = 1, n do
		local k = (i & 255) + 1;
		native_bytes_filter(bytes[k], s);
		if i % ack_every == 0 then
			assert(q:ack((H0 + i) % 4294967296));
			assert(q:unacked() == 0);
		end
	end
	local t = os.clock() - t0;
	assert(q:acked() == (H0 + n - n % ack_every) % 4294967296);
	q:close();
	return t * 1e9 / n;
end

print(("smacks bench: %d stanzas per case, %d reps (median), message %.0f bytes serialized"):format(N, REPS, avg_len));

for _, every in ipairs({ 1, 10, 100 }) do
	local tp, tn = {}, {};
	for r = 1, REPS do
		tp[r] = run_prosody(N, every);
		tn[r] = run_native(N, every);
	end
	report(("per stanza, ack every %d: prosody clone+delay+push+ack"):format(every), median(tp), "ns");
	report(("per stanza, ack every %d: native filter+push+ack"):format(every), median(tn), "ns");
	report(("ratio per stanza, ack every %d (prosody / native)"):format(every), median(tp) / median(tn), "x");
end

-- Order and replay check (the thing a resume depends on), outside the timed loops.
do
	local q = native.new(DEPTH, H0);
	for i = 1, DEPTH do q:push_stanza(bytes[(i & 255) + 1]); end
	local n = 0;
	for i, b, kind in q:items() do
		n = n + 1;
		assert(b == bytes[(i & 255) + 1] and kind == native.MESSAGE, "order");
	end
	assert(n == DEPTH);
	q:close();
end

-- ---------------------------------------------------------------- memory per queued stanza

local function heap_bytes()
	collectgarbage(); collectgarbage();
	return collectgarbage("count") * 1024;
end

-- Resident set size, so allocator overhead counts too (Linux /proc).
local function rss_bytes()
	local f = io.open("/proc/self/statm");
	if not f then return nil; end
	local _, resident = f:read("n", "n");
	f:close();
	return resident * 4096;
end

local function mem_prosody()
	local base, rss0 = heap_bytes(), rss_bytes();
	local queues = {};
	for s = 1, SESSIONS do
		local q = smqueue.new(DEPTH);
		for i = 1, DEPTH do prosody_filter(stanzas[((s + i) & 255) + 1], q); end
		queues[s] = q;
	end
	local used, rss = heap_bytes() - base, rss_bytes();
	assert(queues[SESSIONS]:count_unacked() == DEPTH);
	queues = nil; -- luacheck: ignore 311
	collectgarbage();
	return used / (SESSIONS * DEPTH), rss and (rss - rss0) / (SESSIONS * DEPTH);
end

local function mem_native()
	local base, nbase, rss0 = heap_bytes(), native.memory(), rss_bytes();
	local queues = {};
	for s = 1, SESSIONS do
		local q = native.new(DEPTH);
		for i = 1, DEPTH do q:push(bytes[((s + i) & 255) + 1], 1); end
		queues[s] = q;
	end
	local used, rss = heap_bytes() - base + native.memory() - nbase, rss_bytes();
	assert(queues[SESSIONS]:count() == DEPTH);
	for s = 1, SESSIONS do queues[s]:close(); end
	return used / (SESSIONS * DEPTH), rss and (rss - rss0) / (SESSIONS * DEPTH);
end

-- native first: the Lua heap the reference leaves behind would otherwise be reused by the C allocations
local mn, mn_rss = mem_native();
local mp, mp_rss = mem_prosody();
local label = ("%d sessions x depth %d"):format(SESSIONS, DEPTH);
report(("memory per queued message, %s: prosody (heap)"):format(label), mp, "B");
report(("memory per queued message, %s: native (heap + engine)"):format(label), mn, "B");
if mp_rss and mn_rss then
	report(("memory per queued message, %s: prosody (RSS)"):format(label), mp_rss, "B");
	report(("memory per queued message, %s: native (RSS)"):format(label), mn_rss, "B");
	report("ratio memory per queued message, RSS (prosody / native)", mp_rss / mn_rss, "x");
end
report("ratio memory per queued message (prosody / native)", mp / mn, "x");

-- Targets from issue 4: per-stanza path at least 5x cheaper, memory at most a quarter.
local ok = true;
for _, every in ipairs({ 1, 10, 100 }) do
	local r = results[("ratio per stanza, ack every %d (prosody / native)"):format(every)];
	if r < 5 then ok = false; print(("target missed: per-stanza ratio %.2f < 5 (ack every %d)"):format(r, every)); end
end
if mp / mn < 4 then ok = false; print(("target missed: memory ratio %.2f < 4"):format(mp / mn)); end
if mp_rss and mn_rss and mp_rss / mn_rss < 4 then
	ok = false; print(("target missed: RSS memory ratio %.2f < 4"):format(mp_rss / mn_rss));
end
print(ok and "targets met (per stanza >= 5x, memory >= 4x)" or "some targets missed");
