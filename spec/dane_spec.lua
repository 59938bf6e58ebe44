-- prosody_native.dane on its own: TLSA parsing, record data, and verdicts over a
-- test PKI generated with the openssl CLI at the start of the run (root -> issuer ->
-- leaf, EC P-256). Expectations follow RFC 6698/7671 and OpenSSL's DANE engine
-- (notes/dane.md section 7); spec/integration/test_dane_differential.py compares the
-- same verdicts against `openssl s_client` live.

local dane = require "prosody_native.dane";

local function sh(cmd)
	local ok = os.execute(cmd .. " 2>/dev/null");
	assert(ok, "command failed: " .. cmd);
end

local function readfile(path)
	local f = assert(io.open(path, "rb"));
	local s = f:read("a");
	f:close();
	return s;
end

local function writefile(path, s)
	local f = assert(io.open(path, "wb"));
	f:write(s);
	f:close();
end

local function hex(s)
	return (s:gsub(".", function (c) return ("%02x"):format(c:byte()); end));
end

local function unhex(h)
	return (h:gsub("%s", ""):gsub("..", function (x) return string.char(tonumber(x, 16)); end));
end

-- Test PKI -------------------------------------------------------------------------

local dir = os.tmpname();
os.remove(dir);
sh("mkdir -p " .. dir);

local EC = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
writefile(dir .. "/ext.cnf", [[
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:dane.example, DNS:xmpp.dane.example
[wrongname]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = DNS:other.example
[partial]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = DNS:x*.dane.example
[cnonly]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
]]);

local function pki_cmds()
	local d = dir;
	sh(("openssl req -x509 %s -keyout %s/root.key -out %s/root.pem -subj /CN=Test-Root -days 7300 "
		.. "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"):format(EC, d, d));
	sh(("openssl req -new %s -keyout %s/int.key -out %s/int.csr -subj /CN=Test-Issuer"):format(EC, d, d));
	sh(("openssl x509 -req -in %s/int.csr -CA %s/root.pem -CAkey %s/root.key -set_serial 2 -days 3650 "
		.. "-extfile %s/ext.cnf -extensions ca -out %s/int.pem"):format(d, d, d, d, d));
	sh(("openssl req -new %s -keyout %s/leaf.key -out %s/leaf.csr -subj /CN=xmpp.dane.example"):format(EC, d, d));
	sh(("openssl x509 -req -in %s/leaf.csr -CA %s/int.pem -CAkey %s/int.key -set_serial 3 -days 30 "
		.. "-extfile %s/ext.cnf -extensions leaf -out %s/leaf.pem"):format(d, d, d, d, d));
	-- same key, a name that is neither the base domain nor the service domain
	sh(("openssl x509 -req -in %s/leaf.csr -CA %s/int.pem -CAkey %s/int.key -set_serial 4 -days 30 "
		.. "-extfile %s/ext.cnf -extensions wrongname -out %s/wrongname.pem"):format(d, d, d, d, d));
	-- names RFC 9525 6.3 does not accept: a partial wildcard, and a CN with no DNS name
	sh(("openssl x509 -req -in %s/leaf.csr -CA %s/int.pem -CAkey %s/int.key -set_serial 5 -days 30 "
		.. "-extfile %s/ext.cnf -extensions partial -out %s/partial.pem"):format(d, d, d, d, d));
	sh(("openssl x509 -req -in %s/leaf.csr -CA %s/int.pem -CAkey %s/int.key -set_serial 6 -days 30 "
		.. "-extfile %s/ext.cnf -extensions cnonly -out %s/cnonly.pem"):format(d, d, d, d, d));
	-- a self-signed leaf, and an unrelated certificate
	sh(("openssl req -x509 -key %s/leaf.key -out %s/selfsigned.pem -subj /CN=xmpp.dane.example -days 30 "
		.. "-addext basicConstraints=critical,CA:FALSE -addext subjectAltName=DNS:xmpp.dane.example"):format(d, d));
	sh(("openssl req -x509 %s -keyout %s/other.key -out %s/other.pem -subj /CN=unrelated -days 30"):format(EC, d, d));
	sh(("openssl x509 -in %s/leaf.pem -outform DER -out %s/leaf.der"):format(d, d));
	sh(("openssl x509 -in %s/leaf.pem -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary > %s/leaf.spki.sha256")
		:format(d, d));
	sh(("openssl x509 -in %s/leaf.pem -outform DER | openssl dgst -sha512 -binary > %s/leaf.cert.sha512"):format(d, d));
end
pki_cmds();

local pem = {};
for _, n in ipairs({ "root", "int", "leaf", "wrongname", "partial", "cnonly", "selfsigned", "other" }) do
	pem[n] = readfile(dir .. "/" .. n .. ".pem");
end
local NOW = os.time();
local NAMES = { base = "xmpp.dane.example", names = { "dane.example" } };

local function opts(extra)
	local o = { base = NAMES.base, names = NAMES.names };
	for k, v in pairs(extra or {}) do o[k] = v; end
	return o;
end

local function rec(u, s, m, certname)
	return { usage = u, selector = s, mtype = m, data = assert(dane.digest(pem[certname], s, m)) };
end

-- flips the last byte (or, for Full(0) data, swaps in another certificate's data)
local function bad(r)
	local d = r.data;
	local flipped = d:sub(1, -2) .. string.char((d:byte(-1) ~ 1));
	if r.mtype == 0 then
		flipped = assert(dane.digest(pem.other, r.selector, 0));
	end
	return { usage = r.usage, selector = r.selector, mtype = r.mtype, data = flipped };
end

local trusted = assert(dane.new({ cafile = dir .. "/root.pem" }));
local untrusted = assert(dane.new());

describe("prosody_native.dane", function ()
	teardown(function ()
		os.execute("rm -rf " .. dir);
	end);

	it("reports its interface version and OpenSSL", function ()
		assert.equal(1, dane._ABI);
		assert.matches("^OpenSSL %d", dane.openssl_version());
	end);

	describe("record parsing", function ()
		it("reads presentation format, hex split by white space", function ()
			local u, s, m, data = dane.parse_text("3 1 1 0123 4567\n89ab CDEF");
			assert.same({ 3, 1, 1 }, { u, s, m });
			assert.equal(unhex("0123456789abcdef"), data);
			u, s, m, data = dane.parse_text("  255\t0  2 00");
			assert.same({ 255, 0, 2, "\0" }, { u, s, m, data });
		end);

		it("refuses malformed presentation format with a reason", function ()
			local cases = {
				[""] = "three numbers", ["3 1"] = "three numbers", ["3 1 1"] = "missing", ["256 1 1 00"] = "three numbers",
				["3 1 1 0g"] = "not hexadecimal", ["3 1 1 abc"] = "odd number", ["-1 1 1 00"] = "three numbers",
				["3x 1 1 00"] = "three numbers", ["0003 1 1 00"] = "three numbers",
			};
			for text, why in pairs(cases) do
				local r, err, code = dane.parse_text(text);
				assert.is_nil(r, text);
				assert.matches(why, err, 1, true);
				assert.equal("bad-record", code);
			end
		end);

		it("splits wire-format rdata and refuses fewer than three octets", function ()
			assert.same({ 3, 1, 2, "xyz" }, { dane.parse_rdata("\3\1\2xyz") });
			assert.same({ 0, 0, 0, "" }, { dane.parse_rdata("\0\0\0") });
			for _, short in ipairs({ "", "\3", "\3\1" }) do
				local r, err, code = dane.parse_rdata(short);
				assert.is_nil(r);
				assert.matches("truncated", err);
				assert.equal("bad-record", code);
			end
		end);
	end);

	describe("record data", function ()
		it("agrees with the openssl CLI for 3 1 1 and 3 0 2, from PEM or DER", function ()
			assert.equal(readfile(dir .. "/leaf.spki.sha256"), dane.digest(pem.leaf, 1, 1));
			assert.equal(readfile(dir .. "/leaf.spki.sha256"), dane.digest(readfile(dir .. "/leaf.der"), 1, 1));
			assert.equal(readfile(dir .. "/leaf.cert.sha512"), dane.digest(pem.leaf, 0, 2));
			assert.equal(readfile(dir .. "/leaf.der"), dane.digest(pem.leaf, 0, 0));
		end);

		it("gives the same SPKI data for two certificates with one key", function ()
			assert.equal(dane.digest(pem.leaf, 1, 1), dane.digest(pem.wrongname, 1, 1));
			assert.not_equal(dane.digest(pem.leaf, 0, 1), dane.digest(pem.wrongname, 0, 1));
		end);

		it("says what is wrong with its arguments", function ()
			assert.has_error(function () dane.digest(pem.leaf, 2, 1); end);
			assert.has_error(function () dane.digest(pem.leaf, 1, 3); end);
			local r, err, code = dane.digest("not a certificate", 1, 1);
			assert.is_nil(r);
			assert.is_string(err);
			assert.equal("bad-chain", code);
		end);

		it("describes a certificate", function ()
			local info = assert(dane.certinfo(pem.int));
			assert.matches("CN=Test%-Issuer", info.subject);
			assert.matches("CN=Test%-Root", info.issuer);
			assert.is_true(info.ca);
			assert.is_false(info.self_issued);
			assert.is_true(info.not_after > NOW + 3000 * 86400 and info.not_after < NOW + 3700 * 86400);
			assert.is_true(dane.certinfo(pem.root).self_issued);
			assert.is_false(dane.certinfo(pem.leaf).ca);
		end);
	end);

	describe("verdicts", function ()
		-- wire chain leaf + issuer, root in the trust store (shape A of notes/dane.md 7)
		local chain = { pem.leaf, pem.int };
		local usage_target = { [3] = "leaf", [2] = "int", [1] = "leaf", [0] = "int" };

		it("verifies every usage x selector x matching type with its applicable certificate", function ()
			local n = 0;
			for u = 0, 3 do
				for s = 0, 1 do
					for m = 0, 2 do
						local r = rec(u, s, m, usage_target[u]);
						local res = assert(trusted:verify(chain, { r }, opts()));
						local what = ("%d %d %d"):format(u, s, m);
						assert.equal("verified", res.verdict, what);
						assert.equal(1, res.matched, what);
						assert.equal(1, res.usable, what);
						assert.same({ u, s, m }, { res.usage, res.selector, res.mtype }, what);
						assert.equal(usage_target[u] == "leaf" and 0 or 1, res.depth, what);
						n = n + 1;
					end
				end
			end
			assert.equal(24, n);
		end);

		it("reports a mismatch for every usage x selector x matching type with wrong data", function ()
			for u = 0, 3 do
				for s = 0, 1 do
					for m = 0, 2 do
						local res = assert(trusted:verify(chain, { bad(rec(u, s, m, usage_target[u])) }, opts()));
						local what = ("%d %d %d"):format(u, s, m);
						assert.equal("mismatch", res.verdict, what);
						assert.equal(65, res.x509_error, what);
						assert.equal("no matching DANE TLSA records", res.error, what);
						assert.is_nil(res.matched, what);
					end
				end
			end
		end);

		it("needs the trust anchor on the wire for DANE-TA digests (RFC 7671 5.2.2), not for full records", function ()
			assert.equal("mismatch", trusted:verify(chain, { rec(2, 1, 1, "root") }, opts()).verdict);
			local res = trusted:verify(chain, { rec(2, 1, 0, "root") }, opts());
			assert.equal("verified", res.verdict);
			assert.equal(1, res.depth);
			res = trusted:verify({ pem.leaf, pem.int, pem.root }, { rec(2, 1, 1, "root") }, opts());
			assert.equal("verified", res.verdict);
			assert.equal(2, res.depth);
		end);

		it("accepts DANE without a trust store, but PKIX usages need one", function ()
			local full = { pem.leaf, pem.int, pem.root };
			assert.equal("verified", untrusted:verify(full, { rec(3, 1, 1, "leaf") }, opts()).verdict);
			assert.equal("verified", untrusted:verify(full, { rec(2, 0, 1, "int") }, opts()).verdict);
			local res = untrusted:verify(full, { rec(1, 1, 1, "leaf") }, opts());
			assert.equal("mismatch", res.verdict);
			assert.equal(19, res.x509_error); -- self-signed certificate in chain
		end);

		it("lets DANE-EE ignore expiry and names, not DANE-TA", function ()
			local later = NOW + 400 * 86400; -- the leaf is valid for 30 days, the issuer 10 years
			assert.equal("verified", trusted:verify(chain, { rec(3, 1, 1, "leaf") }, opts({ time = later })).verdict);
			local res = trusted:verify(chain, { rec(2, 1, 1, "int") }, opts({ time = later }));
			assert.equal("mismatch", res.verdict);
			assert.equal(10, res.x509_error);
			local wrong = { pem.wrongname, pem.int };
			assert.equal("verified", trusted:verify(wrong, { rec(3, 1, 1, "leaf") }, opts()).verdict);
			res = trusted:verify(wrong, { rec(2, 1, 1, "int") }, opts());
			assert.equal("mismatch", res.verdict);
			assert.equal(62, res.x509_error);
		end);

		it("checks DANE-TA names against the base domain and the extra names", function ()
			local res = trusted:verify(chain, { rec(2, 1, 1, "int") }, { base = "dane.example" });
			assert.equal("verified", res.verdict);
			assert.equal("dane.example", res.peername);
			res = trusted:verify(chain, { rec(2, 1, 1, "int") }, { base = "elsewhere.example", names = { "xmpp.dane.example" } });
			assert.equal("verified", res.verdict);
			assert.equal("xmpp.dane.example", res.peername);
			res = trusted:verify(chain, { rec(2, 1, 1, "int") }, { base = "elsewhere.example" });
			assert.equal("mismatch", res.verdict);
			assert.equal(62, res.x509_error);
		end);

		it("accepts neither partial wildcards nor a CN without DNS names for DANE-TA (RFC 9525 6.3)", function ()
			for _, name in ipairs({ "partial", "cnonly" }) do
				local res = trusted:verify({ pem[name], pem.int }, { rec(2, 1, 1, "int") }, { base = "xmpp.dane.example" });
				assert.equal("mismatch", res.verdict, name);
				assert.equal(62, res.x509_error, name);
			end
			-- the same chain with the leaf's proper names passes: the names are what failed
			assert.equal("verified", trusted:verify({ pem.leaf, pem.int }, { rec(2, 1, 1, "int") },
				{ base = "xmpp.dane.example" }).verdict);
		end);

		it("checks DANE-EE names when asked to", function ()
			local strict <close> = assert(dane.new({ ee_namechecks = true }));
			assert.equal("verified", strict:verify(chain, { rec(3, 1, 1, "leaf") }, opts()).verdict);
			local res = strict:verify({ pem.wrongname }, { rec(3, 1, 1, "leaf") }, opts());
			assert.equal("mismatch", res.verdict);
			assert.equal(62, res.x509_error);
		end);

		it("uses only the strongest digest per usage and selector (RFC 7671 section 9)", function ()
			local ok256, ok512 = rec(3, 1, 1, "leaf"), rec(3, 1, 2, "leaf");
			assert.equal("mismatch", trusted:verify(chain, { ok256, bad(ok512) }, opts()).verdict);
			assert.equal("verified", trusted:verify(chain, { bad(ok256), ok512 }, opts()).verdict);
			assert.equal("verified", trusted:verify(chain, { ok256, bad(rec(3, 0, 2, "leaf")) }, opts()).verdict);
			assert.equal("verified", trusted:verify(chain, { rec(3, 1, 0, "leaf"), bad(ok512) }, opts()).verdict);
			-- across certificates: a bad SHA2-512 DANE-TA record hides a good SHA2-256 one
			assert.equal("mismatch", trusted:verify(chain, { rec(2, 1, 1, "int"), bad(rec(2, 1, 2, "root")) }, opts()).verdict);
		end);

		it("says which record matched when several are published", function ()
			local records = { bad(rec(3, 1, 1, "leaf")), rec(2, 1, 1, "int"), { usage = 4, selector = 1, mtype = 1, data = ("x"):rep(32) } };
			local res = trusted:verify(chain, records, opts());
			assert.equal("verified", res.verdict);
			assert.equal(2, res.matched);
			assert.equal(1, res.depth);
			assert.equal(2, res.usable);
			assert.matches("usage 4", res.unusable[3]);
		end);

		it("reports unusable-only with the plain PKIX result and each record's reason", function ()
			local records = {
				{ usage = 4, selector = 1, mtype = 1, data = ("x"):rep(32) },
				{ usage = 3, selector = 2, mtype = 1, data = ("x"):rep(32) },
				{ usage = 3, selector = 1, mtype = 3, data = ("x"):rep(32) },
				{ usage = 3, selector = 1, mtype = 1, data = ("x"):rep(31) },
				{ usage = 3, selector = 1, mtype = 2, data = ("x"):rep(32) },
				"\3\1",
				{ usage = 3, selector = 0, mtype = 0, data = "not DER" },
			};
			local res = assert(trusted:verify(chain, records, opts()));
			assert.equal("unusable-only", res.verdict);
			assert.equal(0, res.usable);
			assert.is_true(res.pkix);
			assert.matches("usage 4", res.unusable[1]);
			assert.matches("selector 2", res.unusable[2]);
			assert.matches("matching type 3", res.unusable[3]);
			assert.matches("31 bytes, not 32", res.unusable[4]);
			assert.matches("32 bytes, not 64", res.unusable[5]);
			assert.matches("truncated", res.unusable[6]);
			assert.is_string(res.unusable[7]);
			res = untrusted:verify(chain, records, opts());
			assert.equal("unusable-only", res.verdict);
			assert.is_false(res.pkix);
			assert.equal(20, res.x509_error);
			-- unusable records do not hide a usable one
			res = trusted:verify(chain, { records[1], bad(rec(3, 1, 1, "leaf")) }, opts());
			assert.equal("mismatch", res.verdict);
		end);

		it("accepts records as wire rdata and in util.dns's shape", function ()
			local r = rec(3, 1, 1, "leaf");
			local rdata = string.char(3, 1, 1) .. r.data;
			assert.equal("verified", trusted:verify(chain, { rdata }, opts()).verdict);
			assert.equal("verified", trusted:verify(chain, { { use = 3, select = 1, match = 1, data = r.data } }, opts()).verdict);
		end);

		it("takes the chain as one PEM bundle, PEM strings or DER strings", function ()
			local r = { rec(2, 0, 1, "int") };
			assert.equal("verified", trusted:verify(pem.leaf .. pem.int, r, opts()).verdict);
			local der_leaf = dane.digest(pem.leaf, 0, 0);
			local der_int = dane.digest(pem.int, 0, 0);
			assert.equal("verified", trusted:verify({ der_leaf, der_int }, r, opts()).verdict);
			assert.equal("mismatch", trusted:verify({ der_leaf }, r, opts()).verdict);
		end);

		it("gives no-records with the PKIX result when there is nothing to match", function ()
			local res = trusted:verify(chain, {}, opts());
			assert.equal("no-records", res.verdict);
			assert.is_true(res.pkix);
			res = trusted:verify({ pem.wrongname, pem.int }, {}, opts());
			assert.is_false(res.pkix);
			assert.equal(62, res.x509_error);
		end);
	end);

	describe("bad input", function ()
		local chain = { pem.leaf, pem.int };
		local good = { rec(3, 1, 1, "leaf") };

		it("refuses broken chains with a clear error, never a crash", function ()
			local der = dane.digest(pem.leaf, 0, 0);
			local broken = {
				"", "garbage", der:sub(1, 100), der .. "x", { der, "" }, pem.leaf:sub(1, 200),
				pem.leaf:gsub("MII", "MI!"), "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", {},
			};
			for i, c in ipairs(broken) do
				local res, err, code = trusted:verify(c, good, opts());
				assert.is_nil(res, i);
				assert.matches("^bad certificate chain", err, nil, false);
				assert.equal("bad-chain", code, i);
			end
		end);

		it("refuses chains longer than 32 certificates and more than 256 records", function ()
			local long = {};
			for i = 1, 33 do long[i] = pem.int; end
			local res, err, code = trusted:verify(long, good, opts());
			assert.is_nil(res);
			assert.matches("32", err);
			assert.equal("bad-chain", code);
			res, err, code = trusted:verify(table.concat(long), good, opts());
			assert.is_nil(res);
			assert.equal("bad-chain", code);
			local many = {};
			for i = 1, 257 do many[i] = good[1]; end
			res, err, code = trusted:verify(chain, many, opts());
			assert.is_nil(res);
			assert.equal("bad-records", code);
			many[257] = nil;
			assert.equal("verified", trusted:verify(chain, many, opts()).verdict);
		end);

		it("survives huge and wrong-length association data", function ()
			local huge = { usage = 3, selector = 1, mtype = 0, data = ("\48"):rep(70000) };
			local res = assert(trusted:verify(chain, { huge, { usage = 3, selector = 1, mtype = 1, data = "" } }, opts()));
			assert.equal("unusable-only", res.verdict);
			assert.matches("65535", res.unusable[1]);
			assert.matches("empty", res.unusable[2]);
		end);

		it("throws on API misuse, naming the field", function ()
			assert.has_error(function () trusted:verify(chain, good, {}); end, "options need a 'base' name or 'names' (reference identifiers)");
			assert.has_error(function () trusted:verify(chain, { { usage = 3, selector = 1, data = "" } }, opts()); end,
				"TLSA record 1: field 'mtype' must be an integer from 0 to 255");
			assert.has_error(function () trusted:verify(chain, { 42 }, opts()); end);
			assert.has_error(function () trusted:verify(chain, good, opts({ time = "soon" })); end,
				"option 'time' must be an integer (seconds since the epoch)");
			assert.has_error(function () dane.new({ ee_namechecks = "yes" }); end, "option 'ee_namechecks' must be a boolean");
		end);

		it("says which trust store it could not load", function ()
			local v, err, code = dane.new({ cafile = dir .. "/missing.pem" });
			assert.is_nil(v);
			assert.matches("missing.pem", err, 1, true);
			assert.equal("bad-cafile", code);
		end);

		it("keeps parsed certificates for the next verification of the same encodings", function ()
			local v <close> = assert(dane.new({ cache_size = 2 }));
			local res = assert(v:verify({ pem.leaf, pem.int }, good, opts()));
			assert.equal("verified", res.verdict);
			assert.same({ cache_size = 2, cached = 2, cache_hits = 0, cache_misses = 2 }, v:stats());
			assert.equal("verified", v:verify({ pem.leaf, pem.int }, good, opts()).verdict);
			assert.same({ cache_size = 2, cached = 2, cache_hits = 2, cache_misses = 2 }, v:stats());
			-- a third encoding evicts the least recently used one; verdicts stay the same
			assert.equal("mismatch", v:verify({ pem.other }, good, opts()).verdict);
			assert.equal("verified", v:verify({ pem.leaf, pem.int }, good, opts()).verdict);
			-- LRU: "other" evicted the leaf, the leaf then evicted the issuer, the issuer "other"
			assert.same({ cache_size = 2, cached = 2, cache_hits = 2, cache_misses = 5 }, v:stats());
			-- broken input is never cached, and says the same every time
			for _ = 1, 2 do
				local r, err, code = v:verify({ "garbage" }, good, opts());
				assert.is_nil(r);
				assert.equal("bad-chain", code);
			end
			assert.equal(2, v:stats().cached);
			local nocache <close> = assert(dane.new({ cache_size = 0 }));
			nocache:verify({ pem.leaf, pem.int }, good, opts());
			assert.same({ cache_size = 0, cached = 0, cache_hits = 0, cache_misses = 0 }, nocache:stats());
			assert.has_error(function () dane.new({ cache_size = -1 }); end, "option 'cache_size' must be from 0 to 4096");
		end);

		it("closes once, and refuses use after close", function ()
			local v = assert(dane.new());
			assert.matches("open", tostring(v));
			v:close();
			v:close();
			assert.matches("closed", tostring(v));
			assert.has_error(function () v:verify(chain, good, opts()); end);
		end);
	end);
end);
