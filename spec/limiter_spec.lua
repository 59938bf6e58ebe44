-- prosody_native.limiter on its own: addresses, rates, the rate table, strikes and
-- bans, on a manual clock (time only moves when a spec advances it).

local limiter = require "prosody_native.limiter";

local function addr(text) return (assert(limiter.address(text))); end

local function manual(options)
	options = options or {};
	options.clock = "manual";
	options.seed = options.seed or "0123456789abcdef"; -- deterministic sets: every run sees the same collisions
	return assert(limiter.new(options));
end

describe("prosody_native.limiter", function ()
	it("reports its interface version", function ()
		assert.equal(1, limiter._ABI);
	end);

	describe("addresses", function ()
		it("packs IPv4 as IPv4-mapped IPv6 and says which family", function ()
			local k, fam = limiter.address("192.0.2.1");
			assert.equal(16, #k);
			assert.equal("ipv4", fam);
			assert.equal(("\0"):rep(10) .. "\255\255\192\0\2\1", k);
		end);

		it("treats IPv4-mapped IPv6 as the same IPv4 address", function ()
			local k, fam = limiter.address("::ffff:192.0.2.1");
			assert.equal("ipv4", fam);
			assert.equal(addr("192.0.2.1"), k);
			assert.equal(addr("192.0.2.1"), addr("[::ffff:c000:201]"));
		end);

		it("reads IPv6 with brackets or a zone id", function ()
			local k, fam = limiter.address("2001:db8::1");
			assert.equal("ipv6", fam);
			assert.equal(k, addr("[2001:db8::1]"));
			assert.equal(addr("fe80::1"), addr("fe80::1%eth0"));
			assert.equal("2001:db8::1", limiter.format(k));
		end);

		it("refuses what is not an address", function ()
			for _, bad in ipairs({ "", "x", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "2001:db8::1::2", "[::1",
				"::1]", "fe80::1%", "1.2.3.4%eth0", "1.2.3.4/24", "::1\0", ("1"):rep(80), " 1.2.3.4", "[]" }) do
				local k, err, code = limiter.address(bad);
				assert.is_nil(k, bad);
				assert.equal("not an IP address", err);
				assert.equal("invalid-address", code);
			end
		end);

		it("parses prefixes into masked keys with lengths in IPv6 bits", function ()
			local k, bits = limiter.prefix("2001:db8:1:2::5/48");
			assert.equal(48, bits);
			assert.equal(addr("2001:db8:1::"), k);
			k, bits = limiter.prefix("198.51.100.77/24");
			assert.equal(120, bits);
			assert.equal(addr("198.51.100.0"), k);
			assert.equal("198.51.100.0/24", limiter.format(k, bits));
			k, bits = limiter.prefix("198.51.100.77");
			assert.equal(128, bits);
			assert.equal("198.51.100.77", limiter.format(k, bits));
			k, bits = limiter.prefix("::/0");
			assert.equal(0, bits);
			assert.equal("::/0", limiter.format(k, bits));
			assert.equal("2001:db8::/32", limiter.format(addr("2001:db8:ffff::1"), 32));
		end);

		it("refuses bad prefixes", function ()
			for _, bad in ipairs({ "1.2.3.4/33", "2001:db8::/129", "1.2.3.4/", "1.2.3.4/x", "1.2.3.4/024", "/24",
				"1.2.3.4/2/4", "2001:db8::/1000" }) do
				local k, err, code = limiter.prefix(bad);
				assert.is_nil(k, bad);
				assert.equal("not an IP address or CIDR prefix", err);
				assert.equal("invalid-prefix", code);
			end
		end);

		it("round-trips every prefix length through format and prefix", function ()
			for bits = 0, 128 do
				local k = limiter.prefix("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff/" .. bits);
				local k2, bits2 = limiter.prefix(limiter.format(k, bits));
				assert.equal(k, k2);
				assert.equal(bits, bits2);
			end
			for bits = 0, 32 do
				local k, plen = limiter.prefix("203.0.113.255/" .. bits);
				assert.equal(96 + bits, plen);
				assert.same({ k, plen }, { limiter.prefix(limiter.format(k, plen)) });
			end
		end);

		it("checks key arguments", function ()
			assert.has_error(function () limiter.format("short"); end);
			assert.has_error(function () limiter.format(addr("::1"), 129); end);
		end);
	end);

	describe("rates", function ()
		local function rate(s) return { limiter.parse_rate(s) }; end
		it("reads counts per unit, periods and bursts", function ()
			assert.same({ 10 / 60, 10 }, rate("10/min"));
			assert.same({ 3, 10 }, rate("3/s burst 10"));
			assert.same({ 2 / 600, 2 }, rate("2/10min"));
			assert.same({ 0.2, 1 }, rate("1 / 5 s"));
			assert.same({ 0.5, 1 }, rate("0.5/s"));
			assert.same({ 100 / 3600, 100 }, rate("100/hour"));
			assert.same({ 20 / 60, 20 }, rate("20/minute burst 20"));
			assert.same({ 1 / 86400, 5 }, rate("1/day burst 5"));
		end);

		it("refuses anything else", function ()
			for _, bad in ipairs({ "", "10", "10/", "/min", "0/min", "-1/min", "10/fortnight", "10/min burst",
				"10/min burst 0", "10/min burst 1.5", "10/min bust 3", "10/min burst 3 extra", "10/0min", "1e3/s",
				"10/minx", "2000000/s", "1/s burst 1000001" }) do
				local r, err, code = limiter.parse_rate(bad);
				assert.is_nil(r, bad);
				assert.matches("not a rate", err);
				assert.equal("invalid-rate", code);
			end
		end);
	end);

	describe("new", function ()
		it("names the option it refuses", function ()
			assert.has_error(function () limiter.new({ capacity = 10 }); end, "option 'capacity' must be from 64 to 67108864");
			assert.has_error(function () limiter.new({ offenders = "many" }); end, "option 'offenders' must be an integer");
			assert.has_error(function () limiter.new({ clock = "wall" }); end,
				"option 'clock' must be \"monotonic\" or \"manual\", not \"wall\"");
			assert.has_error(function () limiter.new({ seed = "short" }); end,
				"option 'seed' must be a string of at least 16 bytes");
			assert.has_error(function () limiter.new({ ban_factor = 0.5 }); end);
			assert.has_error(function () limiter.new({ ban_initial = 600, ban_max = 60 }); end,
				"option 'ban_max' must not be less than 'ban_initial'");
		end);

		it("rounds capacity up to whole sets and reports fixed memory", function ()
			local lim = manual({ capacity = 1000, offenders = 100 });
			local s = lim:stats();
			assert.equal(1024, s.capacity);
			assert.equal(128, s.offender_capacity);
			assert.equal(32, s.entry_size);
			assert.equal(64, s.offender_size);
			assert.is_true(s.memory >= 1024 * 32 + 128 * 64);
			assert.equal(0, s.tracked);
		end);

		it("is closed by <close> and refuses use after close", function ()
			local outer;
			do
				local lim <close> = manual();
				outer = lim;
				assert.matches("^limiter %(65536 entries", tostring(lim));
			end
			assert.equal("limiter (closed)", tostring(outer));
			assert.has_error(function () outer:stats(); end, "attempt to use a closed limiter");
			outer:close(); -- twice is fine
		end);

		it("validates rules", function ()
			local lim = manual();
			assert.has_error(function () lim:rule("x", { { family = "ipv4", bits = 33, rate = 1 } }); end);
			assert.has_error(function () lim:rule("x", { { family = "ipv5", rate = 1 } }); end);
			assert.has_error(function () lim:rule("x", { { family = "any", bits = 8, rate = 1 } }); end);
			assert.has_error(function () lim:rule("x", { { rate = 0 } }); end);
			assert.has_error(function () lim:rule("x", { { rate = 1, burst = 0 } }); end);
			assert.has_error(function () lim:rule("", {}); end);
			assert.has_error(function () lim:check(1, addr("::1")); end);
		end);
	end);

	describe("check", function ()
		it("allows a burst, then one event per interval", function ()
			local lim = manual();
			local r = lim:rule("login", { { family = "ipv4", bits = 32, rate = 1, burst = 3 } });
			local k = addr("192.0.2.1");
			for _ = 1, 3 do assert.same({ true, 0 }, { lim:check(r, k) }); end
			assert.same({ false, 1, 1 }, { lim:check(r, k) });
			lim:advance(0.5);
			assert.same({ false, 0.5, 1 }, { lim:check(r, k) });
			lim:advance(0.5);
			assert.same({ true, 0 }, { lim:check(r, k) });
			assert.is_false((lim:check(r, k)));
			-- another address has its own budget; an IPv6 one is not covered by an IPv4 level
			assert.is_true((lim:check(r, addr("192.0.2.2"))));
			for _ = 1, 10 do assert.is_true((lim:check(r, addr("2001:db8::1")))); end
		end);

		it("charges a cost and reserves a delayed slot within max_wait", function ()
			local lim = manual();
			local r = lim:rule("s", { { family = "ipv6", bits = 128, rate = 2, burst = 2 } });
			local k = addr("2001:db8::7");
			assert.is_true((lim:check(r, k, 2)));
			assert.same({ false, 0.5, 1 }, { lim:check(r, k) });
			assert.same({ true, 0.5, 1 }, { lim:check(r, k, 1, 0.5) }); -- reserved: the caller waits 0.5 s
			assert.same({ false, 1, 1 }, { lim:check(r, k, 1, 0.9) });
			lim:advance(0.5);
			assert.same({ true, 0.5, 1 }, { lim:check(r, k, 1, 1) });
		end);

		it("aggregates prefixes and charges every level only when all allow", function ()
			local lim = manual();
			local r = lim:rule("login", {
				{ family = "ipv6", bits = 128, rate = 1, burst = 2 },
				{ family = "ipv6", bits = 64, rate = 1, burst = 3 },
				{ family = "ipv6", bits = 48, rate = 1, burst = 4 },
				{ family = "ipv4", bits = 32, rate = 1, burst = 2 },
				{ family = "ipv4", bits = 24, rate = 1, burst = 3 },
			});
			assert.is_true((lim:check(r, addr("2001:db8:1:1::1"))));
			assert.is_true((lim:check(r, addr("2001:db8:1:1::1"))));
			assert.same({ false, 1, 1 }, { lim:check(r, addr("2001:db8:1:1::1")) });
			assert.is_true((lim:check(r, addr("2001:db8:1:1::2"))));
			assert.same({ false, 1, 2 }, { lim:check(r, addr("2001:db8:1:1::3")) }); -- the /64 is spent
			assert.is_true((lim:check(r, addr("2001:db8:1:2::1"))));
			assert.same({ false, 1, 3 }, { lim:check(r, addr("2001:db8:1:3::1")) }); -- the /48 is spent
			assert.is_true((lim:check(r, addr("2001:db8:2::1")))); -- another /48
			-- a refused check charged nothing: after one interval the /48 admits exactly one more
			lim:advance(1);
			assert.is_true((lim:check(r, addr("2001:db8:1:4::1"))));
			assert.is_false((lim:check(r, addr("2001:db8:1:5::1"))));
			-- IPv4 /24, with IPv4-mapped IPv6 counted with IPv4
			assert.is_true((lim:check(r, addr("198.51.100.1"))));
			assert.is_true((lim:check(r, addr("::ffff:198.51.100.1"))));
			assert.same({ false, 1, 4 }, { lim:check(r, addr("198.51.100.1")) });
			assert.is_true((lim:check(r, addr("198.51.100.2"))));
			assert.same({ false, 1, 5 }, { lim:check(r, addr("198.51.100.3")) });
			assert.is_true((lim:check(r, addr("198.51.101.3"))));
		end);

		it("applies a global level to both families", function ()
			local lim = manual();
			local r = lim:rule("global", { { family = "any", rate = 1, burst = 2 } });
			assert.is_true((lim:check(r, addr("192.0.2.1"))));
			assert.is_true((lim:check(r, addr("2001:db8::1"))));
			assert.same({ false, 1, 1 }, { lim:check(r, addr("203.0.113.9")) });
		end);

		it("keeps state when a rule is redefined with new rates", function ()
			local lim = manual();
			local r = lim:rule("x", { { family = "ipv4", rate = 1, burst = 1 } });
			assert.is_true((lim:check(r, addr("192.0.2.1"))));
			assert.is_false((lim:check(r, addr("192.0.2.1"))));
			assert.equal(r, lim:rule("x", { { family = "ipv4", rate = 1, burst = 2 } }));
			assert.is_true((lim:check(r, addr("192.0.2.1"))));
			assert.equal(r + 1, lim:rule("y", { { rate = 1 } }));
		end);

		it("has a bound checker with the same answers", function ()
			local lim = manual();
			local r = lim:rule("x", { { family = "ipv4", rate = 1, burst = 2 } });
			local check = lim:checker(r);
			local k = addr("192.0.2.9");
			assert.same({ true, 0 }, { check(k) });
			assert.same({ true, 0 }, { check(k) });
			assert.same({ false, 1, 1 }, { check(k) });
			assert.same({ true, 1, 1 }, { check(k, 1, 1) });
			assert.has_error(function () check("short"); end);
			assert.has_error(function () lim:checker(99); end);
			lim:close();
			assert.has_error(function () check(k); end, "attempt to use a closed limiter");
		end);

		it("has per-session handles that answer as lim:check does, on every level", function ()
			local a, b = manual(), manual();
			local levels = {
				{ family = "ipv6", bits = 128, rate = 1, burst = 2 },
				{ family = "ipv6", bits = 64, rate = 1, burst = 3 },
				{ family = "ipv4", bits = 32, rate = 1, burst = 2 },
				{ family = "ipv4", bits = 24, rate = 1, burst = 3 },
				{ family = "any", rate = 2, burst = 6 },
			};
			local ra, rb = a:rule("x", levels), b:rule("x", levels);
			local texts = { "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1", "192.0.2.1", "192.0.2.2", "::ffff:192.0.2.1" };
			local handles = {};
			for i, t in ipairs(texts) do handles[i] = a:handle(ra, addr(t)); end
			math.randomseed(11);
			for step = 1, 400 do
				local i = math.random(#texts);
				local cost, wait = math.random(0, 2), math.random(0, 1) * 0.5;
				local want = { b:check(rb, addr(texts[i]), cost, wait) };
				assert.same({ want[1], want[2] }, { handles[i](cost, wait) }, "step " .. step);
				if step % 7 == 0 then a:advance(0.3); b:advance(0.3); end
			end
		end);

		it("handles find their entries again after eviction, reset and rule changes", function ()
			local lim = manual({ capacity = 64 });
			local r = lim:rule("x", { { family = "ipv4", rate = 1, burst = 2 } });
			local k = addr("192.0.2.9");
			local h = lim:handle(r, k);
			assert.same({ true, 0 }, { h() });
			assert.same({ true, 0 }, { h() });
			assert.same({ false, 1 }, { h() });
			assert.same({ false, 1, 1 }, { lim:check(r, k) }); -- one state, however it is reached
			assert.equal(1, lim:reset(k));
			assert.same({ true, 0 }, { h() }); -- its entry was cleared: a fresh one
			lim:advance(10); -- idle again, and the oldest: the first entry a flood replaces
			-- a flood of other keys takes its slot; the handle must not charge whatever holds it now
			for i = 1, 2000 do lim:check(r, addr(("198.51.%d.%d"):format(i // 250, i % 250))); end
			local before = {};
			for i = 1, 2000 do
				local e = lim:show(addr(("198.51.%d.%d"):format(i // 250, i % 250))).rules[1];
				before[i] = e and e.tokens or false;
			end
			assert.same({ true, 0 }, { h() });
			assert.same({ true, 0 }, { h() });
			assert.same({ false, 1 }, { h() }); -- a fresh entry of its own, spent after two
			for i = 1, 2000 do
				local e = lim:show(addr(("198.51.%d.%d"):format(i // 250, i % 250))).rules[1];
				if e and before[i] then assert.is_true(e.tokens >= before[i], "charged another key"); end
			end
			lim:rule("x", { { family = "ipv4", rate = 1, burst = 4 } }); -- redefined: same id, new burst
			assert.same({ true, 0 }, { h() });
			assert.same({ true, 0 }, { h(1, 2) });
			assert.has_error(function () h(-1); end);
			assert.has_error(function () lim:handle(99, k); end);
			assert.has_error(function () lim:handle(r, "short"); end);
			lim:close();
			assert.has_error(function () h(); end, "attempt to use a closed limiter");
		end);

		it("accepts the wait bound at creation when a call passes none", function ()
			local lim = manual();
			local r = lim:rule("x", { { family = "ipv4", rate = 1, burst = 1 } });
			local k = addr("192.0.2.7");
			local h = lim:handle(r, k, 1.5);
			assert.same({ true, 0 }, { h() });
			assert.same({ true, 1 }, { h() }); -- one second's wait is within the bound
			assert.same({ false, 2 }, { h() }); -- two are not: refused, nothing charged
			assert.same({ false, 2 }, { h(1, 0) }); -- a call's own max_wait wins
			assert.same({ true, 2 }, { h(1, 2) });
			assert.same({ false, 3 }, { h(1) }); -- cost alone: the bound still applies
			assert.error_matches(function () lim:handle(r, k, -1); end, "max_wait must be from 0");
			assert.has_error(function () lim:handle(r, k, "soon"); end);
		end);

		it("keeps its limiter alive", function ()
			local h;
			do
				local lim = manual();
				h = lim:handle(lim:rule("x", { { family = "ipv4", rate = 1, burst = 1 } }), addr("192.0.2.1"));
			end
			collectgarbage(); collectgarbage();
			assert.same({ true, 0 }, { h() });
			assert.same({ false, 1 }, { h() });
		end);
	end);

	describe("strikes and bans", function ()
		local function lim_with_bans()
			return manual({ ban_strikes = 3, ban_window = 600, ban_initial = 300, ban_factor = 2, ban_max = 1000,
				ban_forgive = 3600 });
		end

		it("bans after enough strikes, doubling per ban up to the cap", function ()
			local lim = lim_with_bans();
			local k = addr("203.0.113.5");
			assert.is_nil(lim:banned(k));
			assert.same({ nil, 1, 0, false }, { lim:strike(k) });
			assert.same({ nil, 2, 0, false }, { lim:strike(k) });
			assert.same({ 300, 0, 1, true }, { lim:strike(k) });
			assert.same({ 300, 128, 1 }, { lim:banned(k) });
			assert.is_nil(lim:banned(addr("203.0.113.6")));
			lim:advance(299);
			assert.same({ 1, 128, 1 }, { lim:banned(k) });
			assert.same({ 1, 0, 1, false }, { lim:strike(k) }); -- while banned strikes only count: not a new ban
			lim:advance(1);
			assert.is_nil(lim:banned(k));
			lim:strike(k); lim:strike(k);
			assert.same({ 600, 0, 2, true }, { lim:strike(k) });
			lim:advance(600);
			lim:strike(k); lim:strike(k);
			assert.same({ 1000, 0, 3, true }, { lim:strike(k) }); -- 1200 capped at ban_max
		end);

		it("lets strikes leak away and forgives levels after good behaviour", function ()
			local lim = lim_with_bans();
			local k = addr("2001:db8::66");
			lim:strike(k); lim:strike(k);
			lim:advance(199);
			assert.same({ nil, 2, 0, false }, { lim:strike(k, 128, 0) }); -- weight 0 only looks: nothing forgiven yet
			lim:advance(1); -- one strike is forgiven every 600/3 s
			assert.same({ nil, 2, 0, false }, { lim:strike(k) });
			lim:advance(600);
			assert.same({ nil, 1, 0, false }, { lim:strike(k) });
			lim:strike(k);
			assert.same({ 300, 0, 1, true }, { lim:strike(k) });
			lim:advance(300 + 3600); -- one forgive period after the ban ended
			lim:strike(k); lim:strike(k);
			assert.same({ 300, 0, 1, true }, { lim:strike(k) }); -- back to the first duration
		end);

		it("bans prefixes that cover addresses, and reports the longest ban", function ()
			local lim = lim_with_bans();
			local k = addr("2001:db8:5:6::1");
			assert.equal(60, lim:ban(k, 48, 60));
			assert.same({ 60, 48, 0 }, { lim:banned(addr("2001:db8:5:ffff::9")) });
			assert.is_nil(lim:banned(addr("2001:db8:6::1")));
			assert.equal(300, lim:ban(k, 64)); -- escalating duration
			assert.same({ 300, 64, 1 }, { lim:banned(k) });
			assert.same({ 60, 48, 0 }, { lim:banned(addr("2001:db8:5:7::1")) });
		end);

		it("unbans and resets inside a prefix", function ()
			local lim = lim_with_bans();
			local r = lim:rule("x", { { family = "ipv4", rate = 1, burst = 1 } });
			local a, b, c = addr("192.0.2.1"), addr("192.0.2.2"), addr("198.51.100.1");
			lim:ban(a); lim:ban(b); lim:ban(c);
			lim:check(r, a); lim:check(r, c);
			assert.equal(2, lim:unban(limiter.prefix("192.0.2.0/24")));
			assert.is_nil(lim:banned(a));
			assert.is_nil(lim:banned(b));
			assert.truthy(lim:banned(c));
			assert.is_false((lim:check(r, a)));
			assert.equal(1, lim:reset(a));
			assert.is_true((lim:check(r, a)));
			assert.equal(lim:stats().tracked + lim:stats().offenders, lim:reset());
			assert.is_nil(lim:banned(c));
			assert.equal(0, lim:stats().tracked);
		end);

		it("lists top offenders, banned first, and shows an address", function ()
			local lim = lim_with_bans();
			local r = lim:rule("login", { { family = "ipv4", bits = 32, rate = 1, burst = 2 },
				{ family = "ipv4", bits = 24, rate = 1, burst = 5 } });
			lim:strike(addr("192.0.2.1"));
			lim:strike(addr("192.0.2.2")); lim:strike(addr("192.0.2.2"));
			lim:ban(addr("198.51.100.0"), 120, 50);
			local top = lim:top(2);
			assert.equal(2, #top);
			assert.same({ prefix = "198.51.100.0/24", bits = 120, strikes = 0, level = 0, ban_left = 50, refused = 0,
				bans = 1 }, top[1]);
			assert.equal("192.0.2.2", top[2].prefix);
			assert.equal(3, #lim:top());
			lim:check(r, addr("192.0.2.2"));
			local s = lim:show(addr("192.0.2.2"));
			assert.equal(1, #s.offenders);
			assert.equal(2, s.offenders[1].strikes);
			assert.same({ rule = "login", prefix = "192.0.2.2", tokens = 1, burst = 2, rate = 1 }, s.rules[1]);
			assert.same({ rule = "login", prefix = "192.0.2.0/24", tokens = 4, burst = 5, rate = 1 }, s.rules[2]);
			s = lim:show(limiter.prefix("192.0.2.0/24"));
			assert.equal(2, #s.offenders); -- offenders inside the prefix
			assert.equal(1, #s.rules);
		end);
	end);

	describe("absorb", function ()
		it("takes over another table's bans and busy entries, rules matched by name", function ()
			local old = manual({ capacity = 64, ban_strikes = 3, ban_initial = 300 });
			local rx = old:rule("x", { { family = "ipv4", rate = 1, burst = 2 } });
			local gone = old:rule("gone", { { family = "ipv4", rate = 1, burst = 1 } });
			local busy, idle, troll = addr("192.0.2.1"), addr("192.0.2.2"), addr("192.0.2.3");
			old:check(rx, busy); old:check(rx, busy);
			old:check(gone, busy);
			old:check(rx, idle);
			for _ = 1, 3 do old:strike(troll); end
			old:advance(100); -- idle's one token is back: nothing to keep
			old:check(rx, busy); old:check(rx, busy); -- busy again: two spent
			local new = manual({ capacity = 4096, ban_strikes = 3, ban_initial = 300 });
			new:rule("other", { { family = "any", rate = 5, burst = 5 } });
			local nx = new:rule("x", { { family = "ipv4", rate = 1, burst = 2 } });
			assert.not_equal(rx, nx); -- another id: matched by name
			assert.same({ 1, 1, 2 }, { new:absorb(old) }); -- busy; the troll; dropped: idle and the rule "gone"
			assert.same({ false, 1, 1 }, { new:check(nx, busy) }); -- its spent budget came along
			local left, plen, level = new:banned(troll);
			assert.equal(200, math.floor(left + 0.5)); -- 300 s ban, 100 s of it already served
			assert.same({ 128, 1 }, { plen, level });
			assert.is_nil(new:banned(idle));
			assert.same({ false, 1, 1 }, { old:check(rx, busy) }); -- the old table is left as it was
			assert.has_error(function () new:absorb(new); end);
		end);

		it("drops what does not fit a smaller table, keeping bans first", function ()
			local old = manual({ capacity = 4096, offenders = 4096 });
			local r = old:rule("x", { { family = "ipv4", rate = 1, burst = 1 } });
			for i = 1, 1000 do old:check(r, addr(("198.51.%d.%d"):format(i // 250, i % 250))); end
			for i = 1, 3 do old:strike(addr("203.0.113.9")); end
			local new = manual({ capacity = 64, offenders = 64 });
			new:rule("x", { { family = "ipv4", rate = 1, burst = 1 } });
			local rates, offenders, dropped = new:absorb(old);
			assert.equal(1, offenders);
			assert.equal(1000, rates + dropped);
			assert.is_true(rates <= 64);
			assert.truthy(new:banned(addr("203.0.113.9")));
			assert.equal(64, new:stats().capacity);
		end);
	end);

	describe("buckets", function ()
		it("are token buckets on the table clock", function ()
			local lim = manual();
			local b = lim:bucket(2, 3);
			assert.equal(3, b:tokens());
			for _ = 1, 3 do assert.same({ true, 0 }, { b:take() }); end
			assert.same({ false, 0.5 }, { b:take() });
			assert.same({ true, 0.5 }, { b:take(1, 0.5) });
			lim:advance(1);
			assert.equal(1, b:tokens());
			b:set(10, 20); -- same debt (one second's worth), a deeper bucket
			assert.equal(10, b:tokens());
			assert.is_true((b:take()));
			assert.has_error(function () lim:bucket(0, 1); end);
			lim:close();
			assert.has_error(function () b:take(); end, "attempt to use a closed limiter");
		end);

		it("keep their limiter alive", function ()
			local b;
			do b = manual():bucket(1, 2); end
			collectgarbage(); collectgarbage();
			assert.same({ true, 0 }, { b:take() });
			assert.same({ true, 0 }, { b:take() });
			assert.same({ false, 1 }, { b:take() });
			assert.equal(0, b:tokens());
		end);
	end);

	describe("under a flood of one million IPv6 addresses from one /48", function ()
		it("stops the flood at the /48, keeps memory fixed and keeps an abuser's state", function ()
			local lim = manual({ capacity = 65536, offenders = 4096 });
			local login = lim:rule("login", {
				{ family = "ipv6", bits = 128, rate = 20 / 60, burst = 20 },
				{ family = "ipv6", bits = 64, rate = 10 / 60, burst = 5 },
				{ family = "ipv6", bits = 48, rate = 1, burst = 60 },
			});
			-- the abuser, elsewhere: banned by strikes, and its own budget spent
			local abuser = addr("2001:db8:ffff::bad");
			for _ = 1, 5 do lim:check(login, abuser); end
			lim:strike(abuser); lim:strike(abuser);
			local ban = lim:strike(abuser);
			assert.equal(300, ban);
			local before_stats = lim:stats();
			collectgarbage(); collectgarbage();
			local heap_before = collectgarbage("count");

			local pack, allowed, by_level, abuser_denied, polls = string.pack, 0, {}, 0, 0;
			local random = math.random;
			math.randomseed(7);
			for i = 1, 1000000 do
				local k = pack(">I4I2I2I4I4", 0x20010db8, 0x0001, random(0, 0xffff), random(0, 0xffffffff), i);
				local ok, _, level = lim:check(login, k);
				if ok then allowed = allowed + 1; else by_level[level] = (by_level[level] or 0) + 1; end
				if i % 10000 == 0 then lim:advance(1); end -- 100 s of flood at 10,000 addresses per second
				if i % 1000 == 0 then
					polls = polls + 1;
					if not lim:check(login, abuser) then abuser_denied = abuser_denied + 1; end
				end
			end
			-- the /48 admitted its burst and one per second, nothing more
			assert.is_true(allowed <= 60 + 100, "allowed " .. allowed);
			assert.is_true(allowed >= 60);
			assert.is_true((by_level[3] or 0) >= 1000000 - 160 - (by_level[2] or 0));
			-- fixed memory: the table did not grow and the Lua heap holds nothing per address
			local after_stats = lim:stats();
			assert.equal(before_stats.memory, after_stats.memory);
			assert.is_true(after_stats.tracked <= after_stats.capacity);
			collectgarbage(); collectgarbage();
			assert.is_true(collectgarbage("count") - heap_before < 256, "Lua heap grew by "
				.. (collectgarbage("count") - heap_before) .. " KiB");
			-- the abuser: still banned at the same level, its budget still spent (one event per 3 s at most)
			local left, bits, level = lim:banned(abuser);
			assert.equal(128, bits);
			assert.equal(1, level);
			assert.is_true(left >= 300 - 101 and left <= 200);
			assert.is_true(abuser_denied >= polls - 40, ("abuser denied %d of %d"):format(abuser_denied, polls));
			-- another network is untouched
			assert.is_true((lim:check(login, addr("2001:db8:2::1"))));
		end);

		it("fails open for unseen addresses when the table is full of busy entries", function ()
			local lim = manual({ capacity = 64 });
			local r = lim:rule("x", { { family = "ipv6", bits = 128, rate = 1 / 3600, burst = 1 } });
			local pack, refused = string.pack, 0;
			for i = 1, 10000 do
				if not lim:check(r, pack(">I4I4I4I4", 0x20010db8, 0, 0, i)) then refused = refused + 1; end
			end
			assert.equal(0, refused);
			local s = lim:stats();
			assert.equal(64, s.tracked);
			assert.equal(10000 - 64, s.evictions_busy);
		end);

		it("keeps the state of every address while the table is less than half full", function ()
			-- 30,000 busy addresses in 65,536 entries: with one candidate set per key, about one
			-- in sixty lost its state to a neighbour in its set; with two, none should
			local lim = manual({ capacity = 65536 });
			local r = lim:rule("x", { { family = "ipv6", bits = 128, rate = 1 / 3600, burst = 2 } });
			local pack = string.pack;
			for pass = 1, 2 do
				for i = 1, 30000 do
					assert.is_true((lim:check(r, pack(">I4I4I4I4", 0x20010db8, i % 7, 0, i))), pass .. ":" .. i);
				end
			end
			local s = lim:stats();
			assert.equal(30000, s.tracked);
			assert.equal(0, s.evictions_busy + s.evictions_idle);
			-- each address has spent its burst of 2: the state was kept
			assert.is_false((lim:check(r, pack(">I4I4I4I4", 0x20010db8, 12345 % 7, 0, 12345))));
		end);

		it("evicts idle entries before busy ones", function ()
			local lim = manual({ capacity = 64 });
			local r = lim:rule("x", { { family = "ipv6", bits = 128, rate = 1, burst = 1 } });
			local pack = string.pack;
			for i = 1, 256 do lim:check(r, pack(">I4I4I4I4", 0x20010db8, 0, 0, i)); end
			assert.equal(64, lim:stats().tracked);
			local busy, idle = lim:stats().evictions_busy, lim:stats().evictions_idle;
			lim:advance(2); -- every bucket is full again: nothing worth keeping
			-- four newcomers: even if they share a set, every way they take is empty or idle
			for i = 1001, 1004 do lim:check(r, pack(">I4I4I4I4", 0x20010db8, 0, 0, i)); end
			local s = lim:stats();
			assert.equal(busy, s.evictions_busy);
			assert.equal(4, s.evictions_idle - idle);
		end);

		it("never evicts an active ban; a full set of bans says so", function ()
			local lim = manual({ offenders = 64 });
			local pack, full = string.pack, 0;
			for i = 1, 1000 do
				local ok = lim:ban(pack(">I4I4I4I4", 0x20010db8, 0, 0, i), 128, 100);
				if not ok then full = full + 1; end
			end
			local s = lim:stats();
			assert.equal(64, s.bans);
			assert.equal(1000 - 64, full);
			assert.equal(full, s.offender_full);
			local k, err, code = lim:ban(pack(">I4I4I4I4", 0x20010db8, 0, 1, 1), 128, 100);
			if not k then
				assert.equal("offender table full", err);
				assert.equal("full", code);
			end
			lim:advance(100);
			assert.truthy(lim:ban(pack(">I4I4I4I4", 0x20010db8, 0, 1, 1), 128, 100)); -- expired bans may go
		end);
	end);

	describe("monotonic clock", function ()
		it("moves forward and can be advanced", function ()
			local lim = assert(limiter.new());
			local t0 = lim:now();
			assert.is_true(lim:advance(120) >= t0 + 120);
			assert.is_true(lim:now() >= t0 + 120);
		end);

		it("starts at zero, so a fresh table holds no ban (the coarse clock lags the precise one)", function ()
			local k = addr("192.0.2.1");
			for _ = 1, 200 do
				local lim <close> = assert(limiter.new({ offenders = 64, capacity = 64 }));
				assert.is_true(lim:now() >= 0);
				assert.is_nil(lim:banned(k));
				lim:strike(k); lim:strike(k);
				assert.equal(300, (lim:strike(k)));
			end
		end);

		it("bans on strikes spaced apart in real time (strikes are forgiven whole, not leaked)", function ()
			local function spin(seconds) local t = os.clock(); while os.clock() - t < seconds do end end
			for _ = 1, 5 do
				local lim <close> = assert(limiter.new({ offenders = 64, capacity = 64 }));
				local k = addr("192.0.2.1");
				lim:strike(k); spin(0.01);
				lim:strike(k); spin(0.01);
				assert.equal(300, (lim:strike(k)));
			end
		end);
	end);
end);
