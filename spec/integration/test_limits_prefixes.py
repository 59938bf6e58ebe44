"""mod_native_limits with clients at many non-loopback addresses: per-address, IPv6 /64 and /48 and IPv4 /24 levels
in a real Prosody, with the loopback exemption left at its default (on).

Needs root: the fixture routes a random IPv4 /24 of 198.19.0.0/16 and a random IPv6 /40 of 2001:db8::/32 to the
loopback interface ("AnyIP" local routes), so a client can bind any address in them (IPv6 with IP_FREEBIND), and
removes the routes afterwards. Nothing leaves the machine. Each run picks prefixes no route uses yet.
"""

import os
import random
import socket
import subprocess
import time

import pytest

import harness
from test_limits_helpers import Anon, decisions, limits_server

IPV6_FREEBIND = 78


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def prefixes():
    if os.geteuid() != 0:
        pytest.fail("test_limits_prefixes needs root to add loopback routes (run the suite as root, as CI does)")
    used = _ip("-6", "route", "show", "table", "all").stdout + _ip("route", "show", "table", "all").stdout
    for _ in range(50):
        k = random.randrange(0x80, 0xf0)
        v4, v6 = f"198.19.{k}.0/24", f"2001:db8:{k:02x}00::/40"
        if v4.split("/")[0][:-1] not in used and f"2001:db8:{k:02x}00:" not in used:
            break
    server6 = f"2001:db8:{k:02x}00::1"
    _ip("route", "add", "local", v4, "dev", "lo")
    _ip("-6", "route", "add", "local", v6, "dev", "lo")
    _ip("-6", "addr", "add", f"{server6}/128", "dev", "lo", "nodad")
    try:
        yield {"k": k, "server4": f"198.19.{k}.1", "server6": server6, "v6": f"2001:db8:{k:02x}", "v4": f"198.19.{k}"}
    finally:
        _ip("-6", "addr", "del", f"{server6}/128", "dev", "lo", check=False)
        _ip("-6", "route", "del", "local", v6, "dev", "lo", check=False)
        _ip("route", "del", "local", v4, "dev", "lo", check=False)


class From(Anon):
    """An anonymous raw client connecting from a chosen source address."""

    def __init__(self, srv, source, server):
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((server, srv.c2s_port))
        self.domain = harness.DOMAIN
        self.timeout = 10.0
        self.sock = sock
        self.buf = ""
        self.jid = None


def login_from(srv, source, server):
    c = From(srv, source, server)
    kind, text = c.login()
    c.close()
    if kind == "ok":
        return "ok"
    return "refused" if "Too many logins" in text else f"{kind}: {text[-300:]}"


def test_address_and_prefix_levels_with_loopback_exempt(prosody_factory, prefixes):
    p = prefixes
    srv = limits_server(prosody_factory, exempt_loopback=True, global_options={
        "interfaces": ["127.0.0.1", p["server4"], p["server6"]],
    }, host_options={
        "native_limits_logins": {"address": "2/10min", "ipv6/64": "3/10min", "ipv6/48": "4/10min",
                                 "ipv4/24": "3/10min", "global": False},
        "native_limits_connections": False,
        "native_limits_max_delay": 0,
    })
    s6, s4, v6, v4 = p["server6"], p["server4"], p["v6"], p["v4"]
    steps = [
        # IPv6: the address level, then its /64, then its /48; another /48 is untouched
        (f"{v6}01:1::1", "ok"), (f"{v6}01:1::1", "ok"), (f"{v6}01:1::1", "refused"),
        (f"{v6}01:1::2", "ok"),       # third login in the /64
        (f"{v6}01:1::3", "refused"),  # the /64 is spent
        (f"{v6}01:2::1", "ok"),       # fourth in the /48, from another /64
        (f"{v6}01:3::1", "refused"),  # the /48 is spent
        (f"{v6}02::1", "ok"),         # another /48
        # IPv4: the address, then its /24
        (f"{v4}.10", "ok"), (f"{v4}.10", "ok"), (f"{v4}.10", "refused"),
        (f"{v4}.11", "ok"), (f"{v4}.12", "refused"),
    ]
    got = [(src, login_from(srv, src, s6 if ":" in src else s4)) for src, _ in steps]
    assert got == steps
    assert decisions(srv, "logins", "refuse") == 5
    # loopback stays exempt (default) while everything else is limited
    for _ in range(4):
        c = Anon(srv)
        assert c.login()[0] == "ok"
        c.close()
    assert decisions(srv, "logins", "refuse") == 5
    show = srv.shell(f'limits:show("{v6}01::/48")')
    assert f"{v6}01::/48" in show and "0.0 of 4 left" in show, show


def test_three_banned_addresses_ban_their_64(prosody_factory, prefixes):
    p = prefixes
    srv = limits_server(prosody_factory, exempt_loopback=True, global_options={
        "interfaces": ["127.0.0.1", p["server4"], p["server6"]],
    }, host_options={
        "native_limits_logins": {"address": "1/10min", "ipv6/64": False, "ipv6/48": False, "ipv4/24": False,
                                 "global": False},
        "native_limits_connections": False,
        "native_limits_max_delay": 0,
        "native_limits_close_after": 3,
    })
    s6, v6 = p["server6"], p["v6"]
    bystander = From(srv, f"{v6}05:7::50", s6)  # an open session in the /64 that never misbehaves
    assert bystander.login()[0] == "ok"
    elsewhere = From(srv, f"{v6}05:8::50", s6)  # another /64
    assert elsewhere.login()[0] == "ok"
    for host in (1, 2, 3):
        src = f"{v6}05:7::{host}"
        assert login_from(srv, src, s6) == "ok"
        c = From(srv, src, s6)
        assert c.open()[0] == "ok"
        assert c.auth()[0] == "failure" and c.auth()[0] == "failure"
        kind, text = c.auth()  # the third refusal closes the stream and bans the address
        assert kind == "stream-error", text
        c.close()
    # the /64's ban closed the bystander's open session, not the one in the other /64
    kind, text = bystander._outcome(r"(?!)")
    assert kind == "stream-error" and "<policy-violation" in text and "try again in 300 seconds" in text, text
    elsewhere.send("<iq type='get' id='alive' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert "type='result'" in elsewhere.read_until(r"<iq[^>]*id=['\"]alive['\"][^>]*/?>")
    # a fourth, fresh address of the same /64 is refused at stream open: the /64 itself is banned
    c = From(srv, f"{v6}05:7::99", s6)
    kind, text = c.open()
    assert kind == "stream-error" and "try again in 300 seconds" in text, text
    c.close()
    # another /64 of the same /48 is not
    assert login_from(srv, f"{v6}05:8::1", s6) == "ok"
    top = srv.shell("limits:top(10)")
    assert f"{v6}05:7::/64" in top, top


def test_addresses_that_connect_once_leave_nothing_behind(prosody_factory, prefixes):
    """The shim's per-address sets live only as long as a session in them (no sweep to wait for)."""
    p = prefixes
    srv = limits_server(prosody_factory, global_options={"interfaces": ["127.0.0.1", p["server6"]], "c2s_timeout": 1},
                        host_options={"native_limits_connections": {"address": "10/s burst 10", "ipv6/64": False,
                                                                    "ipv6/48": False, "ipv4/24": False, "global": False},
                                      "native_limits_logins": False})

    def connect_once(first, n):
        for i in range(first, first + n):
            c = From(srv, f"{p['v6']}03:{i:x}::1", p["server6"])  # one /64 each
            assert c.open()[0] == "ok"
            c.close()

    def heap_kib():
        time.sleep(1.5)  # past c2s_timeout, whose timer holds a closed unauthenticated session until it fires
        return float(srv.shell_result("collectgarbage(); collectgarbage(); return collectgarbage('count')"))

    connect_once(0, 200)  # warm-up: whatever the server keeps once
    before = heap_kib()
    connect_once(200, 1000)
    grown = heap_kib() - before
    # each address used to leave ~0.3 KiB of empty sets until a 300 s sweep (+400 KiB here); what is left now is
    # the server's own (+110 KiB)
    print(f"heap grew {grown:.1f} KiB over 1000 addresses")
    assert grown < 250, f"{grown:.0f} KiB more after 1000 addresses"
