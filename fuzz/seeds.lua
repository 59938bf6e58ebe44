-- Writes seed inputs for the decoder fuzzer: encodings of typical archived values.
local archive = require "prosody_native.archive";
local dir = assert(arg[1], "usage: lua5.4 fuzz/seeds.lua <dir>");
local mt = {};
local function el(name, attr, ...)
	local e = setmetatable({ name = name, attr = attr or {}, tags = {} }, mt);
	for i = 1, select("#", ...) do
		local c = select(i, ...);
		e[i] = c;
		if type(c) == "table" then e.tags[#e.tags+1] = c; end
	end
	return e;
end
local seeds = {
	el("message", { to = "a@b", type = "chat" }, el("body", nil, "hello"), el("markable", { xmlns = "urn:x" })),
	{ a = 1, b = { true, false, 2.5, "x" } },
	"plain string", 42, -7, 1.5, true,
};
for i, v in ipairs(seeds) do
	local f = assert(io.open(("%s/seed%d"):format(dir, i), "wb"));
	f:write(archive._encode(v, mt));
	f:close();
end
