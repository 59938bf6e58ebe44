"""mod_native_limits on the MUC component: one join budget per room (native_limits_muc_room_joins), for a room
flooded by joins from many addresses, each under its own per-address limit. Raw TCP clients at distinct non-loopback
addresses of a loopback-routed /24 (the fixture of test_limits_prefixes, needs root); loopback exemption on."""

import re

from test_limits_helpers import MUC_HOST, advance, all_decisions, limits_server
from test_limits_prefixes import From, prefixes  # noqa: F401  (prefixes is a fixture)

NS_MUC = "http://jabber.org/protocol/muc"


def join(c, room, nick):
    c.send(f"<presence to='{room}@{MUC_HOST}/{nick}'><x xmlns='{NS_MUC}'/></presence>")
    text = c.read_until(r"<presence[^>]*from=['\"]%s@%s/%s['\"][^>]*>.*?</presence>" % (room, MUC_HOST, re.escape(nick)))
    return ("error" if "type='error'" in text else "ok"), text


def server(factory, p, **muc_options):
    opts = {"muc_room_locking": False, "native_limits_muc_creations": False,
            "native_limits_muc_joins": {"address": "2/10min"}}  # every address joins at most twice: a distributed flood
    opts.update(muc_options)
    return limits_server(factory, exempt_loopback=True, muc=True, muc_options=opts,
                         global_options={"interfaces": ["127.0.0.1", p["server4"]]},
                         host_options={"native_limits_connections": False, "native_limits_logins": False})


def visitor(srv, p, n):
    c = From(srv, f"{p['v4']}.{n}", p["server4"])
    assert c.login()[0] == "ok"
    return c


def test_a_room_flooded_from_many_addresses_refuses_joins(prosody_factory, prefixes):  # noqa: F811
    p = prefixes
    srv = server(prosody_factory, p, native_limits_muc_room_joins="3/10min burst 3")
    owner = visitor(srv, p, 2)
    assert join(owner, "support", "owner")[0] == "ok"  # the creator owns the room: exempt
    crowd = [visitor(srv, p, 10 + i) for i in range(5)]
    got = [join(c, "support", f"v{i}") for i, c in enumerate(crowd)]
    assert [k for k, _ in got] == ["ok", "ok", "ok", "error", "error"], got
    text = got[3][1]
    assert "type='wait'" in text and "<resource-constraint" in text, text
    assert "This room has too many people joining right now; try again in 200 seconds" in text, text
    assert f"<x xmlns='{NS_MUC}'/>" in text, text
    # the per-address budgets were not what refused them, and nobody earned a strike
    assert all_decisions(srv, host=MUC_HOST) == {("muc_room_joins", "refuse", "enforce"): 2}
    assert "0 offender(s)" in srv.shell(f'limits:top(5, "{MUC_HOST}")')
    # another room has its own budget (creating it is a join too: the creator owns it, so it is exempt)
    extra = visitor(srv, p, 30)
    assert join(extra, "other", "x")[0] == "ok"
    # an affiliated member still gets in while the budget is spent
    owner.send(f"<iq type='set' id='aff1' to='support@{MUC_HOST}'><query xmlns='{NS_MUC}#admin'>"
               f"<item affiliation='member' jid='{crowd[4].jid.split('/')[0]}'/></query></iq>")
    owner.read_until(r"<iq[^>]*id=['\"]aff1['\"]")
    assert join(crowd[4], "support", "member")[0] == "ok"
    # the room budget refills, one join per 200 s (a refused address still has its second join)
    advance(srv, 201, host=MUC_HOST)
    assert join(crowd[3], "support", "v3b")[0] == "ok"
    assert join(visitor(srv, p, 40), "support", "v40")[0] == "error"
    for c in [owner, extra, *crowd]:
        c.close()


def test_room_join_rate_is_off_by_default_and_dry_run_only_counts(prosody_factory, prefixes):  # noqa: F811
    p = prefixes
    srv = server(prosody_factory, p)
    owner = visitor(srv, p, 2)
    assert join(owner, "busy", "owner")[0] == "ok"
    for i in range(8):
        assert join(visitor(srv, p, 50 + i), "busy", f"v{i}")[0] == "ok"
    assert all_decisions(srv, host=MUC_HOST) == {}
    srv2 = server(prosody_factory, p, native_limits_muc_room_joins="1/10min", native_limits_dry_run=True)
    owner = visitor(srv2, p, 2)
    assert join(owner, "busy", "owner")[0] == "ok"
    for i in range(3):
        assert join(visitor(srv2, p, 60 + i), "busy", f"v{i}")[0] == "ok"
    assert all_decisions(srv2, host=MUC_HOST) == {("muc_room_joins", "refuse", "dry_run"): 2}


def test_bad_room_join_rate_is_named_at_load(prosody_factory, prefixes):  # noqa: F811
    srv = server(prosody_factory, prefixes, native_limits_muc_room_joins="lots")
    log = srv.log_text()
    assert (f"Error initializing module 'native_limits' on '{MUC_HOST}': option 'native_limits_muc_room_joins' "
            "must be a rate") in log, log[-3000:]
