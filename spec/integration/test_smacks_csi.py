"""Client State Indication (XEP-0352) with mod_native_smacks: mod_csi_simple (core in 0.12), mod_csi alone and
mod_csi_battery_saver (Debian's prosody-modules).

A client that sends <inactive/> gets its non-urgent stanzas held and the held ones flushed by an urgent stanza or by
<active/>; while inactive, acknowledgements are requested per smacks_max_inactive_unacked_stanzas instead of
smacks_max_unacked_stanzas (the same rule as mod_smacks, compared in the same scenario); and what is held when the
inactive session hibernates and expires goes through the expiry policy like everything else: nothing is lost.
"""

import os
import re
import time

import pytest

import harness
from test_smacks_protocol import SM3, client_and_sender, drop
from test_smacks_events import RECORDER, gone, offline_count, outcomes_of, wait_events

CSI = "urn:xmpp:csi:0"
BATTERY_SAVER = "/usr/lib/prosody/modules/mod_csi_battery_saver/mod_csi_battery_saver.lua"
NATIVE = {"modules": ["native_smacks"], "modules_disabled": ["smacks"]}
CORE = {"modules": [], "modules_disabled": []}


@pytest.fixture(autouse=True)
def no_policy_errors(request):
    yield
    for srv in list(harness.SERVERS) + list(getattr(request.node, "_pn_stopped_servers", [])):
        log = srv.log_text()
        for marker in ("Expiry policy failed", "Could not rebuild a queued stanza", "Traceback"):
            assert marker not in log, f"{srv.name}: {marker}"


def csi_server(factory, csi_modules, impl=NATIVE, **options):
    g = {"smacks_hibernation_time": 2, "smacks_min_hibernation_time": 1, "smacks_ack_timeout": 0,
         "csi_resume_inactive_delay": 0.5}
    g.update(options)
    srv = factory(global_options=g, modules=list(impl["modules"]) + list(csi_modules),
                  modules_disabled=impl["modules_disabled"])
    if impl is NATIVE:
        srv.shell(RECORDER)
    return srv


def state(server, full):
    return server.shell_result("local s = prosody.full_sessions[%s]; return s and tostring(s.state) or 'gone'"
                               % harness.lua_string(full))


def unacked(server, full):
    return int(server.shell_result("local s = prosody.full_sessions[%s]; local q = s and s.outgoing_stanza_queue; "
                                   "return q and q:count_unacked() or -1" % harness.lua_string(full)))


def wait_state(server, full, want, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(server, full) == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"{full} never reached state {want}: {state(server, full)}")


def go_inactive(server, c):
    c.send(f"<inactive xmlns='{CSI}'/>")
    wait_state(server, c.jid, "inactive")


def nothing_arrives(c, seconds=1.0):
    try:
        got = c.read_until(r"<(message|r|iq|presence)\b", seconds)
    except TimeoutError:
        return True
    raise AssertionError(f"expected nothing, got {got!r}")


def msg(sender, to, mid, payload):
    sender.send(f"<message to='{to}' type='chat' id='{mid}'>{payload}</message>")


COMPOSING = "<composing xmlns='http://jabber.org/protocol/chatstates'/>"
RECEIPT = "<received xmlns='urn:xmpp:receipts' id='x1'/>"
MARKER = "<displayed xmlns='urn:xmpp:chat-markers:0' id='x2'/>"


R = re.compile(r"<r xmlns=['\"]%s['\"]/>" % SM3)


def read_stanzas(c, n, timeout=10):
    """n messages; <r/> read on the way are remembered in c.r_seen."""
    out = []
    for _ in range(n):
        text = c.read_until(r"<message\b.*?</message>", timeout)
        c.r_seen = getattr(c, "r_seen", 0) + len(R.findall(text))
        out.append(text[text.rindex("<message"):])
    return out


def ids_of(stanzas):
    return [re.search(r"\bid=['\"]([^'\"]+)", s).group(1) for s in stanzas]


def answer_r(c, h, timeout=5):
    if getattr(c, "r_seen", 0):
        c.r_seen -= 1
    else:
        c.read_until(R.pattern, timeout)
    c.send(f"<a xmlns='{SM3}' h='{h}'/>")


def test_csi_simple_holds_until_urgent_or_active(prosody_factory):
    server = csi_server(prosody_factory, ["csi_simple"])
    user, c, sender = client_and_sender(server)
    go_inactive(server, c)
    for i in range(3):
        msg(sender, c.jid, f"cs{i}", COMPOSING)
    assert nothing_arrives(c)
    # held by mod_csi_simple in the paused write buffer, already in the SM queue (they are on their way)
    assert unacked(server, c.jid) == 3
    msg(sender, c.jid, "urgent", "<body>wake up</body>")
    got = read_stanzas(c, 4)
    assert ids_of(got) == ["cs0", "cs1", "cs2", "urgent"], got
    assert all("urn:xmpp:delay" in s for s in got[:3]), got  # stamped while held
    answer_r(c, 4)  # one <r/> for the flushed batch
    deadline = time.monotonic() + 5
    while unacked(server, c.jid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unacked(server, c.jid) == 0
    wait_state(server, c.jid, "inactive")  # back to holding after csi_resume_inactive_delay
    msg(sender, c.jid, "cs3", COMPOSING)
    msg(sender, c.jid, "cs4", COMPOSING)
    assert nothing_arrives(c)
    c.send(f"<active xmlns='{CSI}'/>")
    assert ids_of(read_stanzas(c, 2)) == ["cs3", "cs4"]
    answer_r(c, 6)  # <active/> forces an ack request
    sender.close()


@pytest.mark.parametrize("impl", ["native", "core"])
def test_inactive_ack_threshold(prosody_factory, impl):
    """mod_csi alone (no holding): stanzas go out at once, and while inactive an <r/> follows only once more than
    smacks_max_inactive_unacked_stanzas are unacknowledged; while active, after every one (threshold 0)."""
    server = csi_server(prosody_factory, ["csi"], impl=NATIVE if impl == "native" else CORE,
                        smacks_max_inactive_unacked_stanzas=4)
    user, c, sender = client_and_sender(server)
    h = 0
    msg(sender, c.jid, "active0", "<body>a</body>")
    read_stanzas(c, 1)
    h += 1
    answer_r(c, h)  # active: asked at once
    go_inactive(server, c)
    requests = []
    for round_ in range(2):
        for i in range(5):
            msg(sender, c.jid, f"in{round_}{i}", "<body>b</body>")
            read_stanzas(c, 1)
            h += 1
            try:
                if not c.r_seen:
                    c.read_until(R.pattern, 0.4)
                c.r_seen = 0
                requests.append(i + 1)
                c.send(f"<a xmlns='{SM3}' h='{h}'/>")
            except TimeoutError:
                pass
    # the 5th unacknowledged stanza (more than 4) triggers the request, in each round
    assert requests == [5, 5], requests
    c.send(f"<active xmlns='{CSI}'/>")
    wait_state(server, c.jid, "active")
    answer_r(c, h)  # <active/> forces a request
    msg(sender, c.jid, "active1", "<body>c</body>")
    read_stanzas(c, 1)
    h += 1
    answer_r(c, h)
    sender.close()


def test_held_stanzas_of_an_expiring_inactive_session_go_through_the_policy(prosody_factory):
    server = csi_server(prosody_factory, ["csi_simple"])
    user, c, sender = client_and_sender(server)
    go_inactive(server, c)
    msg(sender, c.jid, "st", COMPOSING)
    msg(sender, c.jid, "rc", RECEIPT)
    msg(sender, c.jid, "mk", MARKER)
    assert nothing_arrives(c)
    full = c.jid
    drop(c)
    assert gone(server, full, timeout=15)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 3)
    # the chat state is ephemeral; the receipt and the marker are worth storing: offline, not lost
    assert outcomes_of(got) == ["ephemeral:message", "offline:message", "offline:message"], got
    assert offline_count(server, user) == 2
    sender.close()


def test_battery_saver_holds_and_loses_nothing_on_expiry(prosody_factory):
    assert os.path.exists(BATTERY_SAVER), "install Debian's prosody-modules (spec/deps.sh)"
    server = csi_server(prosody_factory, ["csi_battery_saver"])
    user, c, sender = client_and_sender(server)
    go_inactive(server, c)
    msg(sender, c.jid, "st0", COMPOSING)
    assert nothing_arrives(c)
    # held in mod_csi_battery_saver's own queue, before the SM queue
    assert unacked(server, c.jid) == 0
    msg(sender, c.jid, "urgent", "<body>now</body>")
    assert ids_of(read_stanzas(c, 2)) == ["st0", "urgent"]
    # still inactive for SM (battery saver fires no csi-flushing): no <r/> below smacks_max_inactive_unacked_stanzas
    assert nothing_arrives(c, 0.5) and not c.r_seen
    c.send(f"<a xmlns='{SM3}' h='2'/>")  # an unsolicited ack, as clients may send
    msg(sender, c.jid, "st1", COMPOSING)
    msg(sender, c.jid, "rc", RECEIPT)
    assert nothing_arrives(c)
    full = c.jid
    drop(c)
    # what mod_csi_battery_saver still held went into the SM queue when the session started hibernating ...
    got = wait_events(server, lambda e: any(x.startswith("start:") for x in e))
    start = [x for x in got if x.startswith("start:")][0]
    assert start.startswith("start:2:"), got
    # ... and through the policy at expiry
    assert gone(server, full, timeout=15)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 2)
    assert outcomes_of(got) == ["ephemeral:message", "offline:message"], got
    assert offline_count(server, user) == 1
    sender.close()
