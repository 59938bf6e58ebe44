-- prosody-native demo configuration, started by `make demo` (demo/run), which sets the
-- PN_* variables read here through Prosody's ENV_ config variables. The browser spec
-- (spec/integration/test_webchat.py) starts this same file through demo/run, on free ports.
local state = ENV_PN_DEMO_STATE;

pidfile = state .. "/prosody.pid";
data_path = state .. "/data";
certificates = state .. "/certs";
installer_plugin_path = state .. "/custom_plugins";
plugin_paths = { ENV_PN_ROOT .. "/modules" };
admin_socket = state .. "/prosody.sock";
log = { info = "*stdout"; debug = state .. "/prosody.log" };
run_as_root = true;

-- Loopback only: no certificates, no TLS, plain passwords allowed. Never like this on a real server.
interfaces = { "127.0.0.1" };
c2s_ports = { ENV_PN_DEMO_C2S_PORT };
http_interfaces = { "127.0.0.1" };
http_ports = { ENV_PN_DEMO_HTTP_PORT };
https_ports = { };
c2s_require_encryption = false;
allow_unencrypted_plain_auth = true;

modules_enabled = {
	"roster"; "saslauth"; "disco"; "ping"; "carbons"; "mam"; "offline";
	"native_smacks"; -- stream management on the native queue, in place of core mod_smacks
	"websocket"; "bosh"; "admin_shell";
	"http_openmetrics"; -- /metrics, for 127.0.0.1 only
	"native_dane"; -- DANE for s2s: loaded, but idle here (see below)
};
-- No server-to-server links: a local demo has no remote peers, so mod_native_dane has nothing to
-- verify. On a real server, enable s2s and DANE applies to every outgoing link.
modules_disabled = { "s2s"; "smacks" };
-- DNSSEC validation for Prosody's resolver (Debian's dns-root-data), which DANE needs.
unbound = { options = { ["trust-anchor-file:"] = "/usr/share/dns/root.key" } };

statistics = "internal";
statistics_interval = "manual"; -- collected when /metrics is read

default_storage = "internal";
storage = { archive = "native"; muc_log = "native"; offline = "native" };
archive_expires_after = "1w";

-- HTTP: the webchat page, WebSocket and BOSH on one origin. Addressed as 127.0.0.1 (no Host
-- that names a VirtualHost), requests go to the anonymous host.
http_default_host = "anon.localhost";
http_paths = { native_webchat = "/chat"; websocket = "/xmpp-websocket"; bosh = "/http-bind" };
-- No reverse proxy in front of the demo: the browser's own address is the client's. (Behind a proxy,
-- list it here and have it send X-Forwarded-For; see the README.)
trusted_proxies = { };

VirtualHost "localhost"
	authentication = "internal_hashed"

VirtualHost "anon.localhost"
	authentication = "anonymous"
	modules_enabled = { "native_webchat"; "native_limits" }
	-- Every demo visitor comes from 127.0.0.1, normally exempt: limit it, so a flood shows.
	native_limits_exempt_loopback = false
	-- A closed tab's session (and its place in the room) lasts a minute, not ten.
	smacks_hibernation_time = 60
	webchat_room = "support@conference.localhost"
	webchat_room_name = "Support"
	webchat_title = "prosody-native support chat"
	webchat_converse_dir = ENV_PN_CONVERSE_DIR

Component "conference.localhost" "muc"
	modules_enabled = { "muc_mam"; "native_limits" }
	muc_log_by_default = true
	native_limits_exempt_loopback = false
