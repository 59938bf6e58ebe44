"""mod_native_limits: a new ban closes the open sessions it covers, whatever the transport (c2s TCP, WebSocket, BOSH,
unauthenticated, hibernated stream management), and only those. Clients at non-loopback addresses: TCP clients bind
addresses of a loopback-routed /24 (the fixture of test_limits_prefixes, needs root); WebSocket and BOSH clients come
through 127.0.0.1 acting as a trusted reverse proxy with X-Forwarded-For. The loopback exemption stays on (default).
"""

import base64
import re
import time

import harness
import pytest

from test_limits_helpers import (ANON_HOST, MUC_HOST, Anon, Bosh, all_decisions, expect_stream_error,
                                 limits_server, metrics, ws_login_bind)
from test_limits_prefixes import From, prefixes  # noqa: F401  (prefixes is a fixture)

NS_MUC = "http://jabber.org/protocol/muc"
OFF = {"address": False, "ipv6/64": False, "ipv6/48": False, "ipv4/24": False, "global": False}


def ban_closed(srv, host=ANON_HOST):
    """{(transport, mode): n} of the ban_closed_sessions counter."""
    out = {}
    for (name, labels), v in metrics(srv).items():
        d = dict(labels)
        if name == "prosody_mod_native_limits__ban_closed_sessions_total" and d.get("host") == host and v:
            out[(d["transport"], d["mode"])] = v
    return out


def prefix_server(prosody_factory, prefixes, **options):  # noqa: F811
    """limits_server listening on the test prefix's server address too, loopback exempt."""
    return limits_server(prosody_factory, exempt_loopback=True,
                         global_options={"interfaces": ["127.0.0.1", prefixes["server4"]]}, **options)


def hibernate(c, srv):
    c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    c.previd = re.search(r"<enabled[^>]*\bid=['\"]([^'\"]+)", c.read_until(r"<enabled[^>]*/?>")).group(1)
    c.sock.close()
    probe = ("(function() local s = prosody.full_sessions[" + harness.lua_string(c.jid) + "] "
             "if not s then return 'gone' end if s.hibernating and not s.conn then return 'hibernating' end "
             "return 'online' end)()")
    deadline = time.monotonic() + 15
    while srv.shell_result(probe) != "hibernating":
        assert time.monotonic() < deadline, "the session never hibernated"
        time.sleep(0.1)
    return probe


def alive(c, n):
    """A bound raw client still answers a ping."""
    c.send(f"<iq type='get' id='p{n}' to='{ANON_HOST}'><ping xmlns='urn:xmpp:ping'/></iq>")
    return "type='result'" in c.read_until(r"<iq[^>]*id=['\"]p%d['\"][^>]*/?>" % n)


def test_shell_ban_of_a_prefix_closes_every_transport_and_only_inside_it(prosody_factory, prefixes):  # noqa: F811
    p = prefixes
    v4, s4 = p["v4"], p["server4"]
    srv = limits_server(prosody_factory, exempt_loopback=True, modules=["websocket", "bosh"],
                        global_options={"interfaces": ["127.0.0.1", s4]},
                        host_options={"smacks_hibernation_time": 600, "native_limits_connections": False})
    bound = From(srv, f"{v4}.10", s4)
    assert bound.login()[0] == "ok"
    sleeper = From(srv, f"{v4}.11", s4)
    assert sleeper.login()[0] == "ok"
    probe = hibernate(sleeper, srv)
    unauth = From(srv, f"{v4}.12", s4)
    assert unauth.open()[0] == "ok"
    ws = ws_login_bind(srv, f"{v4}.13")
    bosh_client = Bosh(srv, f"{v4}.14")
    held = bosh_client.hold()
    time.sleep(0.3)  # the long poll is held by the server
    other = From(srv, f"{v4}.10", s4)  # the same address: closed too
    assert other.login()[0] == "ok"
    outside = Anon(srv)  # loopback: outside the banned prefix, and exempt anyway
    assert outside.login()[0] == "ok"
    assert ban_closed(srv) == {}

    assert f"Banned {v4}.0/24 on 1 host(s)" in srv.shell(f'limits:ban("{v4}.0/24", "1h")')

    for c in (bound, other, unauth):
        kind, text = c._outcome(r"(?!)")
        assert kind == "stream-error", (kind, text)
        expect_stream_error(text, contains="Too many violations from your network; try again in 3600 seconds")
    text = ws.recv_until(r"</stream:error>")
    expect_stream_error(text, contains="try again in 3600 seconds")
    held.join(15)
    r = bosh_client.result
    assert r and "type='terminate'" in r and "<policy-violation" in r and "try again in 3600 seconds" in r, r
    deadline = time.monotonic() + 10
    while srv.shell_result(probe) == "hibernating":
        assert time.monotonic() < deadline, "the hibernated session survived the ban"
        time.sleep(0.1)
    assert alive(outside, 1)
    got = ban_closed(srv)
    assert got == {("tcp", "enforce"): 3, ("hibernated", "enforce"): 1, ("websocket", "enforce"): 1,
                   ("bosh", "enforce"): 1}, got
    # a new stream from the prefix is refused at stream open, as before
    c = From(srv, f"{v4}.99", s4)
    kind, text = c.open()
    assert kind == "stream-error" and "try again in" in text, text
    for c in (c, outside, bound, other, unauth):
        c.close()
    ws.close()


def test_escalation_to_a_ban_closes_the_address_other_sessions(prosody_factory, prefixes):  # noqa: F811
    v4, s4 = prefixes["v4"], prefixes["server4"]
    srv = prefix_server(prosody_factory, prefixes,
                        host_options={"native_limits_logins": dict(OFF, address="2/10min"),
                                      "native_limits_connections": False, "native_limits_max_delay": 0,
                                      "native_limits_close_after": 3})
    first = From(srv, f"{v4}.20", s4)
    assert first.login()[0] == "ok"
    second = From(srv, f"{v4}.20", s4)
    assert second.login()[0] == "ok"
    neighbour = From(srv, f"{v4}.21", s4)  # same /24, not banned
    assert neighbour.login()[0] == "ok"
    abuser = From(srv, f"{v4}.20", s4)
    assert abuser.open()[0] == "ok"
    assert abuser.auth()[0] == "failure" and abuser.auth()[0] == "failure"
    kind, text = abuser.auth()  # third refusal: close + third strike = ban
    assert kind == "stream-error", text
    assert all_decisions(srv).get(("logins", "ban", "enforce")) == 1
    for c in (first, second):
        kind, text = c._outcome(r"(?!)")
        assert kind == "stream-error", (kind, text)
        expect_stream_error(text, contains="try again in 300 seconds")
    assert alive(neighbour, 2)
    assert ban_closed(srv) == {("tcp", "enforce"): 2}
    for c in (first, second, neighbour, abuser):
        c.close()


def test_dry_run_ban_counts_but_closes_nothing(prosody_factory, prefixes):  # noqa: F811
    v4, s4 = prefixes["v4"], prefixes["server4"]
    srv = prefix_server(prosody_factory, prefixes, host_options={"native_limits_dry_run": True})
    c = From(srv, f"{v4}.30", s4)
    assert c.login()[0] == "ok"
    srv.shell(f'limits:ban("{v4}.30", 600)')
    deadline = time.monotonic() + 10
    while ban_closed(srv) != {("tcp", "dry_run"): 1}:
        assert time.monotonic() < deadline, ban_closed(srv)
        time.sleep(0.1)
    assert alive(c, 3)
    assert f"[dry run] Would have closed 1 open session(s) of {v4}.30: banned" in srv.log_text()
    c.close()


def join(c, room, nick):
    c.send(f"<presence to='{room}@{MUC_HOST}/{nick}'><x xmlns='{NS_MUC}'/></presence>")
    text = c.read_until(r"<presence[^>]*from=['\"]%s@%s/%s['\"][^>]*>.*?</presence>" % (room, MUC_HOST, re.escape(nick)))
    return ("error" if "type='error'" in text else "ok"), text


def test_moderator_ban_closes_the_occupant_sessions(prosody_factory, prefixes):  # noqa: F811
    p = prefixes
    v4, s4 = p["v4"], p["server4"]
    srv = limits_server(prosody_factory, exempt_loopback=True, muc=True,
                        global_options={"interfaces": ["127.0.0.1", s4]},
                        muc_options={"muc_room_locking": False, "native_limits_muc_creations": False})
    owner = From(srv, f"{v4}.40", s4)
    assert owner.login()[0] == "ok"
    assert join(owner, "help", "owner")[0] == "ok"
    troll = From(srv, f"{v4}.41", s4)
    assert troll.login()[0] == "ok"
    assert join(troll, "help", "troll")[0] == "ok"
    tab2 = From(srv, f"{v4}.41", s4)  # the troll's second tab, in the room too
    assert tab2.login()[0] == "ok"
    assert join(tab2, "help", "troll2")[0] == "ok"
    owner.send(f"<iq type='set' id='ban1' to='help@{MUC_HOST}'><query xmlns='{NS_MUC}#admin'>"
               f"<item affiliation='outcast' jid='{troll.jid.split('/')[0]}'/></query></iq>")
    owner.read_until(r"<iq[^>]*id=['\"]ban1['\"]")
    kind, text = tab2._outcome(r"(?!)")
    assert kind == "stream-error", (kind, text)
    expect_stream_error(text, contains="Too many violations from your network")
    kind, text = troll._outcome(r"(?!)")
    assert kind == "stream-error", (kind, text)
    assert alive(owner, 4)
    assert ban_closed(srv, host=MUC_HOST) == {("tcp", "enforce"): 2}
    for c in (owner, troll, tab2):
        c.close()


def test_bans_of_one_tick_close_their_sessions_together(prosody_factory, prefixes):  # noqa: F811
    v4, s4 = prefixes["v4"], prefixes["server4"]
    srv = prefix_server(prosody_factory, prefixes, host_options={"native_limits_connections": False})
    a, b, c = (From(srv, f"{v4}.{n}", s4) for n in (70, 71, 72))
    for x in (a, b, c):
        assert x.login()[0] == "ok"
    # three bans decided in one event-loop tick (one shell line): two addresses and a prefix holding the third
    srv.shell(f'limits:ban("{v4}.70", 60) limits:ban("{v4}.71", 60) limits:ban("{v4}.72/31", 60)')
    for x in (a, b, c):
        kind, text = x._outcome(r"(?!)")
        assert kind == "stream-error" and "try again in 60 seconds" in text, (kind, text)
    assert f"Closed 3 open session(s) of {v4}.70, {v4}.71, {v4}.72/31: banned" in srv.log_text()
    assert ban_closed(srv) == {("tcp", "enforce"): 3}


def password_login(c, user, password, resource):
    harness.RawXMPP.login(c, user, password, resource)
    return c


@pytest.mark.parametrize("smacks", ["smacks", "native_smacks"])
def test_a_ban_closes_a_resumed_session_at_its_new_address(prosody_factory, prefixes, smacks):  # noqa: F811
    """The ban finds the resumed session by the address it resumed from, and closes it for good: the
    connection's temporary session is not what it closes (that would only send it back to hibernation)."""
    v4, s4 = prefixes["v4"], prefixes["server4"]
    srv = prefix_server(prosody_factory, prefixes, modules=[smacks],
                        modules_disabled=["smacks"] if smacks != "smacks" else (),
                        host_options={"authentication": "internal_plain", "smacks_hibernation_time": 600,
                                      "native_limits_connections": False})
    srv.register("alice", "pw")
    first = password_login(From(srv, f"{v4}.20", s4), "alice", "pw", "phone")
    probe = hibernate(first, srv)

    second = From(srv, f"{v4}.21", s4)
    second.open_stream()
    token = base64.b64encode(b"\0alice\0pw").decode()
    second.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    assert "<success" in second.read_until(r"<success[^>]*/>|<success.*?</success>|</failure>")
    second.open_stream()
    second.send(f"<resume xmlns='urn:xmpp:sm:3' previd='{first.previd}' h='0'/>")
    assert "<resumed" in second.read_until(r"<resumed[^>]*/>|</failed>")
    assert srv.shell_result(probe) == "online"

    assert f"Banned {v4}.21 on 1 host(s)" in srv.shell(f'limits:ban("{v4}.21", "1h")')
    kind, text = second._outcome(r"(?!)")
    assert kind == "stream-error", (kind, text)
    expect_stream_error(text, contains="try again in 3600 seconds")
    deadline = time.monotonic() + 10
    while srv.shell_result(probe) != "gone":
        assert time.monotonic() < deadline, "the resumed session was not closed by the ban (it hibernated again?)"
        time.sleep(0.1)
    assert ban_closed(srv) == {("tcp", "enforce"): 1}


def test_a_ban_after_a_module_reload_still_closes_the_sessions(prosody_factory, prefixes):  # noqa: F811
    v4, s4 = prefixes["v4"], prefixes["server4"]
    srv = prefix_server(prosody_factory, prefixes, host_options={"native_limits_connections": False})
    bound = From(srv, f"{v4}.30", s4)
    assert bound.login()[0] == "ok"
    srv.shell(f'module:reload("native_limits", "{ANON_HOST}")')
    assert f"Banned {v4}.30 on 1 host(s)" in srv.shell(f'limits:ban("{v4}.30", "1h")')
    kind, text = bound._outcome(r"(?!)")
    assert kind == "stream-error", (kind, text)
    expect_stream_error(text, contains="try again in 3600 seconds")
