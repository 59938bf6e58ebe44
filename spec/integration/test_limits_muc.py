"""mod_native_limits on the MUC component: joins and room creations per address, messages per occupant, size caps,
and a moderator's ban that becomes a ban of the occupant's address. Raw-socket clients of the anonymous host, all from
127.0.0.1 (loopback exemption off)."""

import re

from test_limits_helpers import MUC_HOST, Anon, advance, decisions, limits_server

NS_MUC = "http://jabber.org/protocol/muc"
OFF = {"address": False}


def client(srv):
    c = Anon(srv)
    assert c.login()[0] == "ok"
    return c


def join(c, room, nick):
    """-> ("ok", self-presence) | ("error", error presence)"""
    c.send(f"<presence to='{room}@{MUC_HOST}/{nick}'><x xmlns='{NS_MUC}'/></presence>")
    text = c.read_until(r"<presence[^>]*from=['\"]%s@%s/%s['\"][^>]*>.*?</presence>" % (room, MUC_HOST, re.escape(nick)))
    return ("error" if "type='error'" in text else "ok"), text


def say(c, room, body, n):
    """-> ("ok", echo) | ("error", error message)"""
    c.send(f"<message to='{room}@{MUC_HOST}' type='groupchat' id='m{n}'><body>{body}</body></message>")
    text = c.read_until(r"<message[^>]*id=['\"]m%d['\"][^>]*>.*?</message>" % n)
    return ("error" if "type='error'" in text else "ok"), text


def muc_server(factory, **muc_options):
    opts = {"muc_room_locking": False, "native_limits_muc_joins": OFF, "native_limits_muc_creations": False,
            "native_limits_muc_messages": False}
    opts.update(muc_options)
    return limits_server(factory, muc=True, muc_options=opts)


def test_joins_per_address(prosody_factory):
    srv = muc_server(prosody_factory, native_limits_muc_joins={"address": "2/10min"})
    owner = client(srv)
    assert join(owner, "r1", "owner")[0] == "ok"  # the creator owns the room: affiliated users are exempt
    visitors = [client(srv) for _ in range(3)]
    assert join(visitors[0], "r1", "v0")[0] == "ok"
    assert join(visitors[1], "r1", "v1")[0] == "ok"
    kind, text = join(visitors[2], "r1", "v2")
    assert kind == "error", text
    assert "<policy-violation" in text and "type='wait'" in text and "Too many joins from your network" in text
    assert f"</error><x xmlns='{NS_MUC}'/></presence>" in text  # a child of the presence, not of the error
    assert decisions(srv, "muc_joins", "refuse", host=MUC_HOST) == 1
    advance(srv, 300, host=MUC_HOST)  # one join per five minutes refills
    assert join(visitors[2], "r1", "v2b")[0] == "ok"
    for c in [owner, *visitors]:
        c.close()


def test_room_creations_per_address(prosody_factory):
    srv = muc_server(prosody_factory, native_limits_muc_creations={"address": "1/10min"})
    a = client(srv)
    assert join(a, "new1", "a")[0] == "ok"
    kind, text = join(a, "new2", "a")
    assert kind == "error" and "Too many new rooms from your network" in text, text
    b = client(srv)
    assert join(b, "new1", "b")[0] == "ok"  # joining an existing room is no creation
    assert decisions(srv, "muc_creations", "refuse", host=MUC_HOST) == 1
    a.close()
    b.close()


def test_messages_per_occupant_and_size_caps(prosody_factory):
    srv = muc_server(prosody_factory, native_limits_muc_messages="1/10min burst 2", native_limits_muc_max_body=20,
                     native_limits_muc_max_lines=2, native_limits_muc_max_nick=8)
    owner, v = client(srv), client(srv)
    assert join(owner, "talk", "owner")[0] == "ok"
    assert join(owner, "lounge", "owner")[0] == "ok"
    kind, text = join(v, "talk", "a-very-long-nick")
    assert kind == "error" and "Your nickname is too long" in text, text
    assert join(v, "talk", "v")[0] == "ok"
    kind, text = join(v, "talk", "a-very-long-nick")  # a nickname change is held to the same length
    assert kind == "error" and "Your nickname is too long" in text, text
    assert join(v, "talk", "vee")[0] == "ok"  # a short one is fine
    kind, text = say(v, "talk", "x" * 21, 1)
    assert kind == "error" and "type='modify'" in text and "Your message is too long" in text, text
    kind, text = say(v, "talk", "a\nb\nc", 2)
    assert kind == "error" and "Your message is too long" in text, text
    assert say(v, "talk", "one", 3)[0] == "ok"
    assert say(v, "talk", "two", 4)[0] == "ok"
    kind, text = say(v, "talk", "three", 5)
    assert kind == "error" and "type='wait'" in text and "You are sending messages too fast" in text, text
    # the budget is the occupant's: in another room the same session has its own
    assert join(v, "lounge", "v")[0] == "ok"
    assert say(v, "lounge", "hello", 6)[0] == "ok"
    # the owner (affiliated) is not limited
    for i in range(6):
        assert say(owner, "talk", f"owner {i}", 10 + i)[0] == "ok"
    assert decisions(srv, "muc_messages", "refuse", host=MUC_HOST) == 1
    assert decisions(srv, "muc_size", "refuse", host=MUC_HOST) == 2
    assert decisions(srv, "muc_nick", "refuse", host=MUC_HOST) == 2
    owner.close()
    v.close()


def test_moderator_ban_bans_the_address(prosody_factory):
    srv = muc_server(prosody_factory, native_limits_muc_ban_duration="30min")
    owner, troll = client(srv), client(srv)
    assert join(owner, "help", "owner")[0] == "ok"
    assert join(troll, "help", "troll")[0] == "ok"
    bare = troll.jid.split("/")[0]
    reply = owner.iq("ban1", f"<iq type='set' id='ban1' to='help@{MUC_HOST}'>"
                             f"<query xmlns='{NS_MUC}#admin'><item affiliation='outcast' jid='{bare}'/></query></iq>")
    assert "type='result'" in reply.split("id='ban1'")[0] + reply[-200:], reply
    troll.close()
    # the troll reloads the page: a new anonymous JID from the same address
    again = client(srv)
    kind, text = join(again, "help", "troll2")
    assert kind == "error", text
    assert "<forbidden" in text and "You are banned from this service for 1800 more seconds" in text, text
    assert decisions(srv, "muc_ban", "ban", host=MUC_HOST) == 1
    top = srv.shell(f'limits:top(5, "{MUC_HOST}")')
    assert re.search(r"127\.0\.0\.1\s+level 0 .*banned 1800s", top), top
    # the ban expires
    advance(srv, 1801, host=MUC_HOST)
    assert join(again, "help", "troll3")[0] == "ok"
    owner.close()
    again.close()
