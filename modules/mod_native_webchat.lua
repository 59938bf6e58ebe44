-- mod_native_webchat: an anonymous browser webchat (converse.js) served by Prosody itself.
--
-- Load it on an anonymous VirtualHost. It serves, under its HTTP path (default /chat):
--   /chat/            the page: converse.js in fullscreen singleton mode, anonymous login,
--                     joining webchat_room, or the room named in the URL fragment
--                     (/chat/#room@conference.example.org, percent-decoded); anything that is
--                     not a room on webchat_room's MUC service is refused on the page
--   /chat/webchat.js  the page's script (no inline script, so a strict CSP applies)
--   /chat/dist/...    converse.js's dist/ directory (webchat_converse_dir), never bundled here
-- The browser connects over WebSocket (mod_websocket) and falls back to BOSH (mod_bosh) at the
-- paths named in http_paths, on the same origin as the page (so a reverse proxy just forwards).
--
-- Options (on the anonymous host):
--   webchat_room           "support@conference.example.org"  default room; its domain is the
--                          only MUC service the page accepts
--   webchat_converse_dir   path of converse.js's dist/ directory (required)
--   webchat_ensure_room    true: create the room at startup if missing, persistent, public,
--                          archived (mod_muc_mam); default true
--   webchat_room_name      name given to a room this module creates (default "Support")
--   webchat_title          page title (default "Support chat")

local json = require "util.json";
local jid_split = require "util.jid".split;
local jid_prep = require "util.jid".prep;
local http_files = require "net.http.files";

module:depends("http");

local room_jid = module:get_option_string("webchat_room");
local converse_dir = module:get_option_path("webchat_converse_dir");
local ensure_room = module:get_option_boolean("webchat_ensure_room", true);
local room_name = module:get_option_string("webchat_room_name", "Support");
local title = module:get_option_string("webchat_title", "Support chat");
local http_paths = module:get_option("http_paths", {});
local websocket_path = http_paths.websocket or "/xmpp-websocket";
local bosh_path = http_paths.bosh or "/http-bind";

local room_node, muc_host, room_resource;
if room_jid then
	room_jid = jid_prep(room_jid);
	if room_jid then room_node, muc_host, room_resource = jid_split(room_jid); end
end
if not (room_node and muc_host and not room_resource) then
	module:log_status("error", "webchat_room must be a room address like support@conference.%s", module.host);
	return;
end

local auth = module:get_option_string("authentication");
if auth ~= "anonymous" then
	module:log("warn", "mod_%s is on %s, whose authentication is %s, not anonymous: visitors cannot log in",
		module.name, module.host, tostring(auth));
end

local converse_ok = converse_dir and io.open(converse_dir .. "/converse.min.js", "r");
if converse_ok then
	converse_ok:close();
	converse_ok = true;
else
	module:log_status("error", "converse.js not found: webchat_converse_dir (%s) must hold converse.min.js",
		tostring(converse_dir));
end

-- Values the page's script reads. Paths, not URLs: the browser completes them from its location.
local page_config = json.encode({
	anonymous_host = module.host;
	muc_host = muc_host;
	default_room = room_jid;
	websocket_path = websocket_path;
	bosh_path = bosh_path;
});

local function html_escape(s)
	return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }));
end

local page = ([[<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%s</title>
<link rel="stylesheet" href="dist/converse.min.css">
<style>
#webchat-refused { font: 16px/1.5 sans-serif; max-width: 36em; margin: 4em auto; padding: 1.5em 2em;
  border: 2px solid #b00020; border-radius: 6px; color: #222; background: #fff3f3; }
#webchat-refused[hidden] { display: none; }
</style>
<script type="application/json" id="webchat-config">%s</script>
<script type="module" src="dist/converse.min.js"></script>
<script type="module" src="webchat.js"></script>
</head>
<body class="converse-fullscreen">
<div id="webchat-refused" role="alert" hidden></div>
<noscript>This chat needs JavaScript.</noscript>
</body>
</html>
]]):format(html_escape(title), (page_config:gsub("<", "\\u003c")));

-- The page's script. The room comes from the fragment, percent-decoded; a bare name means a room on
-- our MUC service; anything else (another domain, a resource, a malformed address) is refused and
-- no XMPP session is opened.
local script = [[
const config = JSON.parse(document.getElementById("webchat-config").textContent);

export function roomFromFragment(fragment) {
	let s = fragment.replace(/^#/, "");
	if (s === "") return { room: config.default_room };
	try { s = decodeURIComponent(s); } catch (e) { return { error: "The address in this link is malformed." }; }
	s = s.trim();
	if (s.startsWith("xmpp:")) s = s.slice(5).replace(/\?join$/, "");
	if (!s.includes("@") && !s.includes("/")) s = s + "@" + config.muc_host;
	const m = /^([^@\/\s"&'<>:]{1,1023})@([^@\/\s]{1,1023})$/u.exec(s);
	if (!m) return { error: "“" + s + "” is not a room address." };
	if (m[2].toLowerCase() !== config.muc_host) {
		return { error: "“" + s + "” is not a room on this server (" + config.muc_host + ")." };
	}
	return { room: m[1].toLowerCase() + "@" + config.muc_host };
}

function refuse(message) {
	const box = document.getElementById("webchat-refused");
	box.textContent = message + " ";
	const a = document.createElement("a");
	a.href = "#";
	a.textContent = "Go to the support room instead.";
	box.appendChild(a);
	box.hidden = false;
}

function nickname() {
	const n = new Uint32Array(1);
	crypto.getRandomValues(n);
	return "guest-" + String(n[0] % 1000000).padStart(6, "0");
}

// A new fragment means another room: start over.
window.addEventListener("hashchange", () => window.location.reload());

const choice = roomFromFragment(window.location.hash);
if (choice.error) {
	refuse(choice.error);
} else {
	const ws = (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + config.websocket_path;
	const bosh = window.location.origin + config.bosh_path;
	const base = window.location.pathname.replace(/[^\/]*$/, "");
	window.converse.initialize({
		authentication: "anonymous",
		jid: config.anonymous_host,
		auto_login: true,
		websocket_url: ws,
		bosh_service_url: bosh,
		discover_connection_methods: false,
		assets_path: base + "dist/",
		view_mode: "fullscreen",
		singleton: true,
		auto_join_rooms: [choice.room],
		nickname: nickname(),
		allow_logout: false,
		allow_muc_invitations: false,
		allow_contact_requests: false,
		allow_bookmarks: false,
		hide_muc_server: true,
		show_client_info: false,
		persistent_store: "sessionStorage",
		clear_cache_on_logout: true,
		theme: "concord",
	});
}
]];

local security_headers = {
	["Content-Security-Policy"] = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
		.. "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob: https:; media-src 'self' blob: https:; "
		.. "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'";
	["X-Content-Type-Options"] = "nosniff";
	["Referrer-Policy"] = "no-referrer";
};

local function send_text(event, content_type, body, status)
	local response = event.response;
	response.status_code = status or 200;
	response.headers.content_type = content_type;
	response.headers.cache_control = "no-cache";
	for k, v in pairs(security_headers) do response.headers[k] = v; end
	return response:send(body);
end

local serve_dist = converse_ok and http_files.serve({
	path = converse_dir;
	cache_size = 64;
	cache_max_file_size = 2 * 1024 * 1024;
	mime_map = {
		js = "text/javascript"; mjs = "text/javascript"; css = "text/css"; json = "application/json";
		wasm = "application/wasm"; html = "text/html"; svg = "image/svg+xml"; png = "image/png";
		ico = "image/x-icon"; woff = "font/woff"; woff2 = "font/woff2"; ttf = "font/ttf"; eot = "application/vnd.ms-fontobject";
		mp3 = "audio/mpeg"; ogg = "audio/ogg"; m4a = "audio/mp4"; po = "text/plain";
	};
});

local unavailable = "<!DOCTYPE html><title>Webchat unavailable</title><p>The webchat is not installed on this server "
	.. "(converse.js is missing). The administrator can find details in the server log.</p>";

module:provides("http", {
	default_path = "/chat";
	route = {
		["GET /"] = function (event)
			if not converse_ok then
				return send_text(event, "text/html; charset=utf-8", unavailable, 503);
			end
			return send_text(event, "text/html; charset=utf-8", page);
		end;
		["GET /webchat.js"] = function (event)
			return send_text(event, "text/javascript; charset=utf-8", script);
		end;
		["GET /dist/*"] = function (event, path)
			if not serve_dist then return 404; end
			return serve_dist(event, path);
		end;
	};
});

-- The default room: persistent, public, archived, created at startup when missing.
local function ensure()
	local muc_host_session = prosody.hosts[muc_host];
	local muc = muc_host_session and muc_host_session.modules.muc;
	if not muc then
		module:log_status("warn", "%s is not a MUC component on this server: cannot ensure room %s", muc_host, room_jid);
		return;
	end
	local room = muc.get_room_from_jid(room_jid);
	if room then
		module:log("debug", "Room %s exists", room_jid);
		return;
	end
	local err;
	room, err = muc.create_room(room_jid);
	if not room then
		module:log_status("error", "Could not create room %s: %s", room_jid, tostring(err));
		return;
	end
	room:set_persistent(true);
	room:set_public(true);
	room:set_name(room_name);
	room._data.archiving = true; -- mod_muc_mam's per-room switch (muc#roomconfig_enablearchiving)
	room:save(true);
	module:log("info", "Created the persistent, archived room %s", room_jid);
end

if ensure_room then
	if prosody.start_time then
		ensure();
	else
		module:hook_global("server-started", ensure);
	end
end
