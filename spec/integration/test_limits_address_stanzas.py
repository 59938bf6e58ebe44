"""mod_native_limits: the per-address stanza budget (native_limits_stanzas), which every session checks through a
handle bound once per session (lim:handle). Two sessions of one address share it, another address has its own, a
config reload's new rate reaches sessions already open, and a module reload (new table handle) keeps working.
Raw TCP clients at non-loopback addresses of a loopback-routed /24 (the fixture of test_limits_prefixes, needs root).
"""

from test_limits_helpers import advance, decisions, limits_server, ping, reconfigure
from test_limits_prefixes import From, prefixes  # noqa: F401  (prefixes is a fixture)


def test_sessions_of_one_address_share_its_stanza_budget(prosody_factory, prefixes):  # noqa: F811
    p = prefixes
    v4, s4 = p["v4"], p["server4"]
    srv = limits_server(prosody_factory, exempt_loopback=True, global_options={"interfaces": ["127.0.0.1", s4]},
                        host_options={"native_limits_stanzas": {"address": "1/10min burst 5"},
                                      "native_limits_session_stanzas": False, "native_limits_max_delay": 0,
                                      "native_limits_stanza_close_after": 100, "native_limits_connections": False})
    a, b, other = (From(srv, f"{v4}.{n}", s4) for n in (50, 50, 51))
    for c in (a, b, other):
        assert c.login()[0] == "ok"
    # five stanzas between a and b (resource binding is not counted), then both are refused
    got = [ping(a, 1), ping(a, 2), ping(b, 3), ping(b, 4), ping(a, 5), ping(b, 6), ping(a, 60)]
    assert got == ["ok", "ok", "ok", "ok", "ok", "refused", "refused"], got
    assert ping(other, 61) == "ok"  # another address: its own budget
    assert decisions(srv, "stanzas", "refuse") == 2
    # a config reload with a bigger burst reaches the open sessions' handles at once
    reconfigure(srv, r'native_limits_stanzas = \{ address = "1/10min burst 5" \}',
                'native_limits_stanzas = { address = "1/10min burst 8" }')
    assert [ping(b, 7), ping(a, 8), ping(b, 9), ping(a, 10)] == ["ok", "ok", "ok", "refused"]
    # a module reload keeps the table (state) and the sessions keep being limited
    srv.shell('module:reload("native_limits", "localhost")')
    assert ping(a, 11) == "refused" and ping(b, 12) == "refused"
    assert decisions(srv, "stanzas", "refuse") >= 4
    for c in (a, b, other):
        c.close()


def test_a_reloaded_max_delay_reaches_open_sessions(prosody_factory, prefixes):  # noqa: F811
    """Each session's handle is bound to native_limits_max_delay; a config reload must rebind it."""
    p = prefixes
    v4, s4 = p["v4"], p["server4"]
    srv = limits_server(prosody_factory, exempt_loopback=True, global_options={"interfaces": ["127.0.0.1", s4]},
                        host_options={"native_limits_stanzas": {"address": "1/min burst 2"},
                                      "native_limits_session_stanzas": False, "native_limits_max_delay": 0,
                                      "native_limits_stanza_close_after": 100, "native_limits_connections": False})
    c = From(srv, f"{v4}.60", s4)
    assert c.login()[0] == "ok"
    assert [ping(c, 1), ping(c, 2), ping(c, 3)] == ["ok", "ok", "refused"]  # no wait accepted
    reconfigure(srv, "native_limits_max_delay = 0", "native_limits_max_delay = 5")
    advance(srv, 58)  # the next token is 2 s away: within the new max_delay, not the old one
    assert ping(c, 4) == "ok"
    assert decisions(srv, "stanzas", "delay") == 1 and decisions(srv, "stanzas", "refuse") == 1
    c.close()
