"""mod_native_limits on a real Prosody 13: the admin-shell commands registered as "shell-command" items (help text,
`prosodyctl shell limits top 5`), their life cycle across unload/load/reload of the module and of mod_admin_shell,
and a shell ban closing an open session.

Prosody 13 is not installed system-wide: the spec runs Debian's bookworm-backports package extracted into a cache
directory (PN_PROSODY13_ROOT, default /tmp/pn-prosody13; fetched with `apt-get download` through a private sources
list on first use, never installed, as `make check` installs its other packages with apt). Its launchers get their
paths rewritten to the extracted tree. If the package can neither be found nor fetched, the spec fails and says why.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
from test_limits_helpers import Anon, expect_stream_error

ROOT = Path(os.environ.get("PN_PROSODY13_ROOT", "/tmp/pn-prosody13"))
PACKAGE = "prosody/bookworm-backports"


def _fetch(root):
    work = root.parent / (root.name + ".apt")
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "sources.list").write_text("deb http://deb.debian.org/debian bookworm-backports main\n")
    opts = ["-o", f"Dir::Etc::sourcelist={work}/sources.list", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={work}/lists"]
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, timeout=300)
    subprocess.run(["apt-get", *opts, "download", PACKAGE], check=True, capture_output=True, timeout=300, cwd=work)
    deb = sorted(work.glob("prosody_13*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=120)


@pytest.fixture(scope="module")
def prosody13():
    lib = ROOT / "usr/lib/prosody"
    if not (lib / "prosody.version").exists():
        try:
            _fetch(ROOT)
        except (subprocess.SubprocessError, OSError, IndexError) as e:
            pytest.fail(f"no Prosody 13 tree at {ROOT} and fetching {PACKAGE} failed: {e}")
    version = (lib / "prosody.version").read_text().strip()
    assert version.startswith("13."), version
    return ROOT, version


class Prosody13:
    def __init__(self, root, tmp, extra_host=""):
        self.tmp = tmp
        self.c2s_port = harness.free_port()
        lib = root / "usr/lib/prosody"
        for name in ("prosody", "prosodyctl"):
            text = (root / "usr/bin" / name).read_text()
            text = re.sub(r"(?m)^CFG_SOURCEDIR=.*$", f"CFG_SOURCEDIR='{lib}';", text)
            text = re.sub(r"(?m)^CFG_CONFIGDIR=.*$", f"CFG_CONFIGDIR='{tmp}';", text)
            text = re.sub(r"(?m)^CFG_PLUGINDIR=.*$", f"CFG_PLUGINDIR='{lib}/modules/';", text)
            text = re.sub(r"(?m)^CFG_DATADIR=.*$", f"CFG_DATADIR='{tmp}/data';", text)
            (tmp / name).write_text(text)
            (tmp / name).chmod(0o755)
        (tmp / "data").mkdir()
        (tmp / "certs").mkdir()
        self.config = tmp / "prosody.cfg.lua"
        self.log = tmp / "prosody.log"
        self.config.write_text(f"""
pidfile = "{tmp}/prosody.pid"
data_path = "{tmp}/data"
certificates = "{tmp}/certs"
plugin_paths = {{ "{harness.MODULES_DIR}" }}
admin_socket = "{tmp}/admin.sock"
log = {{ debug = "{self.log}" }}
run_as_root = true
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
http_ports = {{ }}
https_ports = {{ }}
c2s_require_encryption = false
modules_enabled = {{ "saslauth", "admin_shell", "ping", "disco" }}
VirtualHost "{harness.DOMAIN}"
    authentication = "anonymous"
    modules_enabled = {{ "native_limits" }}
    native_limits_exempt_loopback = false
Component "{harness.MUC_DOMAIN}" "muc"
    modules_enabled = {{ "native_limits" }}
""")
        env = harness.child_env()
        self.proc = subprocess.Popen([str(tmp / "prosody"), "--config", str(self.config), "-F"], env=env,
                                     stdout=open(tmp / "stdout", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while "Limits active" not in self.log_text() or self.log_text().count("Limits active") < 2 \
                or not (tmp / "admin.sock").exists():
            assert self.proc.poll() is None, (tmp / "stdout").read_text()
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.1)

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def shell(self, *args, stdin=None):
        r = subprocess.run([str(self.tmp / "prosodyctl"), "--config", str(self.config), "shell", *args], input=stdin,
                           capture_output=True, text=True, timeout=30, env=harness.child_env())
        return r.stdout + r.stderr

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def p13(prosody13, tmp_path):
    srv = Prosody13(prosody13[0], tmp_path)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]


def test_commands_are_shell_command_items_with_help(p13):
    log = p13.log_text()
    for name in ("show", "top", "ban", "unban", "reset"):
        assert f"Shell command added by mod_native_limits: limits:{name}()" in log, name
    help_text = p13.shell(stdin="help limits\n")
    assert "Abuse limits of anonymous hosts (mod_native_limits)" in help_text, help_text
    for sig in ("limits:show(address_or_prefix, host)", "limits:top(n, host)", "limits:ban(address_or_prefix, duration, host)",
                "limits:unban(address_or_prefix, host)", "limits:reset(address_or_prefix, host)"):
        assert sig in help_text, (sig, help_text)
    # the command-line form exists only for registered items
    out = p13.shell("limits", "ban", "198.51.100.0/24", "1h")
    assert "Banned 198.51.100.0/24 on 2 host(s)" in out, out
    out = p13.shell("limits", "top", "5", harness.DOMAIN)
    assert re.search(r"198\.51\.100\.0/24\s+level 0 .*banned 3\d\d\ds", out) and harness.MUC_DOMAIN not in out, out
    out = p13.shell('limits:show("198.51.100.7")')  # the Lua form, every host
    assert out.count("banned 3") >= 2 and "as 198.51.100.0/24" in out, out
    out = p13.shell("limits", "unban", "198.51.100.0/24")
    assert "Unbanned 198.51.100.0/24" in out, out
    assert "not-an-address" in p13.shell("limits", "ban", "not-an-address")


def test_commands_follow_the_module_life_cycle(p13):
    assert "OK: Listed" in p13.shell("limits", "top")
    p13.shell('module:reload("admin_shell")')  # a reloaded shell is offered the items again
    assert "OK: Listed" in p13.shell("limits", "top")
    p13.shell(f'module:unload("native_limits", "{harness.DOMAIN}")')
    out = p13.shell("limits", "top")
    assert "OK: Listed" in out and harness.DOMAIN + ":" not in out.replace(harness.MUC_DOMAIN, ""), out
    p13.shell(f'module:unload("native_limits", "{harness.MUC_DOMAIN}")')
    assert "Command not found" in p13.shell("limits", "top")  # the last instance takes the commands away
    p13.shell(f'module:load("native_limits", "{harness.DOMAIN}")')
    p13.shell(f'module:reload("native_limits", "{harness.DOMAIN}")')
    out = p13.shell("limits", "top")
    assert f"{harness.DOMAIN}: 0 offender(s)" in out, out


def test_shell_ban_closes_an_open_session_on_13(p13):
    c = Anon(type("S", (), {"c2s_port": p13.c2s_port})())
    assert c.login()[0] == "ok"
    out = p13.shell("limits", "ban", "127.0.0.1", "10min", harness.DOMAIN)
    assert "Banned 127.0.0.1 on 1 host(s)" in out, out
    kind, text = c._outcome(r"(?!)")
    assert kind == "stream-error", (kind, text)
    expect_stream_error(text, contains="Too many violations from your network; try again in 600 seconds")
    c.close()
