-- prosody-native DANE benchmark: what verification costs per s2s handshake.
--
--   sh bench/lua_bench.sh dane [--quick] [--iterations N] [--handshakes N]
--
-- Three measurements over a generated PKI (EC P-256 root -> issuer -> leaf, made with the openssl CLI):
--   engine     prosody_native.dane verify() on the chain as mod_native_dane gets it from LuaSec (PEM strings,
--              leaf + issuer) for DANE-EE 3 1 1, DANE-TA 2 1 1, a mismatch and a 5-record rollover set;
--   luasec     Prosody 0.12's `use_dane` path: full TLS handshakes over loopback TCP between two LuaSec sockets
--              in this process, with and without conn:setdane()/settlsa() (OpenSSL matches during the handshake),
--              so their difference is what DANE adds inside the handshake;
--   ours       the same handshake without DANE, plus getpeerchain() -> PEM and engine verify() afterwards: what
--              mod_native_dane adds per handshake.
-- DNS is not measured here: lookups go through libunbound, whose cache answers repeated lookups without a round
-- trip, and mod_native_dane keeps each domain's decision for dane_cache_ttl seconds.
-- Prints one line per measurement: name, iterations (1 for a median over --handshakes), microseconds per operation.

local dane = require "prosody_native.dane";
local ssl = require "ssl";
local socket = require "socket";

local iterations, handshakes = 20000, 300;
local i = 1;
while arg[i] do
	if arg[i] == "--quick" then iterations, handshakes = 2000, 50;
	elseif arg[i] == "--iterations" then i = i + 1; iterations = assert(tonumber(arg[i]), "--iterations N");
	elseif arg[i] == "--handshakes" then i = i + 1; handshakes = assert(tonumber(arg[i]), "--handshakes N");
	else io.stderr:write("usage: lua5.4 bench/dane_bench.lua [--quick] [--iterations N] [--handshakes N]\n"); os.exit(2); end
	i = i + 1;
end

local now = socket.gettime;

-- PKI --------------------------------------------------------------------------------

local dir = os.tmpname();
os.remove(dir);
assert(os.execute("mkdir -p " .. dir));
local function sh(cmd) assert(os.execute(cmd .. " 2>/dev/null"), cmd); end
local function read(p) local f = assert(io.open(p, "rb")); local s = f:read("a"); f:close(); return s; end
local EC = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
local f = assert(io.open(dir .. "/ext.cnf", "w"));
f:write("[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
	.. "[leaf]\nbasicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:xmpp.dane.example,DNS:dane.example\n");
f:close();
sh(("openssl req -x509 %s -keyout %s/root.key -out %s/root.pem -subj /CN=Root -days 30 -addext basicConstraints=critical,CA:TRUE")
	:format(EC, dir, dir));
sh(("openssl req -new %s -keyout %s/int.key -out %s/int.csr -subj /CN=Issuer"):format(EC, dir, dir));
sh(("openssl x509 -req -in %s/int.csr -CA %s/root.pem -CAkey %s/root.key -set_serial 2 -days 30 -extfile %s/ext.cnf -extensions ca -out %s/int.pem")
	:format(dir, dir, dir, dir, dir));
sh(("openssl req -new %s -keyout %s/leaf.key -out %s/leaf.csr -subj /CN=xmpp.dane.example"):format(EC, dir, dir));
sh(("openssl x509 -req -in %s/leaf.csr -CA %s/int.pem -CAkey %s/int.key -set_serial 3 -days 30 -extfile %s/ext.cnf -extensions leaf -out %s/leaf.pem")
	:format(dir, dir, dir, dir, dir));
local leaf, int = read(dir .. "/leaf.pem"), read(dir .. "/int.pem");
local f2 = assert(io.open(dir .. "/chain.pem", "w")); f2:write(leaf .. int); f2:close();

local ee = { usage = 3, selector = 1, mtype = 1, data = dane.digest(leaf, 1, 1) };
local ta = { usage = 2, selector = 1, mtype = 1, data = dane.digest(int, 1, 1) };
local bad = { usage = 3, selector = 1, mtype = 1, data = ("\0"):rep(32) };
local names = { base = "xmpp.dane.example", names = { "dane.example" } };

local results = {};
local function report(name, n, seconds)
	local line = ("%-52s %8d  %10.1f us/op"):format(name, n, seconds / n * 1e6);
	print(line);
	results[#results + 1] = line;
	return seconds / n;
end

-- engine ------------------------------------------------------------------------------

-- "cold": every verification parses the chain (a peer seen for the first time);
-- "warm": the verifier's cache already holds the parsed certificates (the usual case)
local v = assert(dane.new());
local cold = assert(dane.new({ cache_size = 0 }));
local function bench_verify(name, records, expect, verifier, n)
	local chain = { leaf, int };
	assert(verifier:verify(chain, records, names).verdict == expect);
	local t0 = now();
	for _ = 1, n do verifier:verify(chain, records, names); end
	return report("engine verify " .. name, n, now() - t0);
end
local per_verify = bench_verify("3 1 1 (DANE-EE), warm", { ee }, "verified", v, iterations);
bench_verify("2 1 1 (DANE-TA), warm", { ta }, "verified", v, iterations);
bench_verify("mismatch, warm", { bad }, "mismatch", v, iterations);
bench_verify("rollover set of 5 records, warm", { bad, bad, ta, bad, ee }, "verified", v, iterations);
local cold_n = math.max(100, iterations // 10);
local per_cold = bench_verify("3 1 1 (DANE-EE), cold", { ee }, "verified", cold, cold_n);
bench_verify("2 1 1 (DANE-TA), cold", { ta }, "verified", cold, cold_n);

-- handshakes ----------------------------------------------------------------------------

local server_ctx = assert(ssl.newcontext({ mode = "server"; protocol = "any"; key = dir .. "/leaf.key";
	certificate = dir .. "/chain.pem"; options = { "no_ticket" } }));
local plain_ctx = assert(ssl.newcontext({ mode = "client"; protocol = "any"; verify = "none"; options = { "no_ticket" } }));
local dane_ctx = assert(ssl.newcontext({ mode = "client"; protocol = "any"; verify = { "peer" };
	verifyext = { "lsec_continue", "lsec_ignore_purpose" }; dane = { "no_ee_namechecks" }; options = { "no_ticket" } }));

local listener = assert(socket.bind("127.0.0.1", 0));
local _, lport = listener:getsockname();

-- one TLS handshake between two LuaSec sockets in this process; returns the client socket
local function handshake(client_ctx, with_dane)
	local c = assert(socket.tcp());
	assert(c:connect("127.0.0.1", lport));
	local s = assert(listener:accept());
	local cs = assert(ssl.wrap(c, client_ctx));
	local ss = assert(ssl.wrap(s, server_ctx));
	if with_dane then
		assert(cs:setdane("xmpp.dane.example"));
		assert(cs:settlsa(ee.usage, ee.selector, ee.mtype, ee.data));
	end
	cs:settimeout(0);
	ss:settimeout(0);
	local cdone, sdone = false, false;
	while not (cdone and sdone) do
		if not cdone then
			local ok, err = cs:dohandshake();
			if ok then cdone = true; elseif err ~= "wantread" and err ~= "wantwrite" then error("client: " .. tostring(err)); end
		end
		if not sdone then
			local ok, err = ss:dohandshake();
			if ok then sdone = true; elseif err ~= "wantread" and err ~= "wantwrite" then error("server: " .. tostring(err)); end
		end
	end
	ss:close();
	return cs;
end

-- sanity: OpenSSL's in-handshake DANE verdict agrees with the engine's
do
	local cs = handshake(dane_ctx, true);
	local ok = cs:getpeerverification();
	assert(ok, "LuaSec DANE handshake did not verify");
	cs:close();
end

-- the three variants in rotation, so that drift (CPU frequency, other load) hits them alike
local variants = {
	{ name = "handshake, no DANE"; ctx = plain_ctx; dane = false; total = 0 };
	{ name = "handshake, LuaSec DANE (use_dane path)"; ctx = dane_ctx; dane = true; total = 0 };
	{ name = "handshake + getpeerchain + engine verify"; ctx = plain_ctx; dane = false; total = 0; after = function (cs)
		local pems = {};
		for k, c in ipairs(cs:getpeerchain()) do pems[k] = c:pem(); end
		assert(v:verify(pems, { ee }, names).verdict == "verified");
	end };
};
for _ = 1, handshakes do
	for _, var in ipairs(variants) do
		local t0 = now();
		local cs = handshake(var.ctx, var.dane);
		if var.after then var.after(cs); end
		var.total = var.total + (now() - t0);
		var.samples = var.samples or {};
		var.samples[#var.samples + 1] = now() - t0;
		cs:close();
	end
end
-- medians: a handshake is ~2 ms and a stray scheduling delay is worth several of them
local function median(t)
	table.sort(t);
	return t[(#t + 1) // 2];
end
local base = report(variants[1].name .. " (median)", 1, median(variants[1].samples));
local luasec = report(variants[2].name .. " (median)", 1, median(variants[2].samples));
local ours = report(variants[3].name .. " (median)", 1, median(variants[3].samples));
print(("%-52s %8s  %10.1f us/op"):format("added by LuaSec DANE inside the handshake", "", (luasec - base) * 1e6));
print(("%-52s %8s  %10.1f us/op"):format("added by mod_native_dane after it", "", (ours - base) * 1e6));
print(("%-52s %8s  %10.1f us/op"):format("engine verify alone (3 1 1), warm / cold", "", per_verify * 1e6)
	.. ("  / %.1f us/op"):format(per_cold * 1e6));

listener:close();
v:close();
cold:close();
os.execute("rm -rf " .. dir);
