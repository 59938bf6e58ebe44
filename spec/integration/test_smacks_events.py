"""mod_native_smacks: the events other modules rely on, the metrics' reconciliation, and the expiry paths the slixmpp
scenarios do not reach (per-user hibernation cap, non-resumable and clean disconnects, storage retries, bounces).

Raw XML clients (helpers from test_smacks_protocol); outcomes and event payloads are recorded inside the server
through the admin shell.
"""

import re
import time

import pytest

import harness
from harness import RawXMPP
from test_smacks_protocol import (SM3, SMACKS, attrs, client_and_sender, drop, enable, new_user, read_messages, resume, send_chat,
                                  sm_client, wait_hibernating)

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@pytest.fixture(autouse=True)
def no_policy_errors(request):
    """Every server of a test: the expiry policy never failed and every queued stanza could be rebuilt."""
    yield
    for srv in list(harness.SERVERS) + list(getattr(request.node, "_pn_stopped_servers", [])):
        log = srv.log_text()
        for marker in ("Expiry policy failed", "Could not rebuild a queued stanza"):
            assert marker not in log, f"{srv.name}: {marker}"

RECORDER = (
    ">rawset(_G, 'pn_events', {}); local ev = prosody.hosts.localhost.events; "
    "local function body(s) return s and (s:get_child_text('body') or s.name) or '-' end; "
    "ev.add_handler('smacks-redirect', function (e) table.insert(_G.pn_events, 'outcome:' .. e.outcome .. ':' .. body(e.stanza)) end); "
    "ev.add_handler('smacks-hibernation-start', function (e) table.insert(_G.pn_events, 'start:' .. #e.queue .. ':' .. body(e.queue[1]) .. ':' .. tostring(e.origin.hibernating ~= nil)) end); "
    "ev.add_handler('smacks-hibernation-stanza-queued', function (e) table.insert(_G.pn_events, 'queued:' .. #e.queue .. ':' .. body(e.stanza)) end); "
    "ev.add_handler('smacks-hibernation-end', function (e) table.insert(_G.pn_events, 'end:' .. #e.queue .. ':' .. tostring(e.resumed ~= nil and e.resumed.hibernating == nil)) end); "
    "ev.add_handler('smacks-ack-delayed', function (e) table.insert(_G.pn_events, 'delayed:' .. #e.queue .. ':' .. body(e.queue[1])) end)"
)


def server_with(factory, *, modules_disabled=(), **options):
    g = {"smacks_hibernation_time": 2, "smacks_min_hibernation_time": 1, "smacks_ack_timeout": 0,
         "statistics": "internal", "statistics_interval": "manual"}
    g.update(options)
    srv = factory(global_options=g, modules=SMACKS["modules"],
                  modules_disabled=list(SMACKS["modules_disabled"]) + list(modules_disabled))
    srv.shell(RECORDER)
    return srv


def events(server):
    text = server.shell_result("return table.concat(_G.pn_events, ',')")
    return [x for x in text.split(",") if x]


def wait_events(server, pred, timeout=10):
    deadline = time.monotonic() + timeout
    got = []
    while time.monotonic() < deadline:
        got = events(server)
        if pred(got):
            return got
        time.sleep(0.1)
    raise AssertionError(f"events never matched: {got}")


def outcomes_of(evts):
    return sorted(e[len("outcome:"):] for e in evts if e.startswith("outcome:"))


def metrics(server):
    """{'stanzas_queued': n, 'stanza_outcomes{offline}': n, ...} of this module's counters and gauges."""
    text = server.shell_result(
        "local sm = require'core.statsmanager'; if sm.collect then sm.collect() end; local out = {}; "
        "for name, fam in pairs(sm.get_metric_registry():get_metric_families()) do "
        "if name:find('native_smacks', 1, true) then for labels, m in fam:iter_metrics() do "
        "for suffix, _, value in m:iter_samples() do if suffix == '_total' or suffix == '' then "
        "local l = {}; for i = 2, #labels do l[#l+1] = labels[i] end; "
        "out[#out+1] = name:match('[^/]+$') .. (#l > 0 and '{' .. table.concat(l, ',') .. '}' or '') .. '=' .. value "
        "end end end end end; return table.concat(out, ' ')")
    out = {}
    for item in text.split():
        k, v = item.rsplit("=", 1)
        out[k] = out.get(k, 0) + float(v)
    return out


def offline_count(server, user):
    return int(server.shell_result(
        "local n = 0; for _ in require'core.storagemanager'.open('localhost', 'offline', 'archive'):find(%s) do n = n + 1 end; return n"
        % harness.lua_string(user)))


def gone(server, full_jid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.shell_result("return prosody.full_sessions[%s] and 'here' or 'gone'" % harness.lua_string(full_jid)) == "gone":
            return True
        time.sleep(0.1)
    return False


def test_events_carry_the_queue_as_other_modules_read_it(prosody_factory):
    server = server_with(prosody_factory, smacks_hibernation_time=30, smacks_max_ack_delay=1)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["first"])
    read_messages(c, 1)
    c.read_until(rf"<r xmlns='{SM3}'/>")  # left unanswered: smacks-ack-delayed after 1 s
    wait_events(server, lambda e: any(x.startswith("delayed:") for x in e))
    drop(c)
    wait_hibernating(server, user)
    send_chat(sender, c.jid, ["second"], "late")
    got = wait_events(server, lambda e: any(x.startswith("queued:") for x in e))
    m = metrics(server)
    assert m["hibernating_sessions"] == 1, m
    assert 2 * 100 < m["queue_memory_bytes"] < 2 * 2000, m  # two small messages held in the engine
    r, resp = resume(server, user, c.sm["id"], 0)
    assert "<resumed" in resp
    bodies = re.findall(r"<body>([^<]*)</body>", r.read_until(r"second.*?</message>"))
    assert bodies == ["first", "second"]
    got = wait_events(server, lambda e: any(x.startswith("end:") for x in e))
    assert got == ["delayed:1:first", "start:1:first:true", "queued:2:second", "end:2:true"], got
    r.close()
    sender.close()


def test_metrics_reconcile(prosody_factory):
    server = server_with(prosody_factory)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["a", "b", "c"])
    read_messages(c, 3)
    c.send(f"<a xmlns='{SM3}' h='1'/>")
    c.send(f"<r xmlns='{SM3}'/>")
    c.read_until(r"<a\b[^>]*/>")
    full = c.jid
    drop(c)
    wait_hibernating(server, user)
    send_chat(sender, full, ["d", "e"], "late")
    assert gone(server, full)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 4)
    assert outcomes_of(got) == ["offline:b", "offline:c", "offline:d", "offline:e"]
    m = metrics(server)
    assert m["stanzas_queued"] == 5, m
    assert m["stanzas_acked"] == 1, m
    assert m["stanza_outcomes{offline}"] == 4, m
    outcome_total = sum(v for k, v in m.items() if k.startswith("stanza_outcomes"))
    assert m["stanzas_queued"] == m["stanzas_acked"] + outcome_total, m
    assert m["sessions{started}"] == 1 and m["sessions{hibernated}"] == 1 and m["sessions{expired}"] == 1, m
    assert m["hibernating_sessions"] == 0, m
    assert offline_count(server, user) == 4
    sender.close()


def test_per_user_hibernation_cap_expires_the_oldest(prosody_factory):
    server = server_with(prosody_factory, smacks_hibernation_time=60, smacks_max_hibernated_sessions=1)
    user = new_user(server)
    sender = RawXMPP(server.c2s_port)
    sender.login(new_user(server, "s"), "pass")
    one = sm_client(server, user, "one")
    send_chat(sender, one.jid, ["to-one"])
    read_messages(one, 1)
    drop(one)
    wait_hibernating(server, user, "one")
    two = sm_client(server, user, "two")
    drop(two)
    assert gone(server, one.jid), "the older hibernating session was expired when a second one started"
    wait_hibernating(server, user, "two")
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 1)
    assert outcomes_of(got) == ["offline:to-one"], got
    assert metrics(server)["sessions{evicted}"] == 1
    sender.close()


def test_non_resumable_disconnect_runs_the_policy_at_once(prosody_factory):
    server = server_with(prosody_factory)
    user = new_user(server)
    c = RawXMPP(server.c2s_port)
    c.login(user, "pass", "phone")
    assert "<enabled" in enable(c, extra="")
    sender = RawXMPP(server.c2s_port)
    sender.login(new_user(server, "s"), "pass")
    send_chat(sender, c.jid, ["unacked"])
    read_messages(c, 1)
    drop(c)
    assert gone(server, c.jid, timeout=3)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 1)
    assert outcomes_of(got) == ["offline:unacked"]
    assert offline_count(server, user) == 1
    sender.close()


def test_clean_close_with_unacked_stanzas_runs_the_policy(prosody_factory):
    server = server_with(prosody_factory)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["seen", "unseen"])
    read_messages(c, 2)
    c.send(f"<a xmlns='{SM3}' h='1'/>")
    c.send("</stream:stream>")
    assert attrs(c.read_until(r"<a\b[^>]*/>"))["h"] == "0"
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 1)
    assert outcomes_of(got) == ["offline:unseen"]
    sender.close()


def test_offline_storage_failures_are_retried(prosody_factory):
    server = server_with(prosody_factory)
    server.shell(">local n = 0; prosody.hosts.localhost.events.add_handler('message/offline/handle', function () "
                 "n = n + 1; if n <= 2 then error('disk full (test)') end end, 100)")
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["precious"])
    read_messages(c, 1)
    full = c.jid
    drop(c)
    wait_hibernating(server, user)
    assert gone(server, full)
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 1)
    assert outcomes_of(got) == ["offline:precious"]
    assert offline_count(server, user) == 1
    assert len(re.findall(r"Offline storage refused a message from an expired session", server.log_text())) == 2
    sender.close()


def test_bounce_only_when_neither_stored_nor_archived(prosody_factory):
    server = server_with(prosody_factory, modules_disabled=["offline", "mam"])
    user, c, sender = client_and_sender(server)
    full = c.jid
    drop(c)
    wait_hibernating(server, user)
    send_chat(sender, full, ["lost-cause"])
    err = sender.read_until(r"<message[^>]*type=['\"]error['\"].*?</message>", timeout=15)
    assert f"from='{user}@localhost'" in err or f'from="{user}@localhost"' in err, err
    assert f"<recipient-unavailable xmlns='{STANZAS}'/>" in err, err
    assert "session expired" in err, err
    got = wait_events(server, lambda e: len(outcomes_of(e)) >= 1)
    assert outcomes_of(got) == ["bounced:lost-cause"]
    sender.close()


def test_a_module_reload_keeps_the_session_counts(prosody_factory):
    server = server_with(prosody_factory, smacks_hibernation_time=30)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["kept"])
    read_messages(c, 1)
    drop(c)
    wait_hibernating(server, user)
    assert metrics(server)["hibernating_sessions"] == 1
    server.shell('module:reload("native_smacks", "localhost")')
    # the reloaded module resumes the session that hibernated before the reload, and counts it out
    r, resp = resume(server, user, c.sm["id"], 0)
    assert "<resumed" in resp, resp
    assert re.findall(r"<body>([^<]*)</body>", r.read_until(r"kept.*?</message>")) == ["kept"]
    assert metrics(server)["hibernating_sessions"] == 0  # not -1
    drop(r)
    wait_hibernating(server, user)
    assert metrics(server)["hibernating_sessions"] == 1
    r.close()
    sender.close()


def test_unloading_leaves_no_session_with_this_modules_queue(prosody_factory):
    server = server_with(prosody_factory, smacks_hibernation_time=60)
    user, c, sender = client_and_sender(server)  # connected, stream management on
    other, gone_phone, _ = client_and_sender(server)
    send_chat(sender, gone_phone.jid, ["held"])
    read_messages(gone_phone, 1)
    drop(gone_phone)
    wait_hibernating(server, other)
    server.shell('module:unload("native_smacks", "localhost")')
    # the hibernating session can no longer be resumed: it expired, its message went through the policy
    assert gone(server, gone_phone.jid)
    assert offline_count(server, other) == 1
    # the connected one goes on without stream management, and without errors
    state = server.shell_result("local s = prosody.full_sessions[%s]; return tostring(s.smacks) .. ' ' .. "
                                "tostring(s.outgoing_stanza_queue)" % harness.lua_string(c.jid))
    assert state == "nil nil", state
    send_chat(sender, c.jid, ["after"], "after")
    assert "after" in read_messages(c, 1)[0]
    assert "Traceback" not in server.log_text()
    sender.close()
