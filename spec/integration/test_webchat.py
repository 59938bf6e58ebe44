"""The anonymous support webchat of `make demo`, end to end.

The server is started exactly as the README's first command starts it: `demo/run` with demo/prosody.cfg.lua (the
same file), on free loopback ports, with a throwaway state directory; stopped with SIGINT to its process group, as
Ctrl-C does. The browser steps run spec/browser/webchat.mjs (Debian's Chromium, headless, driven by
playwright-core); their screenshots land in spec/out/webchat/.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import harness

REPO = harness.REPO
BROWSER_DIR = REPO / "spec" / "browser"
SHOTS = REPO / "spec" / "out" / "webchat"
PLAYWRIGHT_VERSION = json.loads((BROWSER_DIR / "package.json").read_text())["dependencies"]["playwright-core"]
WAIT = 60  # seconds; bounds that only end a run that has already failed


def plain_env(extra=None):
    """Environment without the sanitizer preload (node, npm, Chromium must not get libasan)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",)}
    if extra:
        env.update(extra)
    return env


def converse_dir():
    res = subprocess.run(["sh", str(REPO / "demo" / "fetch-converse")], capture_output=True, text=True,
                         env=plain_env(), timeout=600)
    assert res.returncode == 0, f"demo/fetch-converse failed:\n{res.stderr}"
    return Path(res.stdout.strip())


def ensure_playwright():
    pkg = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    if not pkg.exists() or json.loads(pkg.read_text())["version"] != PLAYWRIGHT_VERSION:
        res = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, capture_output=True,
                             text=True, env=plain_env({"PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}), timeout=600)
        assert res.returncode == 0, f"npm ci in spec/browser failed:\n{res.stdout}\n{res.stderr}"


class Demo:
    """`demo/run` in its own process group, like a terminal's foreground job."""

    def __init__(self, state):
        self.state = Path(state)
        self.c2s_port = harness.free_port()
        self.http_port = harness.free_port()
        while self.http_port == self.c2s_port:
            self.http_port = harness.free_port()
        self.proc = None
        self.runs = 0
        self.stdout_path = None

    @property
    def base(self):
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self):
        return self.state / "prosody.log"

    def start(self, command=("sh", "demo/run")):
        self.runs += 1
        self.stdout_path = self.state.parent / f"demo-run-{self.runs}.out"
        env = harness.child_env({
            "PN_DEMO_STATE": str(self.state),
            "PN_DEMO_C2S_PORT": str(self.c2s_port),
            "PN_DEMO_HTTP_PORT": str(self.http_port),
        })
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(list(command), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"demo/run exited with {self.proc.returncode}:\n{self.stdout()}")
            if "Ctrl-C stops the server" in self.stdout() and self._http_ready():
                return self
            time.sleep(0.1)
        raise AssertionError(f"the demo did not come up:\n{self.stdout()}")

    def _http_ready(self):
        try:
            with urllib.request.urlopen(self.base + "/chat/", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stdout(self):
        try:
            return self.stdout_path.read_text(errors="replace")
        except (FileNotFoundError, AttributeError):
            return ""

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctrl_c(self):
        """SIGINT to the foreground process group; returns the exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        rc = self.proc.wait(timeout=WAIT)
        self.proc = None
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=WAIT)
        self.proc = None

    def prosodyctl(self, *args):
        """demo/prosodyctl, the command the demo prints for its admin shell."""
        env = harness.child_env({"PN_DEMO_STATE": str(self.state), "PN_DEMO_C2S_PORT": str(self.c2s_port),
                                 "PN_DEMO_HTTP_PORT": str(self.http_port)})
        return subprocess.run(["sh", str(REPO / "demo" / "prosodyctl"), *args], capture_output=True, text=True,
                              env=env, timeout=WAIT)


def browser_step(demo, step, *extra):
    SHOTS.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["node", str(BROWSER_DIR / "webchat.mjs"), "--base", demo.base, "--out", str(SHOTS),
                          "--step", step, *extra], cwd=BROWSER_DIR, capture_output=True, text=True,
                         env=plain_env(), timeout=300)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"browser step {step} printed no result (rc {res.returncode}):\n{res.stdout}\n{res.stderr}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["output"] = res.stdout + res.stderr
    result["rc"] = res.returncode
    return result


def assert_step(result):
    failed = [c for c in result["checks"] if not c["ok"]]
    assert result["rc"] == 0 and result["ok"] and not failed, \
        f"browser step {result['step']} failed: {failed}\n{result['output']}"


@pytest.fixture(scope="module")
def demo():
    converse_dir()  # first: it also installs npm where Debian's nodejs came without it
    ensure_playwright()
    tmp = Path(tempfile.mkdtemp(prefix="pn-webchat-"))
    d = Demo(tmp / "state")
    d.start()
    yield d
    if d.proc is not None:
        try:
            d.ctrl_c()
        except Exception:
            d.kill()
    if os.environ.get("PN_KEEP_TMP"):
        print(f"demo state kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def exchanged(demo):
    """The support-room exchange, run once: its result and the message tokens it posted."""
    return browser_step(demo, "support")


def http_get(url):
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# -- the demo as a program -----------------------------------------------------------------------------------------


def test_demo_prints_urls_data_and_log_locations(demo):
    out = demo.stdout()
    assert f"{demo.base}/chat/" in out
    assert f"{demo.base}/chat/#myroom@conference.localhost" in out
    assert f"ws://127.0.0.1:{demo.http_port}/xmpp-websocket" in out
    assert f"{demo.base}/http-bind" in out
    assert f"{demo.base}/metrics" in out
    assert f"127.0.0.1:{demo.c2s_port}" in out
    assert f"Data:  {demo.state}/data" in out
    assert f"Log:   {demo.state}/prosody.log" in out
    password = (demo.state / "demo-password").read_text().strip()
    assert re.search(r"account demo@localhost\s+password " + re.escape(password), out)
    assert "(new data directory)" in out
    # The printed account works (plain SASL on the loopback-only c2s port).
    c = harness.RawXMPP(demo.c2s_port, domain="localhost")
    try:
        assert c.login("demo", password).startswith("demo@localhost/")
    finally:
        c.close()
    assert "Admin shell: demo/prosodyctl shell" in out


def test_demo_starts_without_errors_with_the_whole_pack_loaded(demo):
    log = demo.log()
    assert not re.findall(r"^.*\t(?:error|warn)\t.*$", log, re.M)
    assert re.search(r"storage_native\tinfo\tArchive database .*prosody-native\.sqlite", log)
    assert re.search(r"mod_native_dane\tinfo\tDANE for s2s: default policy opportunistic", log)
    assert re.search(r"anon\.localhost:native_limits\tinfo\tLimits active", log)
    assert re.search(r"conference\.localhost:native_limits\tinfo\tLimits active", log)


def test_page_script_and_converse_assets_are_served(demo):
    status, headers, body = http_get(demo.base + "/chat/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    config = json.loads(re.search(r'<script type="application/json" id="webchat-config">(.*?)</script>', page).group(1))
    assert config == {"anonymous_host": "anon.localhost", "muc_host": "conference.localhost",
                      "default_room": "support@conference.localhost", "websocket_path": "/xmpp-websocket",
                      "bosh_path": "/http-bind"}
    assert '<script type="module" src="dist/converse.min.js"></script>' in page
    assert "script-src 'self' 'wasm-unsafe-eval'" in headers["Content-Security-Policy"]
    assert "<script>" not in page  # no inline script: the CSP forbids it

    status, headers, body = http_get(demo.base + "/chat/webchat.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"roomFromFragment" in body

    status, headers, body = http_get(demo.base + "/chat/dist/converse.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert body == (converse_dir() / "converse.min.js").read_bytes()
    status, headers, _ = http_get(demo.base + "/chat/dist/converse.min.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(demo.base + "/chat", timeout=30)
    assert redirect.value.code == 301 and redirect.value.headers["Location"] == "/chat/"

    status, _, body = http_get(demo.base + "/chat/dist/../../../../../../etc/passwd")
    assert status != 200 and b"root:" not in body


def test_bosh_on_the_same_origin_offers_anonymous_login(demo):
    body = ("<body xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh' content='text/xml; "
            "charset=utf-8' hold='1' rid='1000' to='anon.localhost' ver='1.6' wait='5' xmpp:version='1.0'/>")
    req = urllib.request.Request(demo.base + "/http-bind", data=body.encode(),
                                 headers={"Content-Type": "text/xml; charset=utf-8"})
    with urllib.request.urlopen(req, timeout=30) as r:
        reply = r.read().decode()
    assert re.search(r"\bsid=['\"][^'\"]+['\"]", reply), reply
    assert "<mechanism>ANONYMOUS</mechanism>" in reply, reply


def test_websocket_on_the_same_origin_upgrades(demo):
    with socket.create_connection(("127.0.0.1", demo.http_port), timeout=30) as s:
        s.sendall((f"GET /xmpp-websocket HTTP/1.1\r\nHost: 127.0.0.1:{demo.http_port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head


def test_support_room_is_created_persistent_public_and_archived(demo):
    assert "Created the persistent, archived room support@conference.localhost" in demo.log()
    res = demo.prosodyctl("shell", '>local r = prosody.hosts["conference.localhost"].modules.muc.get_room_from_jid('
                          '"support@conference.localhost"); return r and table.concat({tostring(r:get_persistent()), '
                          'tostring(r:get_public()), tostring(r._data.archiving), tostring(r:get_name())}, ",")')
    assert res.returncode == 0, res.stderr
    assert "true,true,true,Support" in res.stdout, res.stdout


# -- visitors in a real browser ------------------------------------------------------------------------------------


def test_two_visitors_land_in_support_and_exchange_messages(demo, exchanged):
    assert_step(exchanged)
    assert (SHOTS / "02-support-visitor-a-after-exchange.png").stat().st_size > 0
    # The server saw it too: two anonymous logins and the messages archived in the room.
    assert len(re.findall(r"Authenticated as \S+@anon\.localhost", demo.log())) >= 2
    for token in exchanged["tokens"]:
        assert archived_in_support(demo, token) == 1, f"{token} is not in the room's archive"
    # converse.js enabled stream management, served by mod_native_smacks (core mod_smacks is disabled).
    enabled = re.findall(r"Sending\[c2s\]: (<enabled [^>]*>)", demo.log())
    assert any("xmlns='urn:xmpp:sm:3'" in tag and "resume='true'" in tag and "max='60'" in tag for tag in enabled), enabled
    _, _, body = http_get(demo.base + "/metrics")
    assert "prosody_mod_native_smacks__" in body.decode() and "prosody_mod_smacks__" not in body.decode()


def archived_in_support(demo, text):
    """How many items of the support room's archive (read through Prosody's storage API) contain `text`."""
    res = demo.prosodyctl("shell", '>local a = require "core.storagemanager".open("conference.localhost", "muc_log", '
                          '"archive"); local n = 0; for _, item in assert(a:find("support", {})) do '
                          f'if tostring(item):find({harness.lua_string(text)}, 1, true) then n = n + 1 end end; '
                          'return "count=" .. n')
    assert res.returncode == 0, res.stderr
    m = re.search(r"count=(\d+)", res.stdout)
    assert m, res.stdout
    return int(m.group(1))


def test_room_named_in_the_fragment(demo):
    assert_step(browser_step(demo, "fragment"))


def test_fragments_that_are_not_rooms_here_are_refused(demo):
    before = len(re.findall(r"Authenticated as", demo.log()))
    assert_step(browser_step(demo, "refuse"))
    assert len(re.findall(r"Authenticated as", demo.log())) == before, "a refused page logged in anyway"


def test_ctrl_c_stops_cleanly_and_a_second_run_reuses_the_data(demo, exchanged):
    assert_step(exchanged)
    password = (demo.state / "demo-password").read_text().strip()
    rc = demo.ctrl_c()
    assert rc == 0, demo.stdout()
    assert "Received SIGINT" in demo.stdout() and "Shutdown complete" in demo.stdout()
    assert not (demo.state / "prosody.pid").exists() or not (demo.state / "prosody.pid").read_text().strip()

    demo.start(command=("make", "--no-print-directory", "demo"))  # the README's command, this time
    out = demo.stdout()
    assert "(reusing the data of a previous run)" in out
    assert f"password {password}" in out
    assert "Created the persistent, archived room" not in out  # the room came back from storage

    # A late joiner sees the earlier messages: the restart emptied every in-memory history, so they came from the
    # room's archive (mod_muc_mam on mod_storage_native).
    before = len(demo.log())
    assert_step(browser_step(demo, "late", "--tokens", ",".join(exchanged["tokens"])))
    # converse.js asks a MAM-enabled room for no join history (maxstanzas=0) and queries the archive instead.
    late_log = demo.log()[before:]
    assert re.search(r"conference\.localhost:muc_mam\tdebug\tArchive query by \S+@anon\.localhost", late_log)
    returned = [int(n) for n in re.findall(r"conference\.localhost:muc_mam\tdebug\tArchive query id=\S+ completed, "
                                           r"(\d+) items returned", late_log)]
    assert returned and max(returned) >= len(exchanged["tokens"]), returned
    assert (SHOTS / "07-late-joiner-history.png").stat().st_size > 0


def test_a_flooding_visitor_is_slowed_then_refused_by_the_limits(demo):
    # Last of the browser specs: it gets 127.0.0.1 banned from the room service for five minutes.
    result = browser_step(demo, "flood")
    assert_step(result)
    # Server side: the room archived only what the limits let through, and the ban was logged.
    archived = archived_in_support(demo, f"flood-{result['run']}-")
    assert 1 <= archived <= result["sent"] - 30, f"{archived} of {result['sent']} flood messages archived"
    assert re.search(r"conference\.localhost:native_limits\tinfo\tBanned 127\.0\.0\.1 for \d+s", demo.log())
    assert (SHOTS / "10-flood-banned-on-rejoin.png").stat().st_size > 0
    # What an operator watches: the same story in the OpenMetrics endpoint the demo prints.
    status, _, body = http_get(demo.base + "/metrics")
    assert status == 200
    metrics = body.decode()
    refused = re.search(r'^prosody_mod_native_limits__decisions_total\{host="conference\.localhost",rule="muc_messages",'
                        r'action="refuse",mode="enforce"\} (\d+)', metrics, re.M)
    assert refused and int(refused.group(1)) >= 30, metrics[-3000:]
    bans = re.search(r'^prosody_mod_native_limits__bans\{host="conference\.localhost"\} (\d+)', metrics, re.M)
    assert bans and int(bans.group(1)) >= 1
    # the ban closed the flooder's open session (and the watcher's: same address) right away
    closed = re.findall(r'^prosody_mod_native_limits__ban_closed_sessions_total\{host="conference\.localhost",'
                        r'transport="websocket",mode="enforce"\} (\d+)', metrics, re.M)
    assert closed and int(closed[0]) >= 1, metrics[-3000:]


def test_demo_refuses_to_start_on_a_taken_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = harness.child_env({"PN_DEMO_STATE": str(tmp_path / "state"), "PN_DEMO_C2S_PORT": str(harness.free_port()),
                                 "PN_DEMO_HTTP_PORT": str(port)})
        res = subprocess.run(["sh", str(REPO / "demo" / "run")], capture_output=True, text=True, env=env, timeout=WAIT)
    assert res.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in res.stderr
    assert not (tmp_path / "state" / "prosody.pid").exists()


# -- the converse.js download --------------------------------------------------------------------------------------


def test_converse_download_with_a_wrong_integrity_is_refused(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # An npm that "packs" a tarball whose bytes differ from the published one.
    (fake_bin / "npm").write_text(
        "#!/bin/sh\n"
        "dest=.\n"
        "while [ $# -gt 0 ]; do case $1 in --pack-destination) dest=$2; shift;; esac; shift; done\n"
        "mkdir -p \"$dest/w/package/dist\" && echo 'tampered' > \"$dest/w/package/dist/converse.min.js\"\n"
        "tar -czf \"$dest/converse.js-14.0.0.tgz\" -C \"$dest/w\" package\n")
    (fake_bin / "npm").chmod(0o755)
    cache = tmp_path / "cache"
    res = subprocess.run(["sh", str(REPO / "demo" / "fetch-converse")], capture_output=True, text=True, timeout=60,
                         env=plain_env({"PATH": f"{fake_bin}:{os.environ['PATH']}", "PN_CONVERSE_CACHE": str(cache)}))
    assert res.returncode != 0
    assert "integrity mismatch for converse.js@14.0.0" in res.stderr
    assert not (cache / "14.0.0").exists()
