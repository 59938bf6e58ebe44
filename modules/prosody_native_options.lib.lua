-- prosody-native: option checks shared by the shims. Loaded with
-- module:require("prosody_native_options"), so it runs in the shim's environment and
-- reads the shim's own options. A bad value stops the module with the option's name.

local options = {};

-- Logs and raises "option '<name>' must be <expected>, not <value>".
function options.fail(name, value, expected)
	local msg = ("option '%s' must be %s, not %q"):format(name, expected, tostring(value));
	module:log_status("error", "%s", msg);
	error(msg, 0);
end

-- A number in [min, max] (an integer if asked); numeric strings are accepted. An
-- option left unset with a nil default stays nil.
function options.number(name, default, min, max, integer)
	local value = module:get_option(name, default);
	if value == nil then return nil; end
	if type(value) == "string" then value = tonumber(value) or value; end
	if type(value) ~= "number" or value ~= value or value < min or value > max
	or (integer and value % 1 ~= 0) then
		options.fail(name, value, ("a%s number from %s to %s"):format(integer and "n integer" or "", min, max));
	end
	return integer and math.tointeger(value) or value;
end

function options.boolean(name, default)
	local value = module:get_option(name, default);
	if type(value) ~= "boolean" then options.fail(name, value, "true or false"); end
	return value;
end

-- One of the keys of `choices`.
function options.choice(name, default, choices)
	local value = module:get_option(name, default);
	if not choices[value] then
		local list = {};
		for k in pairs(choices) do list[#list+1] = ("%q"):format(k); end
		table.sort(list);
		options.fail(name, value, "one of " .. table.concat(list, ", "));
	end
	return value;
end

return options;
