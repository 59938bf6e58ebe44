"""Stream management on server-to-server streams: two real Prosody servers federating on loopback.

Server A serves `sma.dane.example` (s2s on 127.0.5.1), server B `smb.dane.example` (s2s on 127.0.5.2). Both resolve
each other through the local DNS test bed of the DANE specs (dnssec_testbed.py: nsd + unbound, SRV records with the
random s2s ports) and authenticate with certificates of the test PKI (TLS, SASL EXTERNAL). Certificates matter: in
Prosody 0.12 stream management is offered on s2s only in the stream features of an already authenticated stream, i.e.
after SASL EXTERNAL restarted the stream; a dialback-only link never gets SM (mod_smacks behaves the same).
alice@sma talks to bob@smb over c2s; everything between the servers is s2s.

Shown for mod_native_smacks and, where the behaviour is shared, for Prosody's own mod_smacks in the same scenario:
SM is enabled on both s2sout streams and acks flow (every <r/> and <a/> counted in each server's event stream); a
link that dies with unacknowledged stanzas bounces them (or re-routes them with `smacks_s2s_resend`), never drops
them silently; a peer that stops acknowledging has its stream closed after `smacks_ack_timeout` (what
mod_s2s_smacks_timeout does for mod_smacks; that module cannot load next to ours: it depends on "smacks").
"""

import os
import re
import signal
import time

import pytest

import dnssec_testbed as tb
import harness
from harness import RawXMPP


@pytest.fixture(autouse=True, scope="module")
def dns_test_bed_tools():
    missing = tb.tools_missing()
    assert not missing, f"DNS test bed tools missing: {missing} (make deps installs them)"


SM3 = "urn:xmpp:sm:3"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
A_HOST, B_HOST = "sma.dane.example", "smb.dane.example"
A_ADDR, B_ADDR = "127.0.5.1", "127.0.5.2"
S2S_SMACKS_TIMEOUT = "/usr/lib/prosody/modules/mod_s2s_smacks_timeout/mod_s2s_smacks_timeout.lua"

# Counts <r/> and <a/> seen by each host's stanza handlers (priority above the SM module's), by session type.
COUNTER = (
    ">rawset(_G, 'pn_sm', {}); "
    "for _, h in pairs(prosody.hosts) do for _, name in ipairs({'r', 'a', 'enable', 'enabled'}) do "
    "h.events.add_handler('stanza/" + SM3 + ":' .. name, function (e) "
    "local k = e.origin.type .. ':' .. name; _G.pn_sm[k] = (_G.pn_sm[k] or 0) + 1 end, 1000) end end"
)


class S2SProsody(harness.S2SProsody):
    """harness.S2SProsody with one extra VirtualHost and its clients."""

    def __init__(self, *, vhost, **kwargs):
        self.vhost = vhost
        super().__init__(vhosts=[vhost], **kwargs)

    def register_on_vhost(self, user):
        self.prosodyctl("register", user, self.vhost, "pass")

    def client(self, user, resource="c"):
        c = RawXMPP(self.c2s_port, domain=self.vhost)
        c.login(user, "pass", resource)
        c.send("<presence/>")
        return c


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    a_port, b_port = tb.free_port(), tb.free_port()
    while b_port == a_port:
        b_port = tb.free_port()
    bed = tb.DNSSECTestbed(tmp_path_factory.mktemp("smacks-s2s") / "dns")
    for label, addr, port in (("sma", A_ADDR, a_port), ("smb", B_ADDR, b_port)):
        bed.add(f"_xmpp-server._tcp.{label}", "SRV", f"0 0 {port} xmpp-{label}.dane.example.")
        bed.add(f"xmpp-{label}", "A", addr)
    bed.start()
    pki = tb.make_pki(tmp_path_factory.mktemp("smacks-s2s-pki"), ["*.dane.example", "dane.example"])
    try:
        yield {"bed": bed, "a_port": a_port, "b_port": b_port, "pki": pki}
    finally:
        bed.stop()


MODES = {
    "native": {"modules": ["tls", "dialback", "native_smacks"], "modules_disabled": ["smacks"]},
    "core": {"modules": ["tls", "dialback"], "modules_disabled": []},
}


@pytest.fixture
def pair(dns, request):
    """pair(mode, **options) -> (A, B), both started; stopped and removed at teardown."""
    made = []

    def make(mode="native", **options):
        unbound = {"resolvconf": False, "hoststxt": False, "forward": dns["bed"].resolver,
                   "trusted": dns["bed"].trust_anchor}
        g = {"unbound": unbound, "s2s_require_encryption": True, "s2s_secure_auth": False,
             "ssl": {"certificate": dns["pki"]["chain"], "key": dns["pki"]["key"], "cafile": dns["pki"]["root"]},
             "smacks_enabled_s2s": True, "s2s_close_timeout": 2}
        g.update(options)
        servers = []
        for name, port, addr, vhost in (("A", dns["a_port"], A_ADDR, A_HOST), ("B", dns["b_port"], B_ADDR, B_HOST)):
            srv = S2SProsody(name=f"sms2s-{mode}-{name}", s2s_port=port, s2s_interface=addr, vhost=vhost,
                             global_options=g, **MODES[mode])
            made.append(srv)
            servers.append(srv)
        for srv in servers:
            srv.start()
            srv.shell(COUNTER)
        return servers

    yield make
    for srv in made:
        if srv.pid:
            try:
                os.kill(srv.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        srv.cleanup()


def counts(server):
    text = server.shell_result("local t = {}; for k, v in pairs(_G.pn_sm) do t[#t+1] = k .. '=' .. v end; "
                               "return table.concat(t, ' ')")
    return {k: int(v) for k, v in (item.split("=") for item in text.split())}


def s2sout_state(server, to_host):
    """'smacks-namespace sent acked unacked' of the server's s2sout stream to to_host, or 'none'."""
    return server.shell_result(
        "for _, h in pairs(prosody.hosts) do local s = h.s2sout and h.s2sout[%s]; if s and s.type == 's2sout' then "
        "local q = s.outgoing_stanza_queue; if not q then return tostring(s.smacks) .. ' - - -' end; "
        "local unacked = q:count_unacked(); local acked = q:count_acked(); "
        "return tostring(s.smacks) .. ' ' .. (acked + unacked) .. ' ' .. acked .. ' ' .. unacked end end; return 'none'"
        % harness.lua_string(to_host))


def s2sin_handled(server):
    """handled_stanza_count of every incoming s2s stream with SM on."""
    text = server.shell_result(
        "local t = {}; for s in pairs(prosody.incoming_s2s) do if s.smacks then t[#t+1] = tostring(s.handled_stanza_count) end end; "
        "return table.concat(t, ' ')")
    return [int(x) for x in text.split()]


def wait_for(pred, what, timeout=20):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def chat(c, to, ids):
    c.send("".join(f"<message to='{to}' type='chat' id='{i}'><body>{i}</body></message>" for i in ids))


def read_ids(c, n, timeout=20):
    got = []
    for _ in range(n):
        m = c.read_until(r"<message\b.*?</message>", timeout)
        got.append(re.search(r"\bid=['\"]([^'\"]+)", m).group(1))
    return got


def read_errors(c, n, timeout=30):
    """n <message type='error'> stanzas: [(id, condition)]."""
    out = []
    for _ in range(n):
        m = c.read_until(r"<message\b[^>]*type=['\"]error['\"].*?</message>", timeout)
        cond = re.search(r"<([\w-]+) xmlns=['\"]%s['\"]" % re.escape(STANZAS), m)
        out.append((re.search(r"\bid=['\"]([^'\"]+)", m).group(1), cond and cond.group(1)))
    return out


def establish(a, b, alice, bob):
    """One message each way, so both s2sout streams exist, are authenticated and have SM on."""
    chat(alice, bob.jid, ["hello-b"])
    assert read_ids(bob, 1) == ["hello-b"]
    chat(bob, alice.jid, ["hello-a"])
    assert read_ids(alice, 1) == ["hello-a"]
    wait_for(lambda: s2sout_state(a, B_HOST).endswith(" 0") and s2sout_state(a, B_HOST), "A's s2sout acked")
    wait_for(lambda: s2sout_state(b, A_HOST).endswith(" 0") and s2sout_state(b, A_HOST), "B's s2sout acked")


def users(a, b):
    a.register_on_vhost("alice")
    b.register_on_vhost("bob")
    return a.client("alice"), b.client("bob", "phone")


@pytest.mark.parametrize("mode", ["native", "core"])
def test_sm_enabled_both_ways_and_acks_flow(pair, mode):
    a, b = pair(mode)
    alice, bob = users(a, b)
    establish(a, b, alice, bob)
    n = 60
    ids = [f"ab{i}" for i in range(n)]
    chat(alice, bob.jid, ids)
    assert sorted(read_ids(bob, n)) == sorted(ids)
    back = [f"ba{i}" for i in range(n)]
    chat(bob, alice.jid, back)
    assert sorted(read_ids(alice, n)) == sorted(back)
    # everything each server sent on its s2sout stream was acknowledged; n is a floor (the first message went out
    # before SM was enabled, with the connection's send queue; other stanzas may ride on the same stream)
    for srv, to in ((a, B_HOST), (b, A_HOST)):
        state = wait_for(lambda: (lambda s: s if s.endswith(" 0") and int(s.split()[1]) >= n else None)(
            s2sout_state(srv, to)), f"{srv.name} s2sout fully acked")
        ns, sent, acked, unacked = state.split()
        assert ns == SM3 and int(sent) == int(acked) >= n, state
        assert max(s2sin_handled(srv)) >= n, s2sin_handled(srv)
    ca, cb = counts(a), counts(b)
    # each side asked to enable on its s2sout and the other side answered on its s2sin
    assert ca.get("s2sin:enable") == 1 and cb.get("s2sin:enable") == 1, (ca, cb)
    assert ca.get("s2sout:enabled") == 1 and cb.get("s2sout:enabled") == 1, (ca, cb)
    # <r/> go out on s2sout and are answered by <a/> from the s2sin side: as many answers as requests
    for sender, receiver in ((a, b), (b, a)):
        cs, cr = counts(sender), counts(receiver)
        assert cr.get("s2sin:r", 0) >= 1, (cs, cr)
        assert cs.get("s2sout:a", 0) == cr.get("s2sin:r", 0), (sender.name, cs, cr)
        # batching: far fewer round trips than stanzas
        assert cr["s2sin:r"] <= n, (cs, cr)
    print(f"{mode}: <r/> A->B {cb['s2sin:r']}, B->A {ca['s2sin:r']} for {n} messages each way")


def frozen_with_unacked(a, b, alice, bob, ids):
    """Freeze B, send ids from alice; returns once A holds them all unacknowledged on its s2sout stream."""
    os.kill(b.pid, signal.SIGSTOP)
    chat(alice, bob.jid, ids)
    wait_for(lambda: (lambda s: s if s != "none" and s.split()[3] != "-" and int(s.split()[3]) >= len(ids) else None)(
        s2sout_state(a, B_HOST)), f"{len(ids)} unacked on A's s2sout")


@pytest.mark.parametrize("mode", ["native", "core"])
def test_link_dying_with_unacked_stanzas_bounces_them(pair, mode):
    a, b = pair(mode)
    alice, bob = users(a, b)
    establish(a, b, alice, bob)
    ids = [f"lost{i}" for i in range(5)]
    frozen_with_unacked(a, b, alice, bob, ids)
    b.kill()  # the peer's process dies: A's socket gets a reset, never an <a/>
    errors = read_errors(alice, len(ids))
    assert sorted(i for i, _ in errors) == sorted(ids), errors
    conditions = {c for _, c in errors}
    assert conditions <= {"recipient-unavailable", "remote-server-not-found", "service-unavailable"}, errors
    assert re.search(r"(unacked|Destroying session with \d+ unacked)", a.log_text())
    if mode == "native":
        assert "s2s stream destroyed with 5 unacked stanzas (bounced)" in a.log_text()


def test_resend_reroutes_over_a_new_stream(pair):
    a, b = pair("native", smacks_s2s_resend=True)
    alice, bob = users(a, b)
    establish(a, b, alice, bob)
    ids = [f"again{i}" for i in range(5)]
    frozen_with_unacked(a, b, alice, bob, ids)
    # A drops its stream to the (frozen) peer; the unacknowledged stanzas are routed again, on a new stream
    a.shell(">for _, h in pairs(prosody.hosts) do local s = h.s2sout and h.s2sout[%s]; if s and s.conn then s.conn:close() end end"
            % harness.lua_string(B_HOST))
    wait_for(lambda: "s2s stream destroyed with 5 unacked stanzas (re-routed)" in a.log_text(), "re-route on A")
    os.kill(b.pid, signal.SIGCONT)
    # B may also process what reached its socket before the close (SM on s2s has no resumption to tell): every
    # message arrives at least once, and no error comes back
    got = set()
    deadline = time.monotonic() + 30
    while not set(ids) <= got and time.monotonic() < deadline:
        got.update(read_ids(bob, 1, timeout=max(1, deadline - time.monotonic())))
    assert set(ids) <= got, got
    chat(alice, bob.jid, ["after"])
    seen = []
    while "after" not in seen:
        seen += read_ids(bob, 1)
    assert "type='error'" not in alice.buf and 'type="error"' not in alice.buf, alice.buf


def test_a_burst_past_a_live_queue_is_delivered_once_without_errors(pair):
    # smacks_max_queue_size 2: a connected stream holds 8, and a burst of 30 is written before any ack returns
    a, b = pair("native", smacks_max_queue_size=2, smacks_s2s_resend=True)
    alice, bob = users(a, b)
    establish(a, b, alice, bob)
    ids = [f"burst{i}" for i in range(30)]
    chat(alice, bob.jid, ids)
    assert read_ids(bob, len(ids)) == ids  # each once, in order: nothing re-sent into the stream it overflowed
    chat(alice, bob.jid, ["after"])
    assert read_ids(bob, 1) == ["after"]
    assert "type='error'" not in alice.buf and 'type="error"' not in alice.buf, alice.buf
    assert "the oldest unacked stanza is no longer held (written, not yet acknowledged)" in a.log_text()


def test_unresponsive_peer_is_closed_after_the_ack_timeout(pair):
    a, b = pair("native", smacks_ack_timeout=2, smacks_max_ack_delay=1)
    a.shell(">rawset(_G, 'pn_delayed', {}); for _, h in pairs(prosody.hosts) do h.events.add_handler('smacks-ack-delayed', "
            "function (e) table.insert(_G.pn_delayed, e.origin.type .. ':' .. #e.queue) end) end")
    alice, bob = users(a, b)
    establish(a, b, alice, bob)
    ids = [f"stuck{i}" for i in range(3)]
    t0 = time.monotonic()
    frozen_with_unacked(a, b, alice, bob, ids)
    # smacks-ack-delayed fired for the s2s stream with its queue (what mod_s2s_smacks_timeout hooks) ...
    wait_for(lambda: a.shell_result("return table.concat(_G.pn_delayed, ',')").startswith("s2sout:3"), "ack-delayed")
    # ... and the stream is closed after smacks_ack_timeout (+ s2s_close_timeout): the stanzas come back as errors
    errors = read_errors(alice, len(ids), timeout=30)
    assert sorted(i for i, _ in errors) == sorted(ids), errors
    assert time.monotonic() - t0 < 20
    assert "No acknowledgement within 2s, considering the connection dead" in a.log_text()
    os.kill(b.pid, signal.SIGCONT)
    # the next stanza opens a fresh stream to the (now responsive) peer and is delivered
    chat(alice, bob.jid, ["fresh"])
    seen = []
    while "fresh" not in seen:
        seen += read_ids(bob, 1, timeout=30)


def test_mod_s2s_smacks_timeout_needs_core_smacks(pair):
    """mod_s2s_smacks_timeout calls module:depends("smacks"): with mod_smacks disabled it refuses to load, saying
    why. mod_native_smacks does its job itself (previous test)."""
    assert os.path.exists(S2S_SMACKS_TIMEOUT), "install Debian's prosody-modules (spec/deps.sh)"
    a, _ = pair("native")
    out = a.shell(f'module:load("s2s_smacks_timeout", "{A_HOST}")', check=False)
    assert "Dependency on disabled module mod_smacks" in out + a.log_text(), out
    assert a.shell_result(f"return require'core.modulemanager'.is_loaded('{A_HOST}', 'native_smacks') and 'yes' or 'no'") == "yes"
