"""The per-client MAM memory of mod_native_smacks (store `smacks_mam_clients`): keyed by resource, bounded per user.

Clients that hibernate keep one generated resource per account, so the resource names the client across sessions
(test_smacks_expiry.py shows the memory at work). Clients that pick a new resource at every login would add an entry
each time: only the 20 most recent resources of a user are kept.
"""

import time

import harness
from harness import RawXMPP
from test_smacks_protocol import new_user, smacks_server

MAM = "urn:xmpp:mam:2"


def remembered(server, user):
    text = server.shell_result(
        "local t = require'core.storagemanager'.open('localhost', 'smacks_mam_clients'):get(%s) or {}; "
        "local out = {}; for r in pairs(t) do out[#out+1] = r end; table.sort(out); return table.concat(out, ' ')"
        % harness.lua_string(user))
    return set(text.split())


def mam_login(server, user, resource):
    c = RawXMPP(server.c2s_port)
    c.login(user, "pass", resource)
    reply = c.iq("q1", f"<iq type='set' id='q1'><query xmlns='{MAM}'/></iq>")
    assert "type='result'" in reply or 'type="result"' in reply, reply
    c.close()


def test_mam_clients_are_remembered_per_resource_and_bounded(prosody_factory):
    server = smacks_server(prosody_factory)
    user = new_user(server)
    plain = RawXMPP(server.c2s_port)
    plain.login(user, "pass", "no-mam")  # never queries MAM: never remembered
    plain.close()
    for i in range(22):
        mam_login(server, user, f"web-{i:02d}")
        time.sleep(1.05 if i in (0, 1) else 0)  # the two oldest have strictly older timestamps (seconds)
    got = remembered(server, user)
    assert len(got) == 20, sorted(got)
    assert "web-00" not in got and "web-01" not in got and "no-mam" not in got, sorted(got)
    assert {f"web-{i:02d}" for i in range(2, 22)} == got
    # a known resource querying again is refreshed, not added
    mam_login(server, user, "web-21")
    assert remembered(server, user) == got
