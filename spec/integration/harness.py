"""Throwaway Prosody for integration specs.

One `ProsodyServer` is one real `/usr/bin/prosody -F` process on 127.0.0.1 with free high ports, a generated
config, its own data directory, log file, pidfile and admin socket, all inside a temporary directory.  Nothing
outside that directory is touched; the repo's `modules/` directory is on `plugin_paths`.

Environment:
  PN_PRELOAD   when set, Prosody, prosodyctl and every lua5.4 child run with LD_PRELOAD=$PN_PRELOAD and
               ASAN_OPTIONS (default detect_leaks=0:abort_on_error=1, an ASAN_OPTIONS from the environment wins).
               Any "ERROR: AddressSanitizer" / "runtime error:" in a child's log or stderr fails the test
               (see conftest.py).
  PN_KEEP_TMP  when set, temporary directories are not removed (paths are printed on failure anyway).

Run the specs with Debian's interpreter (slixmpp lives there):  /usr/bin/python3 -m pytest spec/integration
"""

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES_DIR = REPO / "modules"
PROSODY = "/usr/bin/prosody"
PROSODYCTL = "/usr/bin/prosodyctl"
LUA = "/usr/bin/lua5.4"
PROSODY_DIR = "/usr/lib/prosody"

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:")
DEFAULT_ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1"

DOMAIN = "localhost"
MUC_DOMAIN = "conference.localhost"

DEFAULT_MODULES = ["roster", "saslauth", "disco", "ping", "carbons", "mam", "smacks", "offline", "admin_shell"]

# Storage map for the MAM/archive specs: archives on the native driver, everything else internal.
NATIVE_ARCHIVE_STORAGE = {"archive": "native", "muc_log": "native", "offline": "native"}

# Every server started (and not yet forgotten) by this process; conftest.py prints their logs on failure.
SERVERS = []
# Every lua5.4 child output file started by helpers here; scanned for sanitizer reports.
CHILD_OUTPUTS = []


class HarnessError(Exception):
    pass


def child_env(extra=None):
    """Environment for Prosody / prosodyctl / lua5.4 children (adds the sanitizer preload if requested)."""
    env = dict(os.environ)
    preload = os.environ.get("PN_PRELOAD")
    if preload:
        env["LD_PRELOAD"] = preload
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS") or DEFAULT_ASAN_OPTIONS
    if extra:
        env.update(extra)
    return env


def lua_env(extra=None):
    """child_env() plus the search paths to drive Prosody's core modules from a plain lua5.4."""
    env = child_env()
    env["LUA_PATH"] = f"{PROSODY_DIR}/?.lua;;"
    env["LUA_CPATH"] = f"{PROSODY_DIR}/?.so;;"
    env.pop("LUA_INIT", None)
    env.pop("LUA_INIT_5_4", None)
    if extra:
        env.update(extra)
    return env


def sanitizer_reports(text):
    """Lines of `text` that look like AddressSanitizer / UBSan reports."""
    return [line for line in text.splitlines() if any(m in line for m in SANITIZER_MARKERS)]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lua_literal(value):
    """Python value -> Lua source literal (str, bool, int, float, None, list/tuple, dict)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, (list, tuple, set)):
        return "{ " + "; ".join(lua_literal(v) for v in value) + " }"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            key = k if isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) else f"[{lua_literal(k)}]"
            parts.append(f"{key} = {lua_literal(v)}")
        return "{ " + "; ".join(parts) + " }"
    raise TypeError(f"cannot express {value!r} in Lua")


def lua_string(s):
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32:
            out.append("\\%03d" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def native_driver_available():
    """True once the storage driver has landed in the checkout (shim + built engine)."""
    return (MODULES_DIR / "mod_storage_native.lua").exists() and (REPO / "build" / "prosody_native" / "archive.so").exists()


class ProsodyServer:
    """A throwaway Prosody.

    storage          value of the `storage` option (string or dict store -> driver), None to leave it unset
    default_storage  value of `default_storage` (default "internal")
    global_options   extra global options {name: python value}
    host_options     extra options for VirtualHost "localhost"
    muc_options      extra options for Component "conference.localhost"
    modules          extra global modules_enabled entries; `host_modules` / `muc_modules` likewise per host
    modules_disabled extra global modules_disabled entries ("s2s" is always disabled)
    extra_config     raw Lua appended to the global section (before the hosts)
    users            [(user, password)] registered on localhost with prosodyctl before start
    """

    def __init__(self, *, storage=None, default_storage="internal", global_options=None, host_options=None,
                 muc_options=None, modules=(), host_modules=(), muc_modules=(), modules_disabled=(),
                 extra_config="", users=(), tmp_root=None, name="prosody"):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pn-{name}-", dir=tmp_root))
        self.name = name
        self.storage = storage
        self.default_storage = default_storage
        self.global_options = dict(global_options or {})
        self.host_options = dict(host_options or {})
        self.muc_options = dict(muc_options or {})
        self.modules = list(DEFAULT_MODULES) + [m for m in modules if m not in DEFAULT_MODULES]
        self.host_modules = list(host_modules)
        self.muc_modules = ["muc_mam"] + [m for m in muc_modules if m != "muc_mam"]
        self.modules_disabled = ["s2s"] + [m for m in modules_disabled if m != "s2s"]
        self.extra_config = extra_config
        self.data_dir = self.tmp / "data"
        self.certs_dir = self.tmp / "certs"
        self.config_path = self.tmp / "prosody.cfg.lua"
        self.log_path = self.tmp / "prosody.log"
        self.stdout_path = self.tmp / "stdout.log"
        self.pidfile = self.tmp / "prosody.pid"
        self.admin_socket = self.tmp / "prosody.sock"
        for d in (self.data_dir, self.certs_dir, self.tmp / "custom_plugins"):
            d.mkdir(parents=True, exist_ok=True)
        self.c2s_port = None
        self.http_port = None
        self.proc = None
        self.pid = None
        self.extra_outputs = []  # files of prosodyctl runs (scanned for sanitizer reports)
        self._pick_ports()
        self.write_config()
        for user, password in users:
            self.register(user, password)
        SERVERS.append(self)

    # -- configuration -------------------------------------------------------------------------------------------

    def _pick_ports(self):
        self.c2s_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.c2s_port:
            self.http_port = free_port()

    def config_text(self):
        g = {
            "pidfile": str(self.pidfile),
            "data_path": str(self.data_dir),
            "certificates": str(self.certs_dir),
            "installer_plugin_path": str(self.tmp / "custom_plugins"),
            "plugin_paths": [str(MODULES_DIR)],
            "admin_socket": str(self.admin_socket),
            "log": {"debug": str(self.log_path)},
            "run_as_root": True,
            "interfaces": ["127.0.0.1"],
            "c2s_ports": [self.c2s_port],
            "http_interfaces": ["127.0.0.1"],
            "http_ports": [self.http_port],
            "https_ports": [],
            "c2s_require_encryption": False,
            "allow_unencrypted_plain_auth": True,
            "authentication": "internal_plain",
            "modules_enabled": self.modules,
            "modules_disabled": self.modules_disabled,
            "default_storage": self.default_storage,
        }
        if self.storage is not None:
            g["storage"] = self.storage
        g.update(self.global_options)
        lines = ["-- generated by spec/integration/harness.py"]
        lines += [f"{k} = {lua_literal(v)}" for k, v in g.items()]
        if self.extra_config:
            lines.append(self.extra_config)
        lines.append("")
        lines.append(f'VirtualHost "{DOMAIN}"')
        host_opts = dict(self.host_options)
        if self.host_modules:
            host_opts.setdefault("modules_enabled", self.host_modules)
        lines += [f"    {k} = {lua_literal(v)}" for k, v in host_opts.items()]
        lines.append("")
        lines.append(f'Component "{MUC_DOMAIN}" "muc"')
        muc_opts = {"modules_enabled": self.muc_modules}
        muc_opts.update(self.muc_options)
        lines += [f"    {k} = {lua_literal(v)}" for k, v in muc_opts.items()]
        return "\n".join(lines) + "\n"

    def write_config(self):
        self.config_path.write_text(self.config_text())

    # -- prosodyctl ------------------------------------------------------------------------------------------------

    def prosodyctl(self, *args, timeout=30, check=True):
        out = self.tmp / f"prosodyctl-{len(self.extra_outputs)}.err"
        self.extra_outputs.append(out)
        with open(out, "wb") as err:
            res = subprocess.run([PROSODYCTL, "--config", str(self.config_path), *args], stdout=subprocess.PIPE,
                                 stderr=err, stdin=subprocess.DEVNULL, env=child_env(), timeout=timeout)
        res.stderr = out.read_bytes()
        if check and res.returncode != 0:
            raise HarnessError(f"prosodyctl {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout.decode(errors='replace')}\n{res.stderr.decode(errors='replace')}")
        return res

    def register(self, user, password):
        self.prosodyctl("register", user, DOMAIN, password)

    def shell(self, lua, timeout=30, check=True):
        """Run one line in the running server's admin shell (`prosodyctl shell`); returns stdout text.

        A leading '>' runs the line as plain Lua in the global environment; its value comes back as "Result: ...".
        """
        if "\n" in lua:
            raise ValueError("prosodyctl shell takes one line; join statements with ';'")
        res = self.prosodyctl("shell", lua, timeout=timeout, check=False)
        text = res.stdout.decode(errors="replace")
        err = res.stderr.decode(errors="replace")
        if check and (res.returncode != 0 or err.strip()):
            raise HarnessError(f"shell {lua!r} failed ({res.returncode}):\nstdout: {text}\nstderr: {err}")
        return text

    def shell_result(self, lua, timeout=30):
        """Run `> lua` (global env) and return the text after 'Result: ' / 'OK: ' of the last line."""
        text = self.shell(">" + lua, timeout=timeout)
        last = [line for line in text.splitlines() if line.strip()]
        if not last:
            raise HarnessError(f"shell {lua!r} printed nothing")
        m = re.match(r"^(?:\| )?(?:Result|OK): (.*)$", last[-1])
        if not m:
            raise HarnessError(f"shell {lua!r}: unexpected output {text!r}")
        return m.group(1)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self, timeout=20.0, attempts=3):
        """Start Prosody and wait until the c2s port accepts connections (bounded)."""
        last_error = None
        for attempt in range(attempts):
            if attempt:
                self._pick_ports()  # a port taken meanwhile: try others
                self.write_config()
            try:
                self._start_once(timeout)
                return self
            except HarnessError as e:
                last_error = e
                self._kill_leftover()
                if "Failed to open server port" not in self.log_text() + self.stdout_text():
                    break
        raise last_error

    def _start_once(self, timeout):
        if self.pidfile.exists():
            self.pidfile.unlink()
        stdout = open(self.stdout_path, "ab")
        try:
            self.proc = subprocess.Popen(["setsid", PROSODY, "-F", "--config", str(self.config_path)],
                                         stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_env(), cwd=str(self.tmp))
        finally:
            stdout.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"prosody exited with {self.proc.returncode} during startup\n"
                                   f"{self.stdout_text()[-4000:]}")
            if self.pidfile.exists() and self.pidfile.read_text().strip() and self._port_open():
                self.pid = int(self.pidfile.read_text().strip())
                return
            time.sleep(0.05)
        raise HarnessError(f"prosody did not accept connections on 127.0.0.1:{self.c2s_port} within {timeout}s")

    def _port_open(self):
        try:
            with socket.create_connection(("127.0.0.1", self.c2s_port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        """TERM the pid from the pidfile, KILL after `timeout`. Returns Prosody's exit status (None if unknown)."""
        if self.proc is None:
            return None
        pid = self.pid
        if pid is None and self.pidfile.exists():
            try:
                pid = int(self.pidfile.read_text().strip())
            except ValueError:
                pid = None
        if pid is None:
            pid = self.proc.pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=timeout)
        rc = self.proc.returncode
        self.proc = None
        self.pid = None
        return rc

    def kill(self):
        """SIGKILL (simulated crash)."""
        if self.proc is None:
            return
        try:
            os.kill(self.pid or self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        self.pid = None

    def _kill_leftover(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        self.pid = None

    def restart(self):
        self.stop()
        return self.start()

    def cleanup(self):
        self.stop()
        if self in SERVERS:
            SERVERS.remove(self)
        if not os.environ.get("PN_KEEP_TMP"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- inspection ------------------------------------------------------------------------------------------------

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self):
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sanitizer_reports(self):
        text = self.log_text() + "\n" + self.stdout_text()
        for p in self.extra_outputs:
            try:
                text += "\n" + p.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return sanitizer_reports(text)

    def log_errors(self):
        """Lines Prosody logged at level error."""
        return [line for line in self.log_text().splitlines() if re.search(r"\serror\s", line)]

    def native_db_path(self):
        """Where mod_storage_native keeps its database (option storage_native_path, default in data_path)."""
        p = self.global_options.get("storage_native_path", "prosody-native.sqlite")
        p = Path(p)
        return p if p.is_absolute() else self.data_dir / p

    def jid(self, user):
        return f"{user}@{DOMAIN}"

    def __repr__(self):
        return f"<ProsodyServer {self.name} c2s={self.c2s_port} tmp={self.tmp}>"


def run_lua(script, args=(), *, env=None, timeout=60, cwd=None):
    """Run a lua5.4 script (with the sanitizer preload if requested); returns CompletedProcess (text)."""
    res = subprocess.run([LUA, str(script), *map(str, args)], capture_output=True, text=True,
                         env=env or lua_env(), timeout=timeout, cwd=cwd)
    return res


# -- raw XMPP ----------------------------------------------------------------------------------------------------



class S2SProsody(ProsodyServer):
    """A harness server with s2s enabled on a chosen address/port and extra VirtualHosts."""

    def __init__(self, *, s2s_port, s2s_interface, vhosts, **kwargs):
        self.s2s_port = s2s_port
        self.s2s_interface = s2s_interface
        self.vhosts = list(vhosts)
        super().__init__(**kwargs)

    def config_text(self):
        saved = self.modules_disabled
        self.modules_disabled = [m for m in saved if m != "s2s"]
        try:
            text = super().config_text()
        finally:
            self.modules_disabled = saved
        interfaces = [self.s2s_interface] if isinstance(self.s2s_interface, str) else list(self.s2s_interface)
        extra = [f"s2s_ports = {{ {self.s2s_port} }}", f"s2s_interfaces = {lua_literal(interfaces)}"]
        head, sep, rest = text.partition('\nVirtualHost "localhost"')
        hosts = "".join(f'\nVirtualHost "{h}"\n' for h in self.vhosts)
        return head + "\n" + "\n".join(extra) + "\n" + hosts + sep + rest


class RawXMPP:
    """Minimal client-to-server XMPP over a plain socket, for protocol checks slixmpp would hide.

    c = RawXMPP(port); c.login("alice", "pass"); c.send("<iq .../>"); text = c.read_until(r"</iq>")
    """

    def __init__(self, port, host="127.0.0.1", domain=DOMAIN, timeout=10.0):
        self.domain = domain
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = ""
        self.jid = None

    def send(self, xml):
        self.sock.sendall(xml.encode() if isinstance(xml, str) else xml)

    def read_until(self, pattern, timeout=None):
        """Read until regex `pattern` matches the unread buffer; returns the text up to the end of the match and
        consumes it. Raises TimeoutError (with what was read) after `timeout` seconds."""
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = rx.search(self.buf)
            if m:
                out, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no match for {pattern!r}; read so far: {self.buf[-2000:]!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError(f"connection closed waiting for {pattern!r}; read: {self.buf[-2000:]!r}")
            self.buf += data.decode(errors="replace")

    def open_stream(self):
        self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' xmlns='jabber:client' "
                  "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        return self.read_until(r"</stream:features>")

    def login(self, user, password, resource="raw"):
        self.open_stream()
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        resp = self.read_until(r"<success[^>]*/>|<success.*?</success>|</failure>")
        if "<success" not in resp:
            raise HarnessError(f"SASL failed: {resp}")
        self.open_stream()
        self.send(f"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"<resource>{resource}</resource></bind></iq>")
        resp = self.read_until(r"<iq[^>]*id=['\"]bind1['\"].*?</iq>")
        m = re.search(r"<jid>([^<]+)</jid>", resp)
        if not m:
            raise HarnessError(f"bind failed: {resp}")
        self.jid = m.group(1)
        return self.jid

    def iq(self, iq_id, xml, timeout=None):
        """Send an <iq> (that carries id=iq_id) and return everything read up to and including its reply."""
        self.send(xml)
        return self.read_until(r"<iq[^>]*\bid=['\"]%s['\"][^>]*(?:/>|>.*?</iq>)" % re.escape(iq_id), timeout)

    def close(self):
        try:
            self.send("</stream:stream>")
        except OSError:
            pass
        self.sock.close()
