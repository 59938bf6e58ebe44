"""XEP-0198 on the wire: mod_native_smacks in a real Prosody, driven with raw XML (harness.RawXMPP).

One bullet of issue 4's "Protocol" list per test (or a few closely related ones); every malformed input is sent as
is and the exact answer is checked.
"""

import base64
import itertools
import re
import socket
import time

import pytest

import harness
from harness import RawXMPP

SM3 = "urn:xmpp:sm:3"
SM2 = "urn:xmpp:sm:2"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"

HIBERNATION = 3
SMACKS = {
    "modules": ["native_smacks"],
    "modules_disabled": ["smacks"],
}


def smacks_server(factory, **options):
    g = {"smacks_hibernation_time": HIBERNATION, "smacks_min_hibernation_time": 2, "smacks_ack_timeout": 0}
    g.update(options)
    return factory(global_options=g, **SMACKS)


_names = itertools.count(1)


@pytest.fixture(autouse=True)
def no_policy_errors(request):
    """Every server of a test: the expiry policy never failed and every queued stanza could be rebuilt."""
    yield
    for srv in list(harness.SERVERS) + list(getattr(request.node, "_pn_stopped_servers", [])):
        log = srv.log_text()
        for marker in ("Expiry policy failed", "Could not rebuild a queued stanza"):
            assert marker not in log, f"{srv.name}: {marker}"


def new_user(server, prefix="u"):
    name = f"{prefix}{next(_names)}"
    server.register(name, "pass")
    return name


@pytest.fixture(scope="module")
def server(module_prosody):
    return smacks_server(module_prosody, name="smacks-proto")


def attrs(tag):
    return dict(re.findall(r"""([\w:-]+)=['"]([^'"]*)['"]""", tag))


FAILED = r"<failed\b[^>]*/>|<failed\b.*?</failed>"
ENABLED = r"<enabled\b[^>]*/>|" + FAILED


def authenticate(c, user, opened=False):
    if not opened:
        c.open_stream()
    token = base64.b64encode(f"\0{user}\0pass".encode()).decode()
    c.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    assert "<success" in c.read_until(r"<success[^>]*/>|<success.*?</success>|</failure>")
    return c.open_stream()


def bind(c, resource):
    c.send(f"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
           f"<resource>{resource}</resource></bind></iq>")
    resp = c.read_until(r"<iq[^>]*id=['\"]bind1['\"].*?</iq>")
    c.jid = re.search(r"<jid>([^<]+)</jid>", resp).group(1)
    return c.jid


def enable(c, ns=SM3, extra="resume='true'"):
    c.send(f"<enable xmlns='{ns}' {extra}/>")
    return c.read_until(ENABLED)


def sm_client(server, user, resource="phone", **kw):
    c = RawXMPP(server.c2s_port)
    c.login(user, "pass", resource)
    resp = enable(c, **kw)
    assert "<enabled" in resp, resp
    c.sm = attrs(re.search(r"<enabled\b[^>]*>", resp).group(0))
    return c


def client_and_sender(server):
    """(user, its stream-management client, another new user's plain client to write to it)."""
    user = new_user(server)
    c = sm_client(server, user)
    sender = RawXMPP(server.c2s_port)
    sender.login(new_user(server, "s"), "pass")
    return user, c, sender


def send_chat(sender, to, bodies, mid_prefix="m"):
    for i, body in enumerate(bodies):
        sender.send(f"<message to='{to}' type='chat' id='{mid_prefix}{i}'><body>{body}</body></message>")


def read_messages(c, n, timeout=10):
    out = []
    for _ in range(n):
        out.append(c.read_until(r"<message\b.*?</message>", timeout))
    return out


def drop(c):
    """Drop the TCP connection without </stream:stream>."""
    try:
        c.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    c.sock.close()


def resume(server, user, previd, h, ns=SM3):
    c = RawXMPP(server.c2s_port)
    authenticate(c, user)
    h_attr = "" if h is None else f" h='{h}'"
    prev_attr = "" if previd is None else f" previd='{previd}'"
    c.send(f"<resume xmlns='{ns}'{prev_attr}{h_attr}/>")
    resp = c.read_until(r"<resumed\b[^>]*/>|" + FAILED)
    return c, resp


def wait_hibernating(server, user, resource="phone", timeout=10):
    """Until the server has noticed the dropped connection (the session is hibernating)."""
    lua = (f"local s = prosody.full_sessions['{user}@localhost/{resource}']; "
           "return s and (s.hibernating and 'hibernating' or 'live') or 'none'")
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = server.shell_result(lua)
        if state == "hibernating":
            return
        time.sleep(0.1)
    raise AssertionError(f"session of {user} not hibernating: {state}")


def stream_error(c, timeout=10):
    return c.read_until(r"</stream:error>", timeout)


# ---------------------------------------------------------------------------------------------------------- enable


def test_advertised_only_after_authentication(server):
    user = new_user(server)
    c = RawXMPP(server.c2s_port)
    features = c.open_stream()
    assert SM3 not in features and SM2 not in features
    features = authenticate(c, user, opened=True)
    assert f"<sm xmlns='{SM3}'" in features and f"<sm xmlns='{SM2}'" in features
    c.close()


def test_enable_before_authentication_is_refused(server):
    c = RawXMPP(server.c2s_port)
    c.open_stream()
    resp = enable(c)
    assert re.search(rf"<failed xmlns='{SM3}'><not-authorized xmlns='{STANZAS}'/></failed>", resp), resp
    c.close()


def test_enable_before_bind_and_twice_are_unexpected_requests(server):
    user = new_user(server)
    c = RawXMPP(server.c2s_port)
    authenticate(c, user)
    resp = enable(c)
    assert re.search(rf"<failed xmlns='{SM3}'><unexpected-request xmlns='{STANZAS}'/></failed>", resp), resp
    bind(c, "r1")
    assert "<enabled" in enable(c)
    resp = enable(c)
    assert re.search(rf"<failed xmlns='{SM3}'><unexpected-request xmlns='{STANZAS}'/></failed>", resp), resp
    c.close()


def test_enabled_ids_are_unpredictable_and_max_is_clamped(server):
    user = new_user(server)
    ids = set()
    for resource, extra, want_max in [("a", "resume='true'", HIBERNATION), ("b", "resume='1' max='1'", 2),
                                      ("c", "resume='true' max='99999'", HIBERNATION),
                                      ("d", "resume='true' max='2'", 2), ("e", "resume='true' max='junk'", HIBERNATION)]:
        c = sm_client(server, user, resource, extra=extra)
        assert c.sm["resume"] == "true"
        assert int(c.sm["max"]) == want_max, (extra, c.sm)
        assert len(c.sm["id"]) >= 22 and re.fullmatch(r"[A-Za-z0-9_-]+", c.sm["id"]), c.sm
        ids.add(c.sm["id"])
        c.close()
    assert len(ids) == 5
    c = sm_client(server, user, "f", extra="")
    assert "id" not in c.sm and "resume" not in c.sm and "max" not in c.sm
    c.close()


def test_sm2_namespace(server):
    user = new_user(server)
    c = sm_client(server, user, ns=SM2)
    c.send(f"<r xmlns='{SM2}'/>")
    assert re.search(rf"<a xmlns='{SM2}' h='0'/>|<a h='0' xmlns='{SM2}'/>", c.read_until(r"<a\b[^>]*/>"))
    c.close()


# ---------------------------------------------------------------------------------------------------------- counting


def test_r_answered_at_once_counting_only_stanzas(server):
    user = new_user(server)
    c = sm_client(server, user)
    c.send(f"<r xmlns='{SM3}'/>")
    assert attrs(c.read_until(r"<a\b[^>]*/>"))["h"] == "0"
    c.send("<presence/>")
    c.iq("p1", "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    c.send(f"<message to='{user}@localhost/nowhere' type='headline'><body>x</body></message>")
    c.send(f"<r xmlns='{SM3}'/>")  # nonzas are not counted
    c.send(f"<r xmlns='{SM3}'/>")
    first = attrs(c.read_until(r"<a\b[^>]*/>"))
    second = attrs(c.read_until(r"<a\b[^>]*/>"))
    assert first["h"] == "3" and second["h"] == "3"
    c.close()


def test_ack_of_more_than_sent_is_a_stream_error_with_handled_count_too_high(server):
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["one", "two"])
    read_messages(c, 2)
    c.send(f"<a xmlns='{SM3}' h='5'/>")
    err = stream_error(c)
    assert f"<undefined-condition xmlns='{STREAMS}'/>" in err, err
    hc = re.search(r"<handled-count-too-high\b[^>]*/>", err)
    assert hc and attrs(hc.group(0)) == {"xmlns": SM3, "h": "5", "send-count": "2"}, err
    sender.close()


@pytest.mark.parametrize("h", ["abc", "1e0", "-1", "0x1", "1.0", "4294967296", " 1", None])
def test_garbage_h_on_a_is_a_stream_error(server, h):
    user = new_user(server)
    c = sm_client(server, user)
    h_attr = "" if h is None else f" h='{h}'"
    c.send(f"<a xmlns='{SM3}'{h_attr}/>")
    err = stream_error(c)
    assert f"<invalid-xml xmlns='{STREAMS}'/>" in err, err


def test_ack_removes_exactly_the_acknowledged_stanzas(server):
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, [f"b{i}" for i in range(5)])
    read_messages(c, 5)
    c.send(f"<a xmlns='{SM3}' h='3'/>")
    c.send(f"<a xmlns='{SM3}' h='3'/>")  # the same h twice is fine
    c.send(f"<r xmlns='{SM3}'/>")
    c.read_until(r"<a\b[^>]*/>")
    previd = c.sm["id"]
    drop(c)
    wait_hibernating(server, user)
    r, resp = resume(server, user, previd, 3)
    assert "<resumed" in resp, resp
    replay = read_messages(r, 2)
    assert ">b3<" in replay[0] and ">b4<" in replay[1]
    r.close()
    sender.close()


# ---------------------------------------------------------------------------------------------------------- resume


def test_resume_replays_in_order_with_delay_and_carries_counters(server):
    user = new_user(server)
    c = sm_client(server, user)
    c.send("<presence/>")
    c.iq("p1", "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    sender = RawXMPP(server.c2s_port)
    sender.login(new_user(server, "s"), "pass")
    send_chat(sender, c.jid, ["one", "two"])
    read_messages(c, 2)
    previd = c.sm["id"]
    drop(c)
    wait_hibernating(server, user)
    send_chat(sender, c.jid, ["three", "four"], "late")
    time.sleep(0.3)
    r, resp = resume(server, user, previd, 0)
    resumed = attrs(re.search(r"<resumed\b[^>]*/>", resp).group(0))
    assert resumed["previd"] == previd
    assert resumed["h"] == "2"  # presence + ping counted before the drop
    # the unacknowledged messages (and the ping result, not a message) come back in order
    got = r.read_until(r"late1.*?</message>")
    bodies = re.findall(r"<body>([^<]*)</body>", got)
    assert bodies == ["one", "two", "three", "four"], got
    for m in re.findall(r"<message\b.*?</message>", got):
        assert re.search(r"<delay xmlns='urn:xmpp:delay'[^>]*stamp='\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ'", m) or \
            re.search(r"<delay[^>]*xmlns='urn:xmpp:delay'", m), m
    # the server asks for an ack right after the replay; the client's counter goes on from h=2
    r.read_until(rf"<r xmlns='{SM3}'/>")
    r.send("<presence/>")
    r.send(f"<r xmlns='{SM3}'/>")
    assert attrs(r.read_until(r"<a\b[^>]*/>"))["h"] == "3"
    r.close()
    sender.close()


def test_resume_unknown_previd_is_item_not_found_and_bind_still_works(server):
    user = new_user(server)
    c, resp = resume(server, user, "no-such-session", 0)
    assert re.search(rf"<failed xmlns='{SM3}'><item-not-found xmlns='{STANZAS}'/></failed>", resp), resp
    assert bind(c, "after").endswith("/after")
    assert "<enabled" in enable(c)
    c.close()


@pytest.mark.parametrize("previd,h", [(None, "0"), ("ID", None), ("ID", "x"), ("ID", "-1"), ("ID", "1e3"),
                                      ("ID", "4294967296"), ("", "0")])
def test_resume_with_missing_or_garbage_attributes_is_bad_request_and_leaves_the_session(server, previd, h):
    user = new_user(server)
    c = sm_client(server, user)
    previd_value = c.sm["id"] if previd == "ID" else previd
    drop(c)
    wait_hibernating(server, user)
    bad, resp = resume(server, user, previd_value, h)
    assert re.search(rf"<failed xmlns='{SM3}'><bad-request xmlns='{STANZAS}'/></failed>", resp), resp
    bad.close()
    good, resp = resume(server, user, c.sm["id"], 0)
    assert "<resumed" in resp, resp
    good.close()


def test_resume_with_h_too_high_fails_and_keeps_the_expiry_timer(prosody_factory):
    server = smacks_server(prosody_factory)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["one"])
    read_messages(c, 1)
    previd = c.sm["id"]
    drop(c)
    wait_hibernating(server, user)
    t0 = time.monotonic()
    bad, resp = resume(server, user, previd, 7)
    assert re.search(rf"<undefined-condition xmlns='{STANZAS}'/>", resp), resp
    hc = re.search(r"<handled-count-too-high\b[^>]*/>", resp)
    assert hc and attrs(hc.group(0))["h"] == "7" and attrs(hc.group(0))["send-count"] == "1", resp
    # the hibernating session was not touched: it can still be resumed with a correct h...
    assert wait_hibernating(server, user) is None
    bad.close()
    # ... and it still expires on time: afterwards the id is unknown, with the last h
    deadline = t0 + HIBERNATION + 5
    while time.monotonic() < deadline:
        state = server.shell_result("local s = prosody.full_sessions['%s@localhost/phone']; return s and 'alive' or 'gone'" % user)
        if state == "gone":
            break
        time.sleep(0.2)
    assert state == "gone", "the hibernating session never expired"
    late, resp = resume(server, user, previd, 1)
    assert re.search(rf"<failed xmlns='{SM3}' h='0'><item-not-found xmlns='{STANZAS}'/></failed>|"
                     rf"<failed h='0' xmlns='{SM3}'><item-not-found xmlns='{STANZAS}'/></failed>", resp), resp
    late.close()
    sender.close()


def test_resume_while_old_connection_open_sends_conflict_to_it(server):
    user = new_user(server)
    c = sm_client(server, user)
    r, resp = resume(server, user, c.sm["id"], 0)
    assert "<resumed" in resp, resp
    err = stream_error(c)
    assert f"<conflict xmlns='{STREAMS}'/>" in err, err
    r.send(f"<r xmlns='{SM3}'/>")
    assert attrs(r.read_until(r"<a\b[^>]*/>"))["h"] == "0"
    r.close()


def test_resume_after_bind_is_unexpected(server):
    user = new_user(server)
    c = sm_client(server, user)
    other = RawXMPP(server.c2s_port)
    other.login(user, "pass", "other")
    other.send(f"<resume xmlns='{SM3}' previd='{c.sm['id']}' h='0'/>")
    resp = other.read_until(FAILED)
    assert f"<unexpected-request xmlns='{STANZAS}'/>" in resp, resp
    other.close()
    c.close()


def test_resume_of_another_users_session_is_item_not_found(server):
    owner, thief = new_user(server), new_user(server)
    c = sm_client(server, owner)
    drop(c)
    wait_hibernating(server, owner)
    t, resp = resume(server, thief, c.sm["id"], 0)
    assert "<item-not-found" in resp and "<resumed" not in resp, resp
    t.close()
    r, resp = resume(server, owner, c.sm["id"], 0)
    assert "<resumed" in resp
    r.close()


def test_clean_close_sends_final_ack_and_ends_the_session(server):
    user = new_user(server)
    c = sm_client(server, user)
    c.send("<presence/>")
    c.send(f"<r xmlns='{SM3}'/>")
    c.read_until(r"<a\b[^>]*/>")
    c.send("</stream:stream>")
    tail = c.read_until(r"</stream:stream>")
    assert re.search(rf"<a xmlns='{SM3}' h='1'/>\s*</stream:stream>$|<a h='1' xmlns='{SM3}'/>\s*</stream:stream>$", tail), tail
    c.sock.close()
    r, resp = resume(server, user, c.sm["id"], 0)
    assert "<item-not-found" in resp, resp
    r.close()


def test_h_wraps_at_2_32(prosody_factory):
    server = smacks_server(prosody_factory, smacks_debug_initial_h=4294967294)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["w1", "w2", "w3"])
    read_messages(c, 3)
    c.send(f"<a xmlns='{SM3}' h='4294967295'/>")  # w1
    c.send("<presence/>")
    c.send("<presence/>")
    c.send("<presence/>")
    c.send(f"<r xmlns='{SM3}'/>")
    assert attrs(c.read_until(r"<a\b[^>]*/>"))["h"] == "1"  # 4294967294 + 3, mod 2^32
    previd = c.sm["id"]
    drop(c)
    wait_hibernating(server, user)
    r, resp = resume(server, user, previd, 0)  # w2 (h=0) acknowledged, w3 (h=1) replayed
    assert "<resumed" in resp, resp
    assert attrs(re.search(r"<resumed\b[^>]*/>", resp).group(0))["h"] == "1"
    got = r.read_until(r"w3.*?</message>")
    assert "w2" not in got
    r.close()
    sender.close()


def test_ack_timeout_moves_a_dead_link_to_hibernation(prosody_factory):
    server = smacks_server(prosody_factory, smacks_ack_timeout=1)
    user, c, sender = client_and_sender(server)
    send_chat(sender, c.jid, ["ping?"])
    read_messages(c, 1)
    c.read_until(rf"<r xmlns='{SM3}'/>")
    # never answer: the server gives up on the link after ~1 s and the session hibernates
    wait_hibernating(server, user, timeout=6)
    r, resp = resume(server, user, c.sm["id"], 0)
    assert "<resumed" in resp, resp
    assert "ping?" in r.read_until(r"</message>")
    r.close()
    sender.close()


# ---------------------------------------------------------------------------------------------------------- loading


def wait_log(server, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log_text()
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never logged:\n{server.log_text()[-3000:]}")


def test_refuses_to_load_next_to_core_mod_smacks(prosody_factory):
    server = prosody_factory(modules=["native_smacks"])  # core smacks still enabled
    wait_log(server, 'put "smacks" in modules_disabled')
    # whichever of the two loaded first, only core mod_smacks remains on the host
    deadline = time.monotonic() + 5
    while server.shell_result("return require'core.modulemanager'.is_loaded('localhost', 'native_smacks') and 'yes' or 'no'") != "no":
        assert time.monotonic() < deadline, "mod_native_smacks still loaded next to mod_smacks"
        time.sleep(0.1)
    assert server.shell_result("return require'core.modulemanager'.is_loaded('localhost', 'smacks') and 'yes' or 'no'") == "yes"
    # core mod_smacks keeps serving the stream, untouched
    user = new_user(server)
    c = sm_client(server, user)
    c.close()


@pytest.mark.parametrize("option,value", [
    ("smacks_max_queue_size", 0), ("smacks_hibernation_time", "soon"), ("smacks_min_hibernation_time", 1000),
    ("smacks_max_ack_delay", -1), ("smacks_ack_timeout", "x"), ("smacks_max_hibernated_sessions", 1.5),
    ("smacks_enabled_s2s", "yes"), ("smacks_debug_initial_h", 4294967296), ("smacks_max_old_sessions", -2),
    ("smacks_old_sessions_ttl", 0), ("smacks_offline_retries", "many"), ("smacks_s2s_resend", 1),
    ("smacks_max_unacked_stanzas", -1), ("smacks_max_inactive_unacked_stanzas", 0.5),
])
def test_bad_option_values_are_refused_with_their_name(prosody_factory, option, value):
    server = prosody_factory(global_options={option: value}, **SMACKS)
    wait_log(server, f"option '{option}' must be")
    # and stream management is not offered
    c = RawXMPP(server.c2s_port)
    features = authenticate(c, new_user(server))
    assert SM3 not in features
    c.close()


def test_expired_ids_are_remembered_for_a_bounded_time(prosody_factory):
    server = smacks_server(prosody_factory, smacks_hibernation_time=1, smacks_min_hibernation_time=1,
                           smacks_old_sessions_ttl=4)
    user = new_user(server)
    c = sm_client(server, user)
    c.send("<presence/>")
    c.send(f"<r xmlns='{SM3}'/>")
    c.read_until(r"<a\b[^>]*/>")
    drop(c)
    deadline = time.monotonic() + 10
    while server.shell_result("return prosody.full_sessions['%s@localhost/phone'] and 'here' or 'gone'" % user) != "gone":
        assert time.monotonic() < deadline, "never expired"
        time.sleep(0.1)
    expired_at = time.monotonic()
    r, resp = resume(server, user, c.sm["id"], 0)
    assert re.search(r"<failed\b[^>]*\bh='1'", resp) and "<item-not-found" in resp, resp
    r.close()
    # the record outlives a failed resume (mod_smacks forgets it at once) ...
    r, resp = resume(server, user, c.sm["id"], 0)
    assert re.search(r"<failed\b[^>]*\bh='1'", resp), resp
    r.close()
    # ... but not smacks_old_sessions_ttl
    time.sleep(max(0, expired_at + 5.5 - time.monotonic()))
    r, resp = resume(server, user, c.sm["id"], 0)
    assert re.search(rf"<failed xmlns='{SM3}'><item-not-found xmlns='{STANZAS}'/></failed>", resp), resp
    r.close()


# ---------------------------------------------------------------------------------------------------------- queue bounds


def held(server, user, resource="phone"):
    return int(server.shell_result(f"local s = prosody.full_sessions['{user}@localhost/{resource}']; "
                                   "return s.outgoing_stanza_queue.q:count()"))


def offline(server, user):
    text = server.shell_result(
        "local out = {}; for _, item in require'core.storagemanager'.open('localhost', 'offline', 'archive'):find(%s) "
        "do out[#out+1] = item:get_child_text('body') end; return table.concat(out, ' ')" % harness.lua_string(user))
    return text.split()


def wait_offline(server, user, n, timeout=10):
    deadline = time.monotonic() + timeout
    got = offline(server, user)
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.1)
        got = offline(server, user)
    return got


def test_a_connected_burst_past_the_queue_size_is_held_until_hibernation(prosody_factory):
    server = smacks_server(prosody_factory, smacks_max_queue_size=3, smacks_hibernation_time=30)
    user, c, sender = client_and_sender(server)
    send_chat(sender, f"{user}@localhost/phone", [f"b{i}" for i in range(10)])
    read_messages(c, 10)  # all written and received; the client acknowledges none yet
    assert held(server, user) == 10
    assert offline(server, user) == []  # nothing went through the expiry policy while connected
    drop(c)
    wait_hibernating(server, user)
    # hibernating, the session is held to smacks_max_queue_size: the 7 oldest go through the policy now
    assert wait_offline(server, user, 7) == [f"b{i}" for i in range(7)]
    assert held(server, user) == 3
    sender.close()


def test_a_client_that_never_acknowledges_a_live_queue_is_disconnected(prosody_factory):
    server = smacks_server(prosody_factory, smacks_max_queue_size=2, smacks_hibernation_time=30)
    user, c, sender = client_and_sender(server)
    send_chat(sender, f"{user}@localhost/phone", [f"n{i}" for i in range(10)])
    # a connected queue holds four times smacks_max_queue_size (8): the 2 oldest go through the policy, and the
    # connection is closed so that the client resumes (acknowledging what it got) or its session ends
    wait_hibernating(server, user)
    assert server.log_text().count("Stream management queue full (8), handing the oldest unacked stanza") == 2
    # hibernating, it is held to smacks_max_queue_size: n8 and n9 stay for resumption, n2..n7 follow n0 and n1
    assert held(server, user) == 2
    assert wait_offline(server, user, 8) == [f"n{i}" for i in range(8)]
    sender.close()
