"""mod_cloud_notify (XEP-0357 push, from Debian's prosody-modules) on top of mod_native_smacks.

mod_cloud_notify reads the smacks events' queues, replaces `session.hibernating_watchdog` to keep a push client's
session hibernating far longer than smacks_hibernation_time, and restores the original watchdog after the first push.
The push service is a client of the same server (a full JID), so the notifications it gets are counted on the wire.
"""

import os
import re
import time

import pytest

import harness
from harness import RawXMPP
from test_smacks_protocol import SM3, drop, new_user, read_messages, send_chat, sm_client, wait_hibernating
from test_smacks_events import events, gone, offline_count, outcomes_of, wait_events, RECORDER

CLOUD_NOTIFY = "/usr/lib/prosody/modules/mod_cloud_notify/mod_cloud_notify.lua"
NS_PUSH = "urn:xmpp:push:0"


@pytest.fixture(autouse=True)
def no_policy_errors(request):
    yield
    for srv in list(harness.SERVERS) + list(getattr(request.node, "_pn_stopped_servers", [])):
        assert "Expiry policy failed" not in srv.log_text(), srv.name


def test_cloud_notify_is_installed():
    assert os.path.exists(CLOUD_NOTIFY), "install Debian's prosody-modules (spec/deps.sh) for mod_cloud_notify"


def push_server(factory):
    srv = factory(global_options={"smacks_hibernation_time": 2, "smacks_min_hibernation_time": 1,
                                  "smacks_ack_timeout": 0, "push_max_hibernation_timeout": 60},
                  modules=["native_smacks", "cloud_notify"], modules_disabled=["smacks"])
    srv.shell(RECORDER)
    return srv


def next_push(service, timeout=10):
    """Read one push (iq set with a notification) and answer it; returns the iq's text."""
    iq = service.read_until(r"<iq\b[^>]*type=['\"]set['\"].*?</iq>", timeout)
    assert f"<notification xmlns='{NS_PUSH}'>" in iq, iq
    iq_id = re.search(r"\bid=['\"]([^'\"]+)['\"]", iq).group(1)
    frm = re.search(r"\bfrom=['\"]([^'\"]+)['\"]", iq).group(1)
    service.send(f"<iq type='result' id='{iq_id}' to='{frm}'/>")
    return iq


def test_push_extends_hibernation_and_notifies_for_queued_messages(prosody_factory):
    server = push_server(prosody_factory)
    user, svc_user, sender_user = new_user(server), new_user(server, "push"), new_user(server, "s")
    service = RawXMPP(server.c2s_port)
    service_jid = service.login(svc_user, "pass", "app")
    phone = sm_client(server, user)
    reply = phone.iq("push1", f"<iq type='set' id='push1'><enable xmlns='{NS_PUSH}' jid='{service_jid}' node='n1'/></iq>")
    assert "type='result'" in reply or 'type="result"' in reply, reply
    full = phone.jid
    drop(phone)
    wait_hibernating(server, user)
    # mod_cloud_notify swapped the 2 s watchdog for its own 60 s one: still hibernating well after 2 s
    time.sleep(3.5)
    assert server.shell_result("local s = prosody.full_sessions[%s]; return s and s.hibernating and 'yes' or 'no'"
                               % harness.lua_string(full)) == "yes"
    sender = RawXMPP(server.c2s_port)
    sender.login(sender_user, "pass")
    send_chat(sender, full, ["wake up"])
    # the pushes so far were "unimportant" (the unacked iq result at hibernation start); this one carries the body
    pushes = [next_push(service)]
    while "New Message!" not in pushes[-1] and len(pushes) < 3:
        pushes.append(next_push(service))
    assert "New Message!" in pushes[-1], pushes
    got = wait_events(server, lambda e: any(x.startswith("queued:") for x in e))
    assert got[:2] == ["start:1:iq:true", "queued:2:wake up"], got  # the push enable result was still unacked
    # after the first push the original watchdog is back: the session expires about 2 s later
    assert gone(server, full, timeout=10)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 2)
    assert outcomes_of(got) == ["ephemeral:iq", "offline:wake up"], got
    assert offline_count(server, user) == 1
    sender.close()
    service.close()
