"""Helpers for the mod_native_limits integration specs (imported by test_limits_*.py; holds no tests).

The harness's VirtualHost "localhost" becomes the anonymous host with mod_native_limits; the MUC component
"conference.localhost" may load it too. Clients connect from 127.0.0.1, so every spec turns the loopback exemption
off (native_limits_exempt_loopback = false) unless it tests that exemption. Time is simulated: advance() moves the
limiter's clock forward through the admin shell, so no spec waits for a rate to refill or a ban to expire.
"""

import base64
import os
import re
import socket
import struct
import threading
import time
import urllib.request

import harness

ANON_HOST = harness.DOMAIN
MUC_HOST = harness.MUC_DOMAIN
STREAM_ERROR = r"</stream:error>"


def limits_server(factory, *, host_options=None, muc_options=None, global_options=None, modules=(), muc=False,
                  exempt_loopback=False, modules_disabled=(), extra_config=""):
    """Start a Prosody whose localhost is anonymous with mod_native_limits (and its MUC component too if muc)."""
    g = {"statistics": "internal", "statistics_interval": "manual"}
    g.update(global_options or {})
    h = {"authentication": "anonymous", "native_limits_exempt_loopback": exempt_loopback,
         "native_limits_log_interval": 1}
    h.update(host_options or {})
    m = {"native_limits_exempt_loopback": exempt_loopback}
    m.update(muc_options or {})
    srv = factory(global_options=g, host_options=h, muc_options=m, modules=["http_openmetrics", *modules],
                  host_modules=["native_limits"], muc_modules=["native_limits"] if muc else (),
                  modules_disabled=list(modules_disabled), extra_config=extra_config)
    # the harness waits for the c2s port; the HTTP port (metrics, WebSocket, BOSH) may open a moment later
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", srv.http_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    srv.shell(">1")  # and the admin shell answers once every host's modules have loaded
    return srv


def advance(srv, seconds, host=ANON_HOST):
    """Move the limiter clock of `host` forward by `seconds` (simulated time)."""
    return float(srv.shell_result(
        f"prosody.hosts[{harness.lua_string(host)}].modules.native_limits.module.limiter:advance({seconds})"))


def metrics(srv):
    """The OpenMetrics scrape as {(name, ((label, value), ...)): number}."""
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/metrics", headers={"Host": ANON_HOST})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def decisions(srv, rule, action, host=ANON_HOST, mode="enforce"):
    labels = tuple(sorted({"host": host, "rule": rule, "action": action, "mode": mode}.items()))
    return metrics(srv).get(("prosody_mod_native_limits__decisions_total", labels), 0)


def all_decisions(srv, host=ANON_HOST):
    """{(rule, action, mode): count} of every non-zero decision counter of `host`."""
    out = {}
    for (name, labels), v in metrics(srv).items():
        d = dict(labels)
        if name == "prosody_mod_native_limits__decisions_total" and d.get("host") == host and v:
            out[(d["rule"], d["action"], d["mode"])] = v
    return out


class Anon(harness.RawXMPP):
    """A raw client of the anonymous host. Results are strings, so specs can assert each step."""

    def __init__(self, srv, timeout=10.0):
        super().__init__(srv.c2s_port, domain=ANON_HOST, timeout=timeout)

    def _outcome(self, pattern):
        try:
            text = self.read_until(pattern + "|" + STREAM_ERROR)
        except ConnectionError as e:
            return "closed", str(e)
        if "</stream:error>" in text:
            return "stream-error", text
        return "ok", text

    def open(self):
        """-> ("ok", features) | ("stream-error", text) | ("closed", text)"""
        self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' xmlns='jabber:client' "
                  "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        return self._outcome(r"</stream:features>")

    def auth(self):
        """SASL ANONYMOUS -> ("success" | "failure" | "stream-error" | "closed", text)"""
        self.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
        kind, text = self._outcome(r"<success[^>]*/>|<success.*?</success>|</failure>")
        if kind == "ok":
            kind = "success" if "<success" in text else "failure"
        return kind, text

    def bind(self):
        """After auth success: restart the stream and bind -> ("ok", jid) | ("error", iq) | (kind, text)"""
        kind, text = self.open()
        if kind != "ok":
            return kind, text
        self.send("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        kind, text = self._outcome(r"<iq[^>]*id=['\"]bind1['\"].*?</iq>")
        if kind != "ok":
            return kind, text
        m = re.search(r"<jid>([^<]+)</jid>", text)
        if m:
            self.jid = m.group(1)
            return "ok", self.jid
        return "error", text

    def login(self):
        """open + auth + bind; -> the first step's outcome that was not success."""
        kind, text = self.open()
        if kind != "ok":
            return kind, text
        kind, text = self.auth()
        if kind != "success":
            return kind, text
        return self.bind()


def ping(c, n, to=ANON_HOST):
    """A ping from the raw client c with id n -> "ok" | "refused" (by a stanza limit) | the reply as it came."""
    c.send(f"<iq type='get' id='ping{n}' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>")
    text = c.read_until(r"<iq[^>]*id=['\"]ping%d['\"][^>]*(?:/>|>.*?</iq>)" % n)
    if "type='result'" in text:
        return "ok"
    if "<policy-violation" in text and "You are sending too fast" in text:
        return "refused"
    return text


def reconfigure(srv, pattern, replacement):
    """Rewrites srv's config file (re.sub, which must change something) and reloads it; -> the previous text."""
    cfg = srv.config_path.read_text()
    new = re.sub(pattern, replacement, cfg)
    assert new != cfg, pattern
    srv.config_path.write_text(new)
    srv.shell("config:reload()")
    return cfg


def expect_stream_error(text, condition="policy-violation", contains=None):
    assert f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in text, text
    if contains:
        assert contains in text, text


# -- WebSocket (RFC 7395) over a raw socket, so a spec can send X-Forwarded-For as a reverse proxy would ----------


class WebSocketXMPP:
    def __init__(self, srv, xff=None, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        headers = ["GET /xmpp-websocket HTTP/1.1", f"Host: {ANON_HOST}", "Upgrade: websocket", "Connection: Upgrade",
                   f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: xmpp"]
        if xff:
            headers.append(f"X-Forwarded-For: {xff}")
        self.sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        resp = b""
        while b"\r\n\r\n" not in resp:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"no upgrade: {resp!r}")
            resp += chunk
        head, self.rest = resp.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"no upgrade: {head!r}")

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            hdr = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.sock.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, n):
        while len(self.rest) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.rest += chunk
        out, self.rest = self.rest[:n], self.rest[n:]
        return out

    def recv(self):
        """One text frame's payload; None for a close frame."""
        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7f
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            op = b1 & 0x0f
            if op == 0x8:
                return None
            if op in (0x1, 0x2):
                return payload.decode()

    def recv_until(self, pattern):
        got = ""
        while True:
            frame = self.recv()
            if frame is None:
                return got
            got += frame
            if re.search(pattern, got, re.S):
                return got

    def anon_login(self):
        """-> "success" | "failure" | "stream-error" plus the text read."""
        self.send(f"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{ANON_HOST}' version='1.0'/>")
        text = self.recv_until(r"</stream:features>|<features.*?</features>|</stream:error>|<close")
        if "error" in text and "features" not in text:
            return "stream-error", text
        self.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
        text = self.recv_until(r"<success[^>]*/>|<success.*?</success>|</failure>|</stream:error>")
        if "<success" in text:
            return "success", text
        if "</failure>" in text:
            return "failure", text
        return "stream-error", text

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def ws_login_bind(srv, xff):
    """A WebSocket client behind the proxy, logged in anonymously and bound."""
    ws = WebSocketXMPP(srv, xff=xff)
    assert ws.anon_login()[0] == "success"
    ws.send(f"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='{ANON_HOST}' version='1.0'/>")
    ws.recv_until(r"</stream:features>|</features>")
    ws.send("<iq xmlns='jabber:client' type='set' id='w1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    assert "<jid>" in ws.recv_until(r"<jid>.*?</iq>")
    return ws


# -- BOSH (XEP-0124/0206), through 127.0.0.1 acting as the trusted proxy ------------------------------------------

BOSH_NS = "http://jabber.org/protocol/httpbind"


def bosh(srv, body, xff=None, timeout=15):
    """One BOSH request; -> the response body."""
    headers = {"Host": ANON_HOST, "Content-Type": "text/xml; charset=utf-8"}
    if xff:
        headers["X-Forwarded-For"] = xff
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/http-bind", data=body.encode(), headers=headers)
    return urllib.request.urlopen(req, timeout=timeout).read().decode()


def bosh_session_request(rid, wait=20):
    return (f"<body rid='{rid}' to='{ANON_HOST}' xml:lang='en' wait='{wait}' hold='1' ver='1.6' "
            f"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh' xmlns='{BOSH_NS}'/>")


class Bosh:
    """A BOSH client behind the proxy, logged in anonymously and bound."""

    def __init__(self, srv, xff):
        self.srv, self.xff, self.rid = srv, xff, 5000
        text = self.req(bosh_session_request(self.rid))
        self.sid = re.search(r"sid=['\"]([^'\"]+)", text).group(1)
        text = self.body("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
        assert "<success" in text, text
        text = self.req(f"<body rid='{self.next_rid()}' sid='{self.sid}' xmpp:restart='true' "
                        f"xmlns:xmpp='urn:xmpp:xbosh' xmlns='{BOSH_NS}'/>")
        text = self.body("<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        assert "<jid>" in text, text

    def next_rid(self):
        self.rid += 1
        return self.rid

    def req(self, body):
        return bosh(self.srv, body, self.xff, timeout=30)

    def body(self, inner=""):
        return self.req(f"<body rid='{self.next_rid()}' sid='{self.sid}' xmlns='{BOSH_NS}'>{inner}</body>")

    def body_until(self, inner, pattern):
        """Sends `inner`, then polls until the responses so far match `pattern` or the session ends."""
        text = self.body(inner)
        while not re.search(pattern, text, re.S) and "type='terminate'" not in text:
            text += self.body()
        return text

    def hold(self):
        """An empty long-poll request in a thread; .result gets its answer."""
        self.result = None

        def run():
            self.result = self.req(f"<body rid='{self.next_rid()}' sid='{self.sid}' xmlns='{BOSH_NS}'/>")
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t
