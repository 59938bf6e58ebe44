"""mod_native_limits on an anonymous VirtualHost, against a real Prosody with raw-socket clients.

Every limit here is set so that only simulated time (advance()) refills it within a spec's lifetime: rates are per
day or per ten minutes, and the specs advance the limiter clock to show refills, ban expiry and backoff.
"""

import re
import time

from test_limits_helpers import (MUC_HOST, Anon, advance, all_decisions, decisions, expect_stream_error, limits_server,
                                 metrics, ping, reconfigure)

OFF = {"address": False, "ipv6/64": False, "ipv6/48": False, "ipv4/24": False, "global": False}


def only(**levels):
    d = dict(OFF)
    d.update(levels)
    return d


def test_login_rate_refuse_close_then_ban_and_backoff(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_logins": only(address="3/10min"),
        "native_limits_connections": False,
        "native_limits_max_delay": 0,
        "native_limits_close_after": 3,
    })
    for _ in range(3):
        c = Anon(srv)
        assert c.login()[0] == "ok"
        c.close()
    # over the limit: SASL temporary-auth-failure with a text, twice, then the stream is closed
    c = Anon(srv)
    assert c.open()[0] == "ok"
    kind, text = c.auth()
    assert kind == "failure"
    assert "<temporary-auth-failure/>" in text and "Too many logins from your network; try again in" in text
    assert c.auth()[0] == "failure"
    kind, text = c.auth()
    assert kind == "stream-error"
    expect_stream_error(text, contains="Too many refused logins")
    c.close()
    assert decisions(srv, "logins", "refuse") == 3
    assert decisions(srv, "logins", "close") == 1
    # three strikes: the address is banned, refused at stream open with the ban's remaining time
    assert decisions(srv, "logins", "ban") == 1
    c = Anon(srv)
    kind, text = c.open()
    assert kind == "stream-error"
    expect_stream_error(text, contains="try again in 300 seconds")
    c.close()
    top = srv.shell("limits:top()")
    assert re.search(r"127\.0\.0\.1\s+level 1 .*banned 300s", top), top
    # the ban expires; the login budget has refilled meanwhile (3 per 10 min)
    advance(srv, 601)
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.close()
    # a repeat offence earns twice the ban
    for _ in range(2):
        c = Anon(srv)
        c.login()
        c.close()
    c = Anon(srv)
    c.open()
    for _ in range(3):
        c.auth()
    c.close()
    c = Anon(srv)
    kind, text = c.open()
    expect_stream_error(text, contains="try again in 600 seconds")
    c.close()


def test_connection_rate_and_shell_unban_reset(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_connections": only(address="2/10min"),
        "native_limits_logins": False,
        "native_limits_max_delay": 0,
    })
    for _ in range(2):
        c = Anon(srv)
        assert c.open()[0] == "ok"
        c.close()
    c = Anon(srv)
    kind, text = c.open()
    expect_stream_error(text, contains="Too many connections from your network; try again in 300 seconds")
    c.close()
    assert decisions(srv, "connections", "refuse") == 1
    show = srv.shell('limits:show("127.0.0.1")')
    assert "localhost: 127.0.0.1 not banned" in show, show
    assert re.search(r"connections\s+127\.0\.0\.1\s+0\.0 of 2 left", show), show
    # an operator ban of the /8, then unban; a reset gives the budget back
    assert "Banned 127.0.0.0/8 on 1 host(s)" in srv.shell('limits:ban("127.0.0.0/8", "1h", "localhost")')
    c = Anon(srv)
    kind, text = c.open()
    expect_stream_error(text, contains="try again in 3600 seconds")
    c.close()
    assert "Unbanned 127.0.0.0/8" in srv.shell('limits:unban("127.0.0.0/8")')
    c = Anon(srv)
    kind, text = c.open()
    expect_stream_error(text, contains="Too many connections")  # not banned, still over budget
    c.close()
    assert "Reset 127.0.0.1" in srv.shell('limits:reset("127.0.0.1")')
    c = Anon(srv)
    assert c.open()[0] == "ok"
    c.close()
    res = srv.prosodyctl("shell", 'limits:ban("not-an-address")', check=False)
    assert res.returncode != 0
    assert b'"not-an-address" is not an IP address or CIDR prefix' in res.stderr, res.stderr


def test_dry_run_counts_and_never_enforces(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_dry_run": True,
        "native_limits_logins": only(address="1/10min"),
        "native_limits_connections": only(address="1/10min"),
        "native_limits_max_sessions": only(address=1),
    })
    clients = []
    for _ in range(4):
        c = Anon(srv)
        assert c.login()[0] == "ok"
        clients.append(c)
    d = all_decisions(srv)
    assert d.get(("logins", "refuse", "dry_run")) == 3, d
    assert d.get(("connections", "refuse", "dry_run")) == 3, d
    assert d.get(("max_sessions", "refuse", "dry_run")) == 3, d
    assert not [k for k in d if k[2] == "enforce"], d
    # six strikes: the third would have banned the address; the others fell in that ban and only count, so
    # neither a second ban nor a strike against its /24
    assert d.get(("connections", "ban", "dry_run"), 0) + d.get(("logins", "ban", "dry_run"), 0) == 1, d
    assert "127.0.0.1 banned" in srv.shell('limits:show("127.0.0.1")')
    assert "127.0.0.9 not banned" in srv.shell('limits:show("127.0.0.9")')
    for c in clients:
        c.close()
    # one summary line per interval (1 s here), not one per event
    deadline = time.monotonic() + 15
    while "[dry run] Last 1s: " not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    summary = [line for line in srv.log_text().splitlines() if "[dry run] Last 1s: " in line]
    assert summary and "logins refuse: 3" in summary[0] and "top offender 127.0.0.1" in summary[0], summary
    # enforcing from now on: what the dry run only simulated is forgotten, not enforced at once
    reconfigure(srv, "native_limits_dry_run = true", "native_limits_dry_run = false")
    assert "127.0.0.1 not banned" in srv.shell('limits:show("127.0.0.1")')
    assert "Dry run over: forgot 2 simulated offender entries" in srv.log_text()  # the address and its /24


def test_loopback_is_exempt_by_default(prosody_factory):
    srv = limits_server(prosody_factory, exempt_loopback=True, host_options={
        "native_limits_logins": only(address="1/10min"),
        "native_limits_connections": only(address="1/10min"),
    })
    for _ in range(3):
        c = Anon(srv)
        assert c.login()[0] == "ok"
        c.close()
    assert all_decisions(srv) == {}
    m = [v for (name, labels), v in metrics(srv).items()
         if name == "prosody_mod_native_limits__exempt_sessions_total" and ("reason", "loopback") in labels]
    assert m and m[0] >= 3


def test_exempt_cidr_list(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_exempt": ["127.0.0.0/8"],
        "native_limits_logins": only(address="1/10min"),
    })
    for _ in range(3):
        c = Anon(srv)
        assert c.login()[0] == "ok"
        c.close()
    assert all_decisions(srv) == {}


def test_a_reloaded_exempt_list_reaches_open_sessions(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_exempt": ["192.0.2.0/24"],
        "native_limits_stanzas": {"address": "1/10min burst 2"},
        "native_limits_session_stanzas": False,
        "native_limits_max_delay": 0,
        "native_limits_stanza_close_after": 100,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"

    def exempt(listed):
        reconfigure(srv, r'native_limits_exempt = \{[^}]*\}',
                    'native_limits_exempt = { %s }' % ", ".join(f'"{p}"' for p in listed))

    assert [ping(c, 1), ping(c, 2), ping(c, 3)] == ["ok", "ok", "refused"]
    exempt(["192.0.2.0/24", "127.0.0.0/8"])
    assert [ping(c, 4), ping(c, 5), ping(c, 6)] == ["ok", "ok", "ok"]  # exempt from now on
    exempt(["192.0.2.0/24"])
    assert ping(c, 7) == "refused"  # limited again, its spent budget remembered
    assert decisions(srv, "stanzas", "refuse") == 2
    c.close()


def test_concurrent_sessions_per_address(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_max_sessions": only(address=2),
        "smacks_hibernation_time": 1,
    })
    a, b = Anon(srv), Anon(srv)
    assert a.login()[0] == "ok"
    assert b.login()[0] == "ok"
    c = Anon(srv)
    assert c.open()[0] == "ok"
    assert c.auth()[0] == "success"
    kind, text = c.bind()
    assert kind == "error"
    assert "<resource-constraint" in text and "type='wait'" in text and "Too many sessions from your network" in text
    c.close()
    srv.shell('module:reload("native_limits", "localhost")')  # the open sessions still count
    c = Anon(srv)
    assert c.open()[0] == "ok" and c.auth()[0] == "success"
    assert "Too many sessions from your network" in c.bind()[1]
    c.close()
    a.close()
    d = Anon(srv)
    for _ in range(50):  # a's unbind is processed asynchronously after its stream closes
        kind, text = d.login()
        if kind == "ok":
            break
        d.close()
        d = Anon(srv)
    assert kind == "ok", text
    assert decisions(srv, "max_sessions", "refuse") >= 1
    b.close()
    d.close()


def test_unauthenticated_connections_per_address(prosody_factory):
    srv = limits_server(prosody_factory, host_options={"native_limits_max_unauthenticated": only(address=2)})
    a, b = Anon(srv), Anon(srv)
    assert a.open()[0] == "ok" and b.open()[0] == "ok"
    c = Anon(srv)
    kind, text = c.open()
    expect_stream_error(text, contains="Too many unauthenticated connections from your address")
    c.close()
    assert a.auth()[0] == "success"  # authenticated sessions no longer count
    c = Anon(srv)
    assert c.open()[0] == "ok"
    for x in (a, b, c):
        x.close()


def test_stanza_rate_refuse_then_close_then_strike(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": "1/10min burst 5",
        "native_limits_stanzas": False,
        "native_limits_max_delay": 0,
        "native_limits_stanza_close_after": 3,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"
    replies = []
    for i in range(12):
        try:
            c.send(f"<iq type='get' id='p{i}' to='{c.domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
            replies.append(c.read_until(r"<iq[^>]*id=['\"]p%d['\"][^>]*(?:/>|>.*?</iq>)|</stream:error>" % i))
        except (ConnectionError, OSError):
            break
        if "</stream:error>" in replies[-1]:
            break
    results = [r for r in replies if "type='result'" in r]
    refused = [r for r in replies if "type='error'" in r and "<policy-violation" in r]
    assert len(results) >= 3, replies
    assert len(refused) == 2, replies
    assert "You are sending too fast; slow down" in refused[0]
    expect_stream_error(replies[-1], contains="Too many stanzas; slow down")
    c.close()
    assert decisions(srv, "session_stanzas", "refuse") == 3
    assert decisions(srv, "session_stanzas", "close") == 1
    assert "strikes 1.00" in srv.shell('limits:show("127.0.0.1")')


def test_stanza_delay_answers_everything(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": "20/s burst 1",
        "native_limits_stanzas": False,
        "native_limits_max_delay": 2,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.send("".join(f"<iq type='get' id='d{i}' to='{c.domain}'><ping xmlns='urn:xmpp:ping'/></iq>" for i in range(10)))
    text = c.read_until(r"<iq[^>]*id=['\"]d9['\"][^>]*(?:/>|>.*?</iq>)", timeout=15)
    assert text.count("type='result'") == 10, text
    assert "policy-violation" not in text
    assert decisions(srv, "session_stanzas", "delay") >= 1
    assert decisions(srv, "session_stanzas", "refuse") == 0
    c.close()


def test_a_session_gone_during_a_delay_is_left_alone(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": "1/s burst 1",
        "native_limits_stanzas": False,
        "native_limits_max_delay": 2,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.send("".join(f"<iq type='get' id='g{i}' to='{c.domain}'><ping xmlns='urn:xmpp:ping'/></iq>" for i in range(3)))
    c.read_until(r"<iq[^>]*id=['\"]g0['\"]")
    c.close()  # while the second ping waits for its slot
    time.sleep(2.5)
    assert decisions(srv, "session_stanzas", "delay") >= 1
    assert "Traceback" not in srv.log_text()
    assert Anon(srv).login()[0] == "ok"  # and the server carries on


def test_bad_options_are_named(prosody_factory):
    for option, value, message in [
        ("native_limits_logins", {"address": "lots"}, "option 'native_limits_logins[address]' must be a rate"),
        ("native_limits_logins", {"ipv4/33": "1/s"}, "option 'native_limits_logins' must be keyed by"),
        ("native_limits_max_sessions", {"address": 0}, "option 'native_limits_max_sessions[address]' must be a positive"),
        ("native_limits_dry_run", "yes", "option 'native_limits_dry_run' must be true or false"),
        ("native_limits_ban_initial", "soon", "option 'native_limits_ban_initial' must be a duration"),
        ("native_limits_exempt", ["10.0.0.0/33"], "option 'native_limits_exempt' must be a list of IP addresses"),
        ("native_limits_session_stanzas", "fast", "option 'native_limits_session_stanzas' must be a rate"),
        ("native_limits_stanzas", {f"ipv6/{n}": "9/s" for n in range(40, 49)},
         "option 'native_limits_stanzas' must be at most 8 levels"),
    ]:
        srv = limits_server(prosody_factory, host_options={option: value})
        srv.shell(">1")  # the admin shell answers once every host's modules have loaded
        log = srv.log_text()
        assert "Error initializing module 'native_limits' on 'localhost': " + message in log, (option, log[-3000:])
        assert "Limits active" not in log, option
        srv.stop()


def test_bans_survive_a_module_reload_and_config_reload_applies_new_limits(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_connections": only(address="1/10min"),
        "native_limits_logins": False,
    })
    assert "Banned 198.51.100.0/24" in srv.shell('limits:ban("198.51.100.0/24", 900)')
    c = Anon(srv)
    assert c.open()[0] == "ok"
    c.close()
    c = Anon(srv)
    expect_stream_error(c.open()[1], contains="Too many connections")
    c.close()
    srv.shell('module:reload("native_limits", "localhost")')
    assert re.search(r"198\.51\.100\.0/24\s+level 0 .*banned (\d+)s", srv.shell("limits:top()"))
    c = Anon(srv)
    expect_stream_error(c.open()[1], contains="Too many connections")  # rate state kept too
    c.close()
    # a config reload with a bigger budget takes effect at once, state kept
    cfg = srv.config_path.read_text().replace('native_limits_connections = { address = "1/10min"',
                                              'native_limits_connections = { address = "6/10min burst 10"')
    assert "6/10min burst 10" in cfg
    srv.config_path.write_text(cfg)
    srv.shell("config:reload()")
    c = Anon(srv)
    assert c.open()[0] == "ok"
    c.close()
    assert "Limits reloaded" in srv.log_text()


def test_a_config_reload_applies_a_new_table_size_and_ban_options_keeping_bans(prosody_factory):
    srv = limits_server(prosody_factory, host_options={"native_limits_capacity": 1024, "native_limits_ban_initial": 300})
    srv.shell('limits:ban("198.51.100.7")')
    assert "198.51.100.7 banned 300s" in srv.shell('limits:show("198.51.100.7")')
    reconfigure(srv, "native_limits_capacity = 1024", "native_limits_capacity = 4096")
    reconfigure(srv, "native_limits_ban_initial = 300", "native_limits_ban_initial = 600")
    assert "New limiter table (4096 entries" in srv.log_text()
    assert re.search(r"198\.51\.100\.7 banned (29\d|300)s", srv.shell('limits:show("198.51.100.7")'))  # kept
    srv.shell('limits:ban("198.51.100.8")')
    assert "198.51.100.8 banned 600s" in srv.shell('limits:show("198.51.100.8")')  # the new first ban
    gauges = {name: v for (name, labels), v in metrics(srv).items() if dict(labels).get("host") == "localhost"}
    assert gauges["prosody_mod_native_limits__table_capacity"] == 4096, gauges


def test_eviction_counters_survive_a_module_reload(prosody_factory):
    srv = limits_server(prosody_factory, host_options={"native_limits_capacity": 64})
    evict = ("local l = prosody.hosts['localhost'].modules.native_limits.module.limiter; "
             "local r = l:rule('flood', { { family = 'ipv4', rate = 1, burst = 5 } }); "
             "for i = 1, 2000 do l:check(r, string.pack('>I4I4I4I4', 0, 0, 0xffff, 0x0a000000 + i)) end; return 'done'")
    assert srv.shell_result(evict) == "done"

    def evictions():
        return sum(v for (name, labels), v in metrics(srv).items() if name == "prosody_mod_native_limits__evictions_total")

    before = evictions()
    assert before >= 2000 - 64
    srv.shell('module:reload("native_limits", "localhost")')
    assert evictions() == before  # the table and its totals are kept: nothing new to add


def test_config_reload_reaches_the_budgets_of_open_sessions(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": "1/10min burst 10",
        "native_limits_session_iqs": "1/10min burst 10",
        "native_limits_stanzas": False,
        "native_limits_max_delay": 0,
        "native_limits_stanza_close_after": 100,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"

    assert [ping(c, 1), ping(c, 2)] == ["ok", "ok"]
    for option, smaller in (("native_limits_session_stanzas", "1/10min burst 3"),
                            ("native_limits_session_iqs", "1/10min burst 5")):
        cfg = reconfigure(srv, r'(%s = )"1/10min burst 10"' % option, r'\1"%s"' % smaller)
        # the session's bucket takes the new rate and burst and keeps what it spent (two of the session's, four
        # of its iq budget by the second round): one more, then refused
        assert [ping(c, 3), ping(c, 4)] == ["ok", "refused"], option
        # back to 10: the session may send again
        srv.config_path.write_text(cfg)
        srv.shell("config:reload()")
        assert ping(c, 5) == "ok", option
    assert decisions(srv, "session_stanzas", "refuse") == 1
    assert decisions(srv, "session_iq", "refuse") == 1
    c.close()


def test_stanzas_to_staff_are_never_limited(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": "1/10min burst 2",
        "native_limits_staff": ["helpdesk@localhost"],
        "native_limits_max_delay": 0,
        "native_limits_stanza_close_after": 100,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"

    assert [ping(c, 1), ping(c, 2), ping(c, 3)] == ["ok", "ok", "refused"]
    # to the staff, bare or full, whatever the budget left (answered by the server); to anyone else, refused
    assert ping(c, 4, "helpdesk@localhost") == "ok"
    assert "<service-unavailable" in ping(c, 5, "helpdesk@localhost/desk")  # no such resource: not refused
    assert [ping(c, 6, "helpdesk@localhost.evil"), ping(c, 7, "other@localhost/helpdesk@localhost")] == ["refused"] * 2
    c.close()


def test_unsolicited_messages_staff_and_joined_rooms(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_unsolicited": "1/10min burst 2",
        "native_limits_staff": ["helpdesk@localhost"],
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"

    def send(to, n, mtype="chat"):
        c.send(f"<message to='{to}' type='{mtype}' id='u{n}'><body>hi</body></message>")

    def limited(n):
        # the refusal is an error reply with our text; anything else (the server's own answer or none) is not ours
        c.send(f"<iq type='get' id='sync{n}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        text = c.read_until(r"<iq[^>]*id=['\"]sync%d['\"][^>]*(?:/>|>.*?</iq>)" % n)
        return "Too many messages to people you have not talked to" in text

    # a joined room (directed presence) and listed staff are not strangers
    c.send(f"<presence to='room@{MUC_HOST}/me'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
    for i in range(4):
        send(f"room@{MUC_HOST}", i)
        send("helpdesk@localhost", 10 + i)
    assert not limited(1)
    send("stranger@localhost", 20)
    send("stranger@localhost", 21)
    assert not limited(2)
    send("other-stranger@localhost/res", 22)
    assert limited(3)
    assert decisions(srv, "unsolicited", "refuse") == 1
    c.close()


def test_per_kind_session_budgets(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_session_stanzas": False,
        "native_limits_stanzas": False,
        "native_limits_session_presences": "1/10min burst 2",
        "native_limits_max_delay": 0,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.send("<presence/><presence><status>2</status></presence><presence id='p3'><status>3</status></presence>")
    text = c.read_until(r"<presence[^>]*type=['\"]error['\"].*?</presence>")
    assert "id='p3'" in text and "<policy-violation" in text and "You are sending too fast" in text, text
    for i in range(5):  # iq has its own (unlimited) budget
        reply = c.iq(f"q{i}", f"<iq type='get' id='q{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert "type='result'" in reply
    assert decisions(srv, "session_presence", "refuse") == 1
    c.close()


def test_strict_profile_from_a_cidr_file(prosody_factory, tmp_path):
    listed = tmp_path / "tor-exits.txt"
    listed.write_text("# listed networks\n192.0.2.0/24\n127.0.0.0/8   # this test's clients\n\n2001:db8::/32\n")
    srv = limits_server(prosody_factory, host_options={
        "native_limits_strict_file": str(listed),
        "native_limits_logins": only(address="4/10min"),
        "native_limits_connections": False,
        "native_limits_max_delay": 0,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"
    c.close()
    c = Anon(srv)
    c.open()
    kind, text = c.auth()
    assert kind == "failure" and "Too many logins" in text, text  # a quarter of the budget: burst 1
    c.close()
    bad = tmp_path / "bad.txt"
    bad.write_text("10.0.0.0/8\nnot-a-prefix\n")
    srv2 = limits_server(prosody_factory, host_options={"native_limits_strict_file": str(bad)})
    assert "option 'native_limits_strict_file' must be a file of IP addresses or CIDR prefixes" in srv2.log_text()
    assert "bad.txt line 2: not-a-prefix" in srv2.log_text()


def test_a_reloaded_strict_list_reaches_open_sessions(prosody_factory, tmp_path):
    listed = tmp_path / "tor-exits.txt"
    listed.write_text("192.0.2.0/24\n")
    srv = limits_server(prosody_factory, host_options={
        "native_limits_strict_file": str(listed),
        "native_limits_stanzas": {"address": "1/10min burst 8"},  # strict (a quarter): burst 2
        "native_limits_session_stanzas": False,
        "native_limits_max_delay": 0,
        "native_limits_stanza_close_after": 100,
    })
    c = Anon(srv)
    assert c.login()[0] == "ok"

    assert [ping(c, 1), ping(c, 2), ping(c, 3)] == ["ok", "ok", "ok"]  # not listed: the full burst
    listed.write_text("192.0.2.0/24\n127.0.0.0/8\n")  # the client's network is listed now
    srv.shell("config:reload()")
    # the strict profile is a budget of its own (burst 2), which this session has not used yet
    assert [ping(c, 4), ping(c, 5), ping(c, 6)] == ["ok", "ok", "refused"]
    listed.write_text("192.0.2.0/24\n")  # unlisted again: back to the full budget, three of eight spent
    srv.shell("config:reload()")
    assert ping(c, 7) == "ok"
    assert decisions(srv, "stanzas", "refuse") == 1
    c.close()


def test_hibernated_sessions_count_towards_concurrency(prosody_factory):
    srv = limits_server(prosody_factory, host_options={
        "native_limits_max_sessions": only(address=1),
        "smacks_hibernation_time": 600,
    })
    a = Anon(srv)
    assert a.login()[0] == "ok"
    a.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    a.read_until(r"<enabled[^>]*/?>")
    a.sock.close()  # the connection drops without a goodbye: the session hibernates, still bound
    probe = ("(function() for _, s in pairs(prosody.full_sessions) do "
             "if s.hibernating and not s.conn then return 'hibernating' end end return 'none' end)()")
    deadline = time.monotonic() + 15
    while srv.shell_result(probe) != "hibernating":
        assert time.monotonic() < deadline, "the session never hibernated"
        time.sleep(0.1)
    b = Anon(srv)
    assert b.open()[0] == "ok" and b.auth()[0] == "success"
    kind, text = b.bind()
    assert kind == "error" and "<resource-constraint" in text, text
    b.close()
    assert decisions(srv, "max_sessions", "refuse") == 1
