"""What happens to unacknowledged stanzas when a hibernating session of mod_native_smacks expires.

Real Prosody, real clients (slixmpp, with its XEP-0198 support): a "phone" enables stream management with resumption
and loses its connection (abort, no </stream:stream>); a sender writes to it; the hibernation (2 s) runs out. Every
stanza is counted: the outcome the module reports for it (`smacks-redirect` events, recorded in the server through the
admin shell), the errors the sender gets, what other devices receive and what ends up in offline storage and MAM.
"""

import asyncio
import itertools
import time
import xml.etree.ElementTree as ET

import pytest
from slixmpp.exceptions import IqError

import harness
from xmpp import connect, mam_all, run

HIBERNATION = 2
SMACKS = {"modules": ["native_smacks"], "modules_disabled": ["smacks"]}
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_HINTS = "urn:xmpp:hints"
NS_DELAY = "urn:xmpp:delay"
NS_CARBONS = "urn:xmpp:carbons:2"

_names = itertools.count(1)


@pytest.fixture(autouse=True)
def no_policy_errors(request):
    """Every server of a test: the expiry policy never failed and every queued stanza could be rebuilt."""
    yield
    for srv in list(harness.SERVERS) + list(getattr(request.node, "_pn_stopped_servers", [])):
        log = srv.log_text()
        for marker in ("Expiry policy failed", "Could not rebuild a queued stanza"):
            assert marker not in log, f"{srv.name}: {marker}"


def smacks_server(factory, **options):
    g = {"smacks_hibernation_time": HIBERNATION, "smacks_min_hibernation_time": 1, "smacks_ack_timeout": 0}
    g.update(options)
    srv = factory(global_options=g, **SMACKS)
    srv.shell(">rawset(_G, 'pn_outcomes', {}); prosody.hosts.localhost.events.add_handler('smacks-redirect', function (e) "
              "local s = e.stanza; table.insert(_G.pn_outcomes, e.outcome .. '=' .. (s and (s:get_child_text('body') "
              "or s.name .. '/' .. (s.attr.type or '')) or '?')) end)")
    return srv


def outcomes(server):
    text = server.shell_result("return table.concat(_G.pn_outcomes, ',')")
    return sorted(x for x in text.split(",") if x)


def offline_bodies(server, user):
    text = server.shell_result(
        "local out = {}; for _, item in require'core.storagemanager'.open('localhost', 'offline', 'archive'):find(%s) "
        "do out[#out+1] = item:get_child_text('body') or '-' end; return '[' .. table.concat(out, '|') .. ']'"
        % harness.lua_string(user))
    inner = text.strip()[1:-1]
    return sorted(inner.split("|")) if inner else []


def users(server, *prefixes):
    out = []
    for p in prefixes:
        name = f"{p}{next(_names)}"
        server.register(name, "pass")
        out.append(name)
    return out


def session_state(server, full_jid):
    return server.shell_result("local s = prosody.full_sessions[%s]; return s and (s.hibernating and 'hibernating' "
                               "or 'live') or 'gone'" % harness.lua_string(full_jid))


async def wait_state(server, full_jid, want, timeout=HIBERNATION + 8):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = session_state(server, full_jid)
        if state == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{full_jid}: {state}, expected {want}")


async def wait_outcomes(server, n, timeout=10):
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        got = outcomes(server)
        if len(got) >= n:
            return got
        await asyncio.sleep(0.1)
    return got


async def phone_gone(server, phone):
    """Drop the phone's connection without closing the stream; returns its full JID once hibernating."""
    assert phone["xep_0198"].sm_id, "the phone enabled resumable stream management"
    full = str(phone.boundjid)
    phone.abort()
    await wait_state(server, full, "hibernating")
    return full


class ErrorCollector:
    def __init__(self, client):
        self.errors = []
        client.add_event_handler("message_error", lambda m: self.errors.append(m))


async def sync(client):
    """A round trip through the server: everything the client sent before has been routed."""
    await client["xep_0030"].get_info(jid=harness.DOMAIN, timeout=10)


def raw_message(client, to, body=None, mtype="chat", children="", mid=None):
    attrs = f" id='{mid}'" if mid else ""
    body_xml = f"<body>{body}</body>" if body is not None else ""
    client.send_raw(f"<message to='{to}' type='{mtype}'{attrs}>{body_xml}{children}</message>")


def test_phone_alone(prosody_factory):
    server = smacks_server(prosody_factory)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        full = await phone_gone(server, phone)
        bare = server.jid(p)
        raw_message(sender, bare, "bare-chat", mid="a1")
        raw_message(sender, full, "full-chat", mid="a2")
        raw_message(sender, full, None, children=f"<composing xmlns='{NS_CHATSTATES}'/>", mid="a3")
        raw_message(sender, full, "headline", mtype="headline", mid="a4")
        raw_message(sender, full, "no-store", children=f"<no-store xmlns='{NS_HINTS}'/>", mid="a5")
        iq = sender.make_iq_get(ito=full)
        iq.xml.append(ET.Element("{urn:xmpp:ping}ping"))
        ping = asyncio.ensure_future(iq.send(timeout=HIBERNATION + 10))
        await sync(sender)
        await wait_state(server, full, "gone")
        with pytest.raises(IqError) as err:
            await ping
        assert err.value.iq["error"]["condition"] == "service-unavailable"
        assert err.value.iq["from"] == bare, "the error comes from the bare JID"
        got = await wait_outcomes(server, 6)
        assert got == sorted(["offline=bare-chat", "offline=full-chat", "ephemeral=message/chat",
                              "ephemeral=headline", "ephemeral=no-store", "iq_error=iq/get"]), got
        assert errors.errors == [], "no message was bounced"
        assert offline_bodies(server, p) == ["bare-chat", "full-chat"]
        # the next session gets exactly those two, with the time they were queued
        again = await connect(server, p, resource="phone2")
        msgs = [await again.next_message(), await again.next_message()]
        assert sorted(m["body"] for m in msgs) == ["bare-chat", "full-chat"]
        assert all(m.xml.find(f"{{{NS_DELAY}}}delay") is not None for m in msgs)
        await asyncio.sleep(0.3)
        assert again.messages.empty()
        await again.close()
        await sender.close()

    run(scenario())


def test_phone_and_desktop_with_carbons(prosody_factory):
    server = smacks_server(prosody_factory)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        await phone["xep_0280"].enable()
        desktop = await connect(server, p, resource="desktop")
        await desktop["xep_0280"].enable()
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        carbons = []
        desktop.add_event_handler("carbon_received", lambda m: carbons.append(m["carbon_received"]["body"]))
        full = await phone_gone(server, phone)
        raw_message(sender, server.jid(p), "to-bare", mid="b1")
        raw_message(sender, full, "to-phone", mid="b2")  # the desktop gets it as a carbon copy
        await sync(sender)
        await wait_state(server, full, "gone")
        got = await wait_outcomes(server, 2)
        assert got == ["elsewhere=to-bare", "elsewhere=to-phone"], got
        await asyncio.sleep(0.5)
        assert errors.errors == [], "nothing bounced: the desktop has both messages"
        assert offline_bodies(server, p) == []
        # the desktop got each message exactly once: one directly, one as a carbon; no redirected second copy
        direct = []
        while not desktop.messages.empty():
            msg = desktop.messages.get_nowait()
            if msg.xml.find(f"{{{NS_CARBONS}}}received") is None:
                direct.append(msg["body"])
        assert direct == ["to-bare"] and carbons == ["to-phone"], (direct, carbons)
        await desktop.close()
        await sender.close()

    run(scenario())


def test_phone_that_uses_mam_is_not_flooded_from_offline(prosody_factory):
    server = smacks_server(prosody_factory)
    p, s = users(server, "phone", "sender")

    async def scenario():
        # an earlier session of this client queried MAM: remembered across sessions
        earlier = await connect(server, p, resource="phone")
        await mam_all(earlier)
        await earlier.close()
        phone = await connect(server, p, resource="phone")
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        full = await phone_gone(server, phone)
        raw_message(sender, server.jid(p), "archived-1", mid="c1")
        raw_message(sender, full, "archived-2", mid="c2")
        await sync(sender)
        await wait_state(server, full, "gone")
        got = await wait_outcomes(server, 2)
        assert got == ["archived=archived-1", "archived=archived-2"], got
        assert errors.errors == []
        assert offline_bodies(server, p) == []
        again = await connect(server, p, resource="phone")
        items = await mam_all(again, fields={"with": server.jid(s)})
        assert [i.body for i in items] == ["archived-1", "archived-2"], "one copy each in MAM"
        await again.close()
        await sender.close()

    run(scenario())


def test_full_jid_chat_redirected_to_desktop_without_carbons(prosody_factory):
    server = smacks_server(prosody_factory)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        desktop = await connect(server, p, resource="desktop")  # no carbons
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        full = await phone_gone(server, phone)
        raw_message(sender, full, "only-for-phone", mid="d1")
        await sync(sender)
        await wait_state(server, full, "gone")
        got = await wait_outcomes(server, 1)
        assert got == ["redirected=only-for-phone"], got
        msg = await desktop.next_message()
        assert msg["body"] == "only-for-phone"
        assert msg.xml.find(f"{{{NS_DELAY}}}delay") is not None, "redirected with the time it was queued"
        await asyncio.sleep(0.3)
        assert desktop.messages.empty()
        assert errors.errors == []
        assert offline_bodies(server, p) == []
        items = await mam_all(desktop, fields={"with": server.jid(s)})
        assert [i.body for i in items] == ["only-for-phone"], "the redirect did not archive a second copy"
        await desktop.close()
        await sender.close()

    run(scenario())


def test_queue_overflow_loses_nothing(prosody_factory):
    server = smacks_server(prosody_factory, smacks_max_queue_size=3, smacks_hibernation_time=6)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        full = await phone_gone(server, phone)
        for i in range(1, 6):
            raw_message(sender, full, f"m{i}", mid=f"e{i}")
        await sync(sender)
        # the two oldest were pushed out of the full queue and handed to the policy at once
        early = await wait_outcomes(server, 2)
        assert early == ["offline=m1", "offline=m2"], early
        assert session_state(server, full) == "hibernating", "overflow does not end the session"
        await wait_state(server, full, "gone")
        got = await wait_outcomes(server, 5)
        assert got == [f"offline=m{i}" for i in range(1, 6)], got
        assert errors.errors == []
        assert offline_bodies(server, p) == [f"m{i}" for i in range(1, 6)]
        await sender.close()

    run(scenario())


def test_queue_overflow_keeps_resumption_valid(prosody_factory):
    server = smacks_server(prosody_factory, smacks_max_queue_size=2, smacks_hibernation_time=30)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        sender = await connect(server, s)
        full = await phone_gone(server, phone)
        for i in range(1, 5):
            raw_message(sender, full, f"r{i}", mid=f"f{i}")
        await sync(sender)
        early = await wait_outcomes(server, 2)
        assert early == ["offline=r1", "offline=r2"], early
        # the phone comes back: it resumes and gets what is still queued, in order
        resumed = asyncio.get_running_loop().create_future()
        phone.add_event_handler("session_resumed", lambda _: resumed.done() or resumed.set_result(True))
        phone.connect(address=("127.0.0.1", server.c2s_port), disable_starttls=True, force_starttls=False)
        await asyncio.wait_for(resumed, 10)
        bodies = [(await phone.next_message())["body"] for _ in range(2)]
        assert bodies == ["r3", "r4"]
        assert offline_bodies(server, p) == ["r1", "r2"]
        await phone.close()
        await sender.close()

    run(scenario())


def test_two_phones_hibernating_store_one_copy(prosody_factory):
    # long enough that the first phone is still hibernating when the message arrives, even under ASan
    server = smacks_server(prosody_factory, smacks_hibernation_time=6)
    p, s = users(server, "phone", "sender")

    async def scenario():
        one = await connect(server, p, resource="one")
        two = await connect(server, p, resource="two")
        sender = await connect(server, s)
        errors = ErrorCollector(sender)
        full_one = await phone_gone(server, one)
        full_two = await phone_gone(server, two)
        raw_message(sender, server.jid(p), "for-both", mid="g1")
        await sync(sender)
        await wait_state(server, full_one, "gone")
        await wait_state(server, full_two, "gone")
        got = await wait_outcomes(server, 3)
        # the first phone's unavailable presence was queued for the second one: dropped, as every presence
        assert [o for o in got if "presence" not in o] == ["elsewhere=for-both", "offline=for-both"], got
        assert all(o.startswith("ephemeral=") for o in got if "presence" in o), got
        assert errors.errors == []
        assert offline_bodies(server, p) == ["for-both"], "exactly one offline copy"
        await sender.close()

    run(scenario())


def test_server_shutdown_during_hibernation(prosody_factory):
    server = smacks_server(prosody_factory, smacks_hibernation_time=60)
    p, s = users(server, "phone", "sender")

    async def scenario():
        phone = await connect(server, p, resource="phone")
        sender = await connect(server, s)
        full = await phone_gone(server, phone)
        raw_message(sender, full, "before-shutdown", mid="h1")
        await sync(sender)
        await sender.close()

    run(scenario())
    server.stop()
    assert "Expiry policy failed" not in server.log_text()
    server.start()
    assert offline_bodies(server, p) == ["before-shutdown"]

    async def after():
        again = await connect(server, p, resource="phone")
        assert (await again.next_message())["body"] == "before-shutdown"
        await again.close()

    run(after())
