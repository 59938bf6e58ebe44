"""mod_native_limits acceptance scenarios (issue 7) with real clients, at the default limits.

Clients all come from 127.0.0.1, which plays one IPv4 address (a NAT): the loopback exemption is turned off and
nothing else is configured. Minutes pass in simulated time (advance()), never on the wall clock.
"""

import asyncio
import re

import slixmpp

import xmpp
from test_limits_helpers import (ANON_HOST, BOSH_NS, MUC_HOST, Anon, WebSocketXMPP, advance, all_decisions, bosh,
                                 bosh_session_request, decisions, limits_server, metrics)

ROOM = f"support@{MUC_HOST}"


class AnonClient(slixmpp.ClientXMPP):
    def __init__(self):
        super().__init__(ANON_HOST, "")
        for p in ("xep_0030", "xep_0045", "xep_0199"):
            self.register_plugin(p)
        self.started = asyncio.get_running_loop().create_future()
        self.groupchat = asyncio.Queue()
        self.add_event_handler("session_start", lambda _: self.started.done() or self.started.set_result(True))
        self.add_event_handler("failed_auth", lambda _: self.started.done()
                               or self.started.set_exception(RuntimeError("auth failed")))
        self.add_event_handler("groupchat_message", lambda m: self.groupchat.put_nowait(m))


async def arrive(srv, i):
    """One webchat visitor: anonymous login, join the support room, say hello and see it echoed."""
    c = AnonClient()
    c.connect(address=("127.0.0.1", srv.c2s_port), disable_starttls=True, force_starttls=False)
    await asyncio.wait_for(c.started, 15)
    c.send_presence()
    await asyncio.wait_for(c["xep_0045"].join_muc_wait(ROOM, f"visitor-{i}", maxstanzas=0), 15)
    body = f"hello from visitor {i}"
    c.send_message(mto=ROOM, mbody=body, mtype="groupchat")
    while True:
        m = await asyncio.wait_for(c.groupchat.get(), 15)
        if m["body"] == body:
            break
    return c


def test_twenty_users_behind_one_nat_within_two_minutes_are_never_refused(prosody_factory):
    srv = limits_server(prosody_factory, muc=True, muc_options={"muc_room_locking": False})

    async def scenario():
        clients = []
        # 20 visitors in two minutes: a crowd of 8 at once, then the rest in small groups
        for group, pause in ((8, 20), (4, 30), (4, 30), (4, 0)):
            first = len(clients)
            clients += await asyncio.gather(*(arrive(srv, first + i) for i in range(group)))
            if pause:
                await asyncio.get_running_loop().run_in_executor(None, advance, srv, pause)
        assert len(clients) == 20
        assert len({c.boundjid.full for c in clients}) == 20
        for c in clients:
            c.disconnect()
        await asyncio.sleep(0.2)

    xmpp.run(scenario(), timeout=120)
    assert all_decisions(srv) == {}
    assert all_decisions(srv, MUC_HOST) == {}
    # the limits were consulted (127.0.0.1 is not exempt): the address's login budget was drawn on
    show = srv.shell('limits:show("127.0.0.1", "localhost")')
    m = re.search(r"logins\s+127\.0\.0\.1\s+([\d.]+) of 20 left", show)
    assert m and float(m.group(1)) < 20, show
    assert re.search(r"muc_joins\s+127\.0\.0\.1\s+[\d.]+ of 25 left", srv.shell('limits:show("127.0.0.1", "conference.localhost")'))


def test_reconnect_loop_is_slowed_backed_off_and_recovers(prosody_factory):
    srv = limits_server(prosody_factory)
    outcomes = []
    for _ in range(60):  # five reconnects per (simulated) second for twelve seconds
        c = Anon(srv, timeout=15)
        kind, text = c.login()
        outcomes.append(kind if kind == "ok" else ("banned" if "violations from your network" in text else kind))
        c.close()
        advance(srv, 0.2)
    assert outcomes[:20] == ["ok"] * 20, outcomes
    # slowed first (replies delayed within native_limits_max_delay), refused only after that
    assert decisions(srv, "logins", "delay") + decisions(srv, "connections", "delay") >= 1
    first_refusal = next(i for i, k in enumerate(outcomes) if k != "ok")
    assert first_refusal > 20, outcomes
    assert "banned" in outcomes, outcomes
    # backoff, not a day-long ban: the first ban is the initial 300 s
    top = srv.shell('limits:top(5, "localhost")')
    m = re.search(r"127\.0\.0\.1\s+level (\d+) .*banned (\d+)s", top)
    assert m and m.group(1) == "1" and int(m.group(2)) <= 300, top
    # the loop stops; five minutes later the client gets in again
    advance(srv, 300)
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.close()


def test_websocket_uses_the_forwarded_address_and_never_limits_the_proxy(prosody_factory):
    srv = limits_server(prosody_factory, modules=["websocket"], host_options={
        "native_limits_logins": {"address": "2/10min", "ipv4/24": False, "ipv6/64": False, "ipv6/48": False,
                                 "global": False},
        "native_limits_connections": False,
    })
    results = []
    for _ in range(3):
        ws = WebSocketXMPP(srv, xff="198.51.100.7")
        results.append(ws.anon_login())
        ws.close()
    assert [k for k, _ in results] == ["success", "success", "failure"], results
    assert "Too many logins from your network" in results[2][1]
    ws = WebSocketXMPP(srv, xff="198.51.100.8")  # another client behind the same proxy
    assert ws.anon_login()[0] == "success"
    ws.close()
    show = srv.shell('limits:show("198.51.100.7")')
    assert re.search(r"logins\s+198\.51\.100\.7\s+0\.0 of 2 left", show), show
    # the proxy sends no X-Forwarded-For: the proxy's own address is never limited as one client, and we warn
    for _ in range(4):
        ws = WebSocketXMPP(srv)
        assert ws.anon_login()[0] == "success"
        ws.close()
    assert "the proxy sends no X-Forwarded-For" in srv.log_text()
    exempt = {dict(labels).get("reason"): v for (name, labels), v in metrics(srv).items()
              if name == "prosody_mod_native_limits__exempt_sessions_total"}
    assert exempt.get("proxy", 0) >= 4, exempt


def bosh_anon_login(srv, xff):
    text = bosh(srv, bosh_session_request(1000, wait=5), xff)
    sid = re.search(r"sid=['\"]([^'\"]+)", text)
    if not sid:
        return "refused", text
    text = bosh(srv, f"<body rid='1001' sid='{sid.group(1)}' xmlns='{BOSH_NS}'>"
                     "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/></body>", xff)
    if "<success" in text:
        return "success", text
    if "</failure>" in text:
        return "failure", text
    return "other", text


def test_bosh_uses_the_forwarded_address(prosody_factory):
    srv = limits_server(prosody_factory, modules=["bosh"], host_options={
        "native_limits_logins": {"address": "1/10min", "ipv4/24": False, "ipv6/64": False, "ipv6/48": False,
                                 "global": False},
        "native_limits_connections": False,
    })
    assert bosh_anon_login(srv, "203.0.113.5")[0] == "success"
    kind, text = bosh_anon_login(srv, "203.0.113.5")
    assert kind == "failure" and "<temporary-auth-failure/>" in text, text
    assert bosh_anon_login(srv, "203.0.113.6")[0] == "success"
    assert decisions(srv, "logins", "refuse") == 1
    assert "203.0.113.5" in srv.shell('limits:top()')
