-- prosody_native.smqueue on its own: XEP-0198 counters, order, overflow, memory.

local smqueue = require "prosody_native.smqueue";

local H_MAX = 4294967295;

local function fill(q, n, prefix)
	local hs = {};
	for i = 1, n do
		hs[i] = q:push((prefix or "s") .. i, i % 7, i);
	end
	return hs;
end

local function held(q)
	local out = {};
	for _, bytes in q:items() do out[#out+1] = bytes; end
	return out;
end

describe("prosody_native.smqueue", function ()
	it("reports its interface version", function ()
		assert.equal(1, smqueue._ABI);
	end);

	describe("new", function ()
		it("refuses capacities out of range and bad start counters", function ()
			assert.has_error(function () smqueue.new(0); end);
			assert.has_error(function () smqueue.new(1000001); end);
			assert.has_error(function () smqueue.new("many"); end);
			assert.has_error(function () smqueue.new(10, -1); end);
			assert.has_error(function () smqueue.new(10, H_MAX + 1); end);
			assert.has_error(function () smqueue.new(10, 1.5); end);
		end);

		it("starts empty with both counters at the given h", function ()
			local q = smqueue.new(5, 1234);
			assert.equal(0, q:unacked());
			assert.equal(1234, q:acked());
			assert.equal(1234, q:sent());
			assert.equal(0, q:count());
			assert.equal(5, q:capacity());
		end);
	end);

	describe("push and ack", function ()
		it("keeps order and returns each stanza's h", function ()
			local q = smqueue.new(100);
			local hs = fill(q, 10);
			for i = 1, 10 do assert.equal(i, hs[i]); end
			assert.same({ "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10" }, held(q));
			assert.equal(10, q:unacked());
			local bytes, kind, flags, stamp, h = q:get(3);
			assert.equal("s3", bytes);
			assert.equal(3, kind);
			assert.equal(3, flags);
			assert.near(os.time(), stamp, 2);
			assert.equal(3, h);
			assert.is_nil(q:get(0));
			assert.is_nil(q:get(11));
		end);

		it("acknowledges k stanzas from the front, in order", function ()
			local q = smqueue.new(100);
			fill(q, 10);
			assert.equal(3, q:ack(3));
			assert.same({ "s4", "s5", "s6", "s7", "s8", "s9", "s10" }, held(q));
			assert.equal(0, q:ack(3)); -- the same h again is fine
			assert.equal(7, q:ack(10));
			assert.same({}, held(q));
			assert.equal(0, q:unacked());
			assert.equal(10, q:acked());
		end);

		it("rejects an ack of more than was sent (head) and less than acked (tail)", function ()
			local q = smqueue.new(100);
			fill(q, 5);
			local ok, err, code = q:ack(6);
			assert.is_nil(ok);
			assert.matches("more", err);
			assert.equal("head", code);
			assert.equal(2, q:ack(2));
			ok, err, code = q:ack(1);
			assert.is_nil(ok);
			assert.matches("fewer", err);
			assert.equal("tail", code);
			-- nothing changed by the rejected acks
			assert.equal(3, q:unacked());
			assert.same({ "s3", "s4", "s5" }, held(q));
		end);

		it("refuses h outside 0..2^32-1 and non-integers", function ()
			local q = smqueue.new(10);
			assert.has_error(function () q:ack(-1); end);
			assert.has_error(function () q:ack(H_MAX + 1); end);
			assert.has_error(function () q:ack(1.5); end);
			assert.has_error(function () q:push("x", 256); end);
			assert.has_error(function () q:push("x", 0, -1); end);
		end);

		it("ORs flags into a held item with mark", function ()
			local q = smqueue.new(10);
			q:push("a", 1, 1);
			q:push("b", 1, 0);
			assert.equal(5, q:mark(1, 4));
			assert.equal(2, q:mark(2, 2));
			assert.is_nil(q:mark(3, 1));
			local _, _, flags = q:get(1);
			assert.equal(5, flags);
		end);

		it("keeps binary payloads intact", function ()
			local q = smqueue.new(4);
			local blob = "<m>\0\255\1</m>" .. ("x"):rep(70000);
			q:push(blob);
			assert.equal(blob, (q:get(1)));
		end);
	end);

	describe("push_stanza", function ()
		local NS = "jabber:client";
		it("queues a message, presence or iq with its kind, and returns h", function ()
			local q = smqueue.new(8);
			assert.equal(1, q:push_stanza("<message to='a@b' type='chat'><body>x</body></message>", NS));
			assert.equal(2, q:push_stanza("<presence/>", NS));
			assert.equal(3, q:push_stanza("<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>", NS));
			assert.equal(4, q:push_stanza("<message\n>x</message>"));
			local kinds = {};
			for _, bytes, kind in q:items() do kinds[#kinds+1] = kind; assert.equal("string", type(bytes)); end
			assert.same({ smqueue.MESSAGE, smqueue.PRESENCE, smqueue.IQ, smqueue.MESSAGE }, kinds);
			assert.same({ 1, 2, 3 }, { smqueue.MESSAGE, smqueue.PRESENCE, smqueue.IQ });
		end);
		it("leaves alone what XEP-0198 does not count, and values that are not strings", function ()
			local q = smqueue.new(8);
			for _, data in ipairs({ "<r xmlns='urn:xmpp:sm:3'/>", "<a xmlns='urn:xmpp:sm:3' h='1'/>", " ",
				"<?xml version='1.0'?><stream:stream>", "</stream:stream>", "<stream:features/>", "<iqx/>",
				"<messages/>", "message", "<message", "<presence to='a", "<iq a='1' b>", "<iq a=1/>", "",
				"<message xmlns='urn:other'/>", "<presence xmlns=\"jabber:server\"/>" }) do
				assert.is_nil(q:push_stanza(data, NS), data);
			end
			assert.is_nil(q:push_stanza({}, NS));
			assert.is_nil(q:push_stanza(nil));
			assert.equal(0, q:sent());
			assert.equal(0, q:count());
		end);
		it("counts a stanza in the expected namespace written out, and only that one", function ()
			local q = smqueue.new(8);
			assert.equal(1, q:push_stanza("<message xmlns='jabber:client' to='a@b'/>", NS));
			assert.equal(2, q:push_stanza("<presence  a = 'x>y' xmlns = \"jabber:client\" />", NS));
			assert.equal(3, q:push_stanza("<iq xmlns:foo='bar' type='result'/>", NS));
			assert.is_nil(q:push_stanza("<message xmlns='jabber:client'/>"));
			assert.is_nil(q:push_stanza("<message xmlns='jabber:clientX'/>", NS));
		end);
		it("evicts into the caller's hands when full, like push", function ()
			local q = smqueue.new(1);
			q:push_stanza("<message id='1'/>");
			local h, bytes, kind = q:push_stanza("<iq id='2'/>");
			assert.equal(2, h);
			assert.equal("<message id='1'/>", bytes);
			assert.equal(smqueue.MESSAGE, kind);
		end);
	end);

	describe("wrap-around at 2^32", function ()
		it("numbers stanzas 2^32-2, 2^32-1, 0, 1 and acks across the wrap", function ()
			local q = smqueue.new(10, H_MAX - 2);
			local hs = fill(q, 5);
			assert.same({ H_MAX - 1, H_MAX, 0, 1, 2 }, hs);
			assert.equal(5, q:unacked());
			assert.equal(2, q:ack(H_MAX));
			assert.same({ "s3", "s4", "s5" }, held(q));
			assert.equal(2, q:ack(1));
			assert.equal(1, q:unacked());
			assert.equal(1, q:acked());
			local _, _, _, _, h = q:get(1);
			assert.equal(2, h);
		end);

		it("applies serial-number comparison to head and tail errors across the wrap", function ()
			local q = smqueue.new(10, H_MAX - 1);
			fill(q, 4); -- sent = 2
			assert.equal(3, q:ack(1));
			local _, _, code = q:ack(H_MAX); -- behind the acked counter
			assert.equal("tail", code);
			_, _, code = q:ack(3); -- ahead of what was sent
			assert.equal("head", code);
			assert.equal(1, q:ack(2));
		end);

		it("keeps counting through many wraps", function ()
			local q = smqueue.new(3, H_MAX - 10);
			for i = 1, 30 do
				local h = q:push("x" .. i);
				assert.equal((H_MAX - 10 + i) % 2^32, h);
				assert.equal(1, q:ack(h));
			end
			assert.equal(19, q:acked());
		end);
	end);

	describe("overflow", function ()
		it("evicts the oldest item and hands it back, keeping counters exact", function ()
			local q = smqueue.new(3);
			fill(q, 3);
			local h, bytes, kind, flags, stamp = q:push("s4", 4, 9);
			assert.equal(4, h);
			assert.equal("s1", bytes);
			assert.equal(1, kind);
			assert.equal(1, flags);
			assert.is_number(stamp);
			assert.same({ "s2", "s3", "s4" }, held(q));
			assert.equal(4, q:unacked());
			assert.equal(1, q:evicted());
			assert.equal(3, q:count());
			-- never silent: every push into a full queue returns an eviction
			local n_evicted = 0;
			for i = 5, 10 do
				local _, ev = q:push("s" .. i);
				assert.equal("s" .. (i - 3), ev);
				n_evicted = n_evicted + 1;
			end
			assert.equal(6, n_evicted);
			assert.equal(7, q:evicted());
			assert.same({ "s8", "s9", "s10" }, held(q));
		end);

		it("lets the peer acknowledge through evicted stanzas and still resume the rest", function ()
			local q = smqueue.new(2);
			fill(q, 5); -- s1..s3 evicted, s4 s5 held
			assert.equal(3, q:evicted());
			assert.equal(1, q:ack(1)); -- the client had seen s1
			assert.equal(2, q:evicted());
			assert.same({ "s4", "s5" }, held(q));
			assert.equal(3, q:ack(4)); -- through s2, s3 and s4
			assert.equal(0, q:evicted());
			assert.same({ "s5" }, held(q));
			assert.equal(1, q:unacked());
		end);

		it("takes a new capacity once the excess is shifted out, and evicts at it", function ()
			local q = smqueue.new(8);
			fill(q, 6); -- the ring grew to 8 slots
			assert.has_error(function () q:set_capacity(3); end); -- six held: shift them out first
			assert.same({ 6, 8 }, { q:count(), q:capacity() });
			q:shift(); q:shift(); q:shift();
			q:set_capacity(3);
			assert.equal(3, q:capacity());
			local _, ev = q:push("s7");
			assert.equal("s4", ev);
			assert.same({ "s5", "s6", "s7" }, held(q));
			q:set_capacity(5); -- and back up: room again, nothing evicted
			assert.is_nil(select(2, q:push("s8")));
			assert.is_nil(select(2, q:push("s9")));
			assert.same({ "s5", "s6", "s7", "s8", "s9" }, held(q));
			assert.equal(4, q:evicted());
			assert.has_error(function () q:set_capacity(0); end);
		end);

		it("shift removes the oldest without acknowledging it", function ()
			local q = smqueue.new(5);
			fill(q, 3);
			assert.equal("s1", (q:shift()));
			assert.equal("s2", (q:shift()));
			assert.equal("s3", (q:shift()));
			assert.is_nil(q:shift());
			assert.equal(3, q:unacked());
			assert.equal(3, q:evicted());
			assert.equal(3, q:ack(3));
		end);
	end);

	describe("memory accounting", function ()
		it("counts payloads, records and ring, and returns to the baseline when acked or closed", function ()
			collectgarbage(); collectgarbage();
			local base = smqueue.memory();
			local q = smqueue.new(500);
			assert.equal(0, q:memory());
			local payload = ("m"):rep(450);
			for _ = 1, 500 do q:push(payload); end
			local per_item = smqueue.item_overhead();
			assert.equal(500 * (450 + per_item), q:memory());
			assert.equal(base + q:memory(), smqueue.memory());
			assert.is_true(q:memory() / 500 < 520, "small message stays near its serialized size");
			q:ack(250);
			assert.equal(250 * 450 + 250 * (per_item - 8) + 500 * 8, q:memory());
			q:close();
			assert.equal(base, smqueue.memory());
		end);

		it("grows the ring on demand instead of allocating the capacity up front", function ()
			local q = smqueue.new(1000000);
			q:push("x");
			assert.is_true(q:memory() < 1000, "one item costs " .. q:memory());
			q:close();
		end);

		it("frees evicted items", function ()
			collectgarbage(); collectgarbage();
			local base = smqueue.memory();
			local q = smqueue.new(2);
			for i = 1, 100 do q:push(("y"):rep(i)); end
			assert.equal(base + q:memory(), smqueue.memory());
			assert.equal(99 + 100 + 2 * (smqueue.item_overhead() - 8) + 2 * 8, q:memory());
			q:close();
			assert.equal(base, smqueue.memory());
		end);
	end);

	describe("lifetime", function ()
		it("is closed by close, <close> and the collector, and refuses use afterwards", function ()
			collectgarbage(); collectgarbage();
			local base = smqueue.memory();
			do
				local q <close> = smqueue.new(5);
				q:push("a");
			end
			assert.equal(base, smqueue.memory());
			local q = smqueue.new(5);
			q:push("b");
			q:close();
			q:close(); -- idempotent
			assert.has_error(function () q:push("c"); end, "calling 'push' on bad self (queue is closed)");
			assert.matches("closed", tostring(q));
			smqueue.new(5):push("garbage");
			collectgarbage(); collectgarbage();
			assert.equal(base, smqueue.memory());
		end);
	end);

	describe("parse_h", function ()
		it("accepts digits only, up to 4294967295", function ()
			assert.equal(0, smqueue.parse_h("0"));
			assert.equal(42, smqueue.parse_h("42"));
			assert.equal(7, smqueue.parse_h("007"));
			assert.equal(H_MAX, smqueue.parse_h("4294967295"));
			for _, bad in ipairs({ "", "4294967296", "99999999999", "-1", "+1", "1e3", "0x10", "1.5", " 1", "1 ",
				"１", "abc" }) do
				assert.is_nil(smqueue.parse_h(bad), bad);
			end
			assert.is_nil(smqueue.parse_h(nil));
			assert.is_nil(smqueue.parse_h(5));
		end);
	end);
end);
