"""mod_native_dane end to end: two real Prosody servers doing s2s through the local DNSSEC test bed.

Sender A (`sender.dane.example`, s2s on 127.0.0.1) loads mod_native_dane; receiver B (s2s on 127.0.0.2) serves one
VirtualHost per scenario, each with its own SRV target and TLSA records in the signed zone `dane.example` (or in the
unsigned / bogus child zones). Both resolve through the validating unbound of the test bed and authenticate with
dialback (B calls A back through the same DNS). Every scenario is an XMPP ping from A to the scenario's domain in A's
admin shell: a pong means the connection was allowed, a bounce must carry the DANE reason; A's log must say why.
"""

import re
import socket
import threading

import pytest

import dnssec_testbed as tb
import harness


@pytest.fixture(autouse=True, scope="module")
def dns_test_bed_tools():
    missing = tb.tools_missing()
    assert not missing, f"DNSSEC test bed tools missing: {missing} (make deps installs them)"


SENDER = "sender.dane.example"
B_ADDR = "127.0.0.2"
B_ADDR3 = "127.0.0.3"


S2SProsody = harness.S2SProsody


def scrape(server):
    """The server's metrics in OpenMetrics text (mod_http_openmetrics)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as r:
        return r.read().decode()


def ping(server, domain, timeout=10, sender=SENDER):
    res = server.prosodyctl("shell", f'xmpp:ping("{sender}", "{domain}", {timeout})', timeout=timeout + 20, check=False)
    return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


# scenario domain -> (records in the signed zone, expectation); filled by the fixture
COMBOS = [(u, s, m) for u in range(4) for s in range(2) for m in range(3)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dane-s2s")
    pki = tb.make_pki(d / "pki", ["*.dane.example", "dane.example", "*.insecure.dane.example"])
    a_port, b_port = tb.free_port(), tb.free_port()
    while b_port == a_port:
        b_port = tb.free_port()
    bed = tb.DNSSECTestbed(d / "dns")
    a2_port = tb.free_port()
    bed.add("_xmpp-server._tcp.sender", "SRV", f"0 0 {a_port} xmpp-sender.dane.example.")
    bed.add("xmpp-sender", "A", "127.0.0.1")
    bed.add(f"_{a_port}._tcp.xmpp-sender", "TLSA", f"3 1 1 {tb.tlsa_data(pki['leaf'], 1, 1)}")
    bed.add("_xmpp-server._tcp.sender2", "SRV", f"0 0 {a2_port} xmpp-sender2.dane.example.")
    bed.add("xmpp-sender2", "A", "127.0.0.1")
    domains = []

    def scenario(name, tlsa=(), bogus=(), srv=True):
        target = f"t-{name}"
        bed.add(f"_xmpp-server._tcp.{name}", "SRV", f"0 0 {b_port} {target}.dane.example.", bogus="srv" in bogus)
        bed.add(target, "A", B_ADDR, bogus="a" in bogus)
        for rec in tlsa:
            bed.add(f"_{b_port}._tcp.{target}", "TLSA", rec, bogus="tlsa" in bogus)
        domains.append(f"{name}.dane.example")

    certs = {"leaf": pki["leaf"], "int": pki["int"]}
    for u, s, m in COMBOS:
        scenario(f"c{u}{s}{m}", [f"{u} {s} {m} {tb.tlsa_data(certs['leaf' if u in (1, 3) else 'int'], s, m)}"])
    ee = tb.tlsa_data(pki["leaf"], 1, 1)
    scenario("mismatch", [f"3 1 1 {tb.flip(ee)}"])
    scenario("rollover", [f"3 1 1 {tb.flip(ee)}", f"3 1 1 {ee}"])
    scenario("bogustlsa", [f"3 1 1 {ee}"], bogus=("tlsa",))
    scenario("bogussrv", [f"3 1 1 {ee}"], bogus=("srv",))
    bed.add("bogussrv", "A", B_ADDR)  # what 0.12's own resolver would fall back to
    scenario("bogusaddr", [f"3 1 1 {ee}"], bogus=("a",))
    scenario("notlsa")
    scenario("required", [])
    scenario("unusable", [f"4 1 1 {ee}"])
    scenario("reloadreq")
    scenario("afterreload", [f"3 1 1 {ee}"])
    scenario("select-ee", [f"3 1 1 {ee}"])
    scenario("cached", [f"3 1 1 {ee}"])
    # IPv6 only, on ::1
    bed.add("_xmpp-server._tcp.v6", "SRV", f"0 0 {b_port} t-v6.dane.example.")
    bed.add("t-v6", "AAAA", "::1")
    bed.add(f"_{b_port}._tcp.t-v6", "TLSA", f"3 1 1 {ee}")
    bed.add("_xmpp-server._tcp.v6-bad", "SRV", f"0 0 {b_port} t-v6-bad.dane.example.")
    bed.add("t-v6-bad", "AAAA", "::1")
    bed.add(f"_{b_port}._tcp.t-v6-bad", "TLSA", f"3 1 1 {tb.flip(ee)}")
    domains += ["v6.dane.example", "v6-bad.dane.example"]
    # a server that accepts and then says nothing, for as long as the spec wants
    tarpit = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(4)
    bed.add("_xmpp-server._tcp.tarpit", "SRV", f"0 0 {tarpit.getsockname()[1]} t-tarpit.dane.example.")
    bed.add("t-tarpit", "A", "127.0.0.1")
    bed.add(f"_{tarpit.getsockname()[1]}._tcp.t-tarpit", "TLSA", f"3 1 1 {ee}")
    scenario("select-mismatch", [f"3 1 1 {tb.flip(ee)}"])
    scenario("requnusable", [f"4 1 1 {ee}"])
    bed.add_insecure("_xmpp-server._tcp", "SRV", f"0 0 {b_port} xmpp.insecure.dane.example.")
    bed.add_insecure("xmpp", "A", B_ADDR)
    domains.append("insecure.dane.example")
    # two targets on two addresses of B: the preferred one has bogus TLSA records
    bed.add("_xmpp-server._tcp.mixed", "SRV", f"0 0 {b_port} t-mixed-bad.dane.example.")
    bed.add("_xmpp-server._tcp.mixed", "SRV", f"10 0 {b_port} t-mixed-good.dane.example.")
    bed.add("t-mixed-bad", "A", B_ADDR3)
    bed.add(f"_{b_port}._tcp.t-mixed-bad", "TLSA", f"3 1 1 {ee}", bogus=True)
    bed.add("t-mixed-good", "A", B_ADDR)
    bed.add(f"_{b_port}._tcp.t-mixed-good", "TLSA", f"3 1 1 {ee}")
    domains.append("mixed.dane.example")
    # Direct TLS (XEP-0368): Prosody tries _xmpps-server first
    b_direct = tb.free_port()
    for name, rec in (("direct", ee), ("direct-bad", tb.flip(ee))):
        bed.add(f"_xmpps-server._tcp.{name}", "SRV", f"0 0 {b_direct} t-{name}.dane.example.")
        bed.add(f"t-{name}", "A", B_ADDR)
        bed.add(f"_{b_direct}._tcp.t-{name}", "TLSA", f"3 1 1 {rec}")
        domains.append(f"{name}.dane.example")
    b2_port = tb.free_port()
    bed.add("_xmpp-server._tcp.notls", "SRV", f"0 0 {b2_port} t-notls.dane.example.")
    bed.add("t-notls", "A", B_ADDR)
    bed.add(f"_{b2_port}._tcp.t-notls", "TLSA", f"3 1 1 {ee}")
    bed.add_dead_child("dead")
    bed.add_bogus_child("_xmpp-server._tcp", "SRV", f"0 0 {b_port} xmpp.bogus.dane.example.")
    bed.add_bogus_child("xmpp", "A", B_ADDR)
    domains.append("bogus.dane.example")
    bed.start()

    unbound = {"resolvconf": False, "hoststxt": False, "forward": bed.resolver, "trusted": bed.trust_anchor}
    common = {"unbound": unbound, "ssl": {"certificate": pki["chain"], "key": pki["key"]},
              "s2s_require_encryption": True, "s2s_secure_auth": False}
    # B authenticates A by A's own TLSA records (incoming DANE), which lets A use SASL EXTERNAL
    b = S2SProsody(name="dane-B", s2s_port=b_port, s2s_interface=[B_ADDR, B_ADDR3, "::1"], vhosts=domains,
                   modules=["tls", "dialback", "native_dane", "http_openmetrics"],
                   global_options=dict(common, dane_incoming=True, dane_cafile=False, statistics="internal",
                                       statistics_interval="manual", s2s_direct_tls_ports=[b_direct],
                                       s2s_direct_tls_interfaces=[B_ADDR]))
    # B2 offers no TLS at all: A must not talk to a domain with TLSA records in the clear
    b2 = S2SProsody(name="dane-B2", s2s_port=b2_port, s2s_interface=B_ADDR, vhosts=["notls.dane.example"],
                    modules=["dialback"], global_options=dict(common, s2s_require_encryption=False))
    a_options = dict(common, s2s_require_encryption=False, statistics="internal", statistics_interval="manual", dane_cafile=pki["root"],
                     dane_domain_policy={"required.dane.example": "required", "requnusable.dane.example": "required",
                                         "insecure.dane.example": "opportunistic"})
    a = S2SProsody(name="dane-A", s2s_port=a_port, s2s_interface="127.0.0.1", vhosts=[SENDER],
                   modules=["tls", "dialback", "native_dane", "http_openmetrics"], global_options=a_options)
    # the same sender on server_select, started by the backend spec
    a2 = S2SProsody(name="dane-A2", s2s_port=a2_port, s2s_interface="127.0.0.1", vhosts=["sender2.dane.example"],
                    modules=["tls", "dialback", "native_dane"], global_options=dict(a_options, network_backend="select"))
    try:
        b.start()
        b2.start()
        a.start()
        yield {"a": a, "a2": a2, "b": b, "b2": b2, "bed": bed, "pki": pki, "tarpit": tarpit}
    finally:
        for s in (a, a2, b, b2):
            s.stop()
        bed.stop()
        for s in (a, a2, b, b2):
            s.cleanup()
        tarpit.close()


def assert_pong(world, domain):
    out = ping(world["a"], domain)
    assert "pong from " + domain in out, f"{domain}: {out}"


def assert_refused(world, domain, reason):
    out = ping(world["a"], domain)
    assert "pong" not in out, f"{domain} answered: {out}"
    assert re.search(reason, out), f"{domain}: bounce lacks {reason!r}: {out}"
    return out


def test_test_bed_answers_as_designed(world):
    bed = world["bed"]
    assert bed.query("_xmpp-server._tcp.c311.dane.example", "SRV")[:2] == ("NOERROR", True)
    assert bed.query("_xmpp-server._tcp.bogussrv.dane.example", "SRV")[0] == "SERVFAIL"
    assert bed.query("t-bogusaddr.dane.example", "A")[0] == "SERVFAIL"
    assert bed.query("_xmpp-server._tcp.insecure.dane.example", "SRV")[:2] == ("NOERROR", False)
    assert bed.query("_xmpp-server._tcp.bogus.dane.example", "SRV")[0] == "SERVFAIL"


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "%d-%d-%d" % c)
def test_each_usage_selector_matching_type_verifies(world, combo):
    domain = "c%d%d%d.dane.example" % combo
    assert_pong(world, domain)
    log = world["a"].log_text()
    assert re.search(r"DANE: %s verified by TLSA %d %d %d at depth \d" % ((re.escape(domain),) + combo), log), log[-3000:]


def test_a_rollover_pair_verifies_on_the_good_record(world):
    assert_pong(world, "rollover.dane.example")


def test_mismatch_is_refused_with_a_dane_reason(world):
    out = assert_refused(world, "mismatch.dane.example", r"DANE: certificate of t-mismatch\.dane\.example does not match")
    assert "no matching DANE TLSA records" in out
    assert re.search(r"DANE: refusing s2s connection to mismatch\.dane\.example", world["a"].log_text())


def test_bogus_tlsa_is_refused_never_downgraded(world):
    assert_refused(world, "bogustlsa.dane.example", r"DANE: no usable target .*TLSA records of .* are bogus")
    assert re.search(r"DANE: not connecting to bogustlsa\.dane\.example", world["a"].log_text())


def test_bogus_srv_is_refused_without_falling_back_to_the_domain(world):
    assert_refused(world, "bogussrv.dane.example", r"DANE: SRV records of bogussrv\.dane\.example are bogus")
    # no connection to the fallback address was attempted
    assert not re.search(r"bogussrv\.dane\.example.*(Stream encrypted|connected)", world["a"].log_text())


def test_bogus_address_and_bogus_delegation_are_refused(world):
    assert_refused(world, "bogusaddr.dane.example", r"address records of t-bogusaddr\.dane\.example are bogus")
    assert_refused(world, "bogus.dane.example", r"DANE: SRV records of bogus\.dane\.example are bogus")


def test_no_tlsa_and_insecure_fall_back_to_pkix(world):
    assert_pong(world, "notlsa.dane.example")
    assert_pong(world, "insecure.dane.example")


def test_required_without_tlsa_is_refused(world):
    assert_refused(world, "required.dane.example", r"DANE is required for required\.dane\.example but it publishes no TLSA")


def test_unusable_only_depends_on_policy(world):
    assert_pong(world, "unusable.dane.example")
    assert "every TLSA record of t-unusable.dane.example is unusable" in world["a"].log_text()
    assert_refused(world, "requnusable.dane.example", r"every TLSA record of t-requnusable\.dane\.example is unusable")


def test_works_on_server_select_too(world):
    a2 = world["a2"]
    a2.start()
    assert "epoll" not in a2.shell_result("require'net.server'.get_backend()")
    assert "epoll" in world["a"].shell_result("require'net.server'.get_backend()")
    out = ping(a2, "select-ee.dane.example", sender="sender2.dane.example")
    assert "pong from select-ee.dane.example" in out, out
    assert "DANE: select-ee.dane.example verified by TLSA 3 1 1 at depth 0" in a2.log_text()
    out = ping(a2, "select-mismatch.dane.example", sender="sender2.dane.example")
    assert "pong" not in out and "does not match its TLSA records" in out, out


def test_policies_and_verification_survive_a_config_reload(world):
    a = world["a"]
    a.global_options["dane_domain_policy"] = dict(a.global_options["dane_domain_policy"],
                                                  **{"reloadreq.dane.example": "required"})
    a.write_config()
    a.shell("config:reload()")
    out = ping(a, "reloadreq.dane.example")
    assert "pong" not in out and "DANE is required for reloadreq.dane.example" in out, out
    assert_pong(world, "afterreload.dane.example")
    assert "DANE: afterreload.dane.example verified by TLSA 3 1 1" in a.log_text()


def test_a_bad_option_is_refused_with_its_name(prosody_factory):
    srv = prosody_factory(name="dane-badopt", global_options={"dane_policy": "sometimes"})
    out = srv.shell('module:load("native_dane")', check=False)
    assert "option 'dane_policy' must be one of \"off\", \"opportunistic\", \"required\", not \"sometimes\"" in out, out
    srv = prosody_factory(name="dane-badopt2", global_options={"dane_domain_policy": {"x.example": "maybe"}})
    out = srv.shell('module:load("native_dane")', check=False)
    assert "option 'dane_domain_policy[\"x.example\"]' must be one of" in out, out
    srv = prosody_factory(name="dane-badopt3", global_options={"dane_cafile": "/nonexistent/ca.pem"})
    out = srv.shell('module:load("native_dane")', check=False)
    assert "option 'dane_cafile' must be a readable file of CA certificates" in out, out


def test_a_missing_trust_anchor_is_said_loudly(prosody_factory):
    srv = prosody_factory(name="dane-noanchor")
    srv.shell('module:load("native_dane")')
    assert re.search(r"mod_native_dane\s+error\s+DANE is inactive: no DNSSEC trust anchor", srv.log_text()), srv.log_text()[-2000:]


def dane_check(server, domain):
    res = server.prosodyctl("mod_native_dane", "check", domain, timeout=60, check=False)
    return res.returncode, res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")


def test_check_command_walks_srv_tlsa_starttls_and_each_record(world):
    rc, out = dane_check(world["a"], "c311.dane.example")
    assert rc == 0, out
    assert "SRV _xmpp-server._tcp.c311.dane.example: secure" in out, out
    assert re.search(r"target t-c311\.dane\.example:\d+  addresses 127\.0\.0\.2  -> dane", out), out
    assert re.search(r"TLSA #1 3 1 1 [0-9a-f]{64} \(DANE-EE SPKI SHA2-256\)", out), out
    assert re.search(r"STARTTLS 127\.0\.0\.2 port \d+: 2 certificate\(s\)", out), out
    assert "TLSA #1 matches (depth 0)" in out, out
    assert "verdict: verified" in out, out
    assert "WARNING: only one DANE-EE record for t-c311.dane.example" in out, out
    assert "Result for c311.dane.example: DANE verified (1 warning)" in out, out


def test_check_command_flags_stale_records_and_failures(world):
    rc, out = dane_check(world["a"], "rollover.dane.example")
    assert rc == 0, out
    # DNS does not keep the order of the two records: one matches, the other is flagged
    assert len(re.findall(r"TLSA #[12] does not match: no matching DANE TLSA records", out)) == 1, out
    assert len(re.findall(r"WARNING: TLSA #[12] of t-rollover\.dane\.example matches nothing the server presents", out)) == 1, out
    assert len(re.findall(r"TLSA #[12] matches \(depth 0\)", out)) == 1, out
    assert "only one DANE-EE" not in out, out
    rc, out = dane_check(world["a"], "mismatch.dane.example")
    assert rc == 1, out
    assert "Result for mismatch.dane.example: DANE FAILED" in out, out
    rc, out = dane_check(world["a"], "bogussrv.dane.example")
    assert rc == 1, out
    assert "SRV _xmpp-server._tcp.bogussrv.dane.example: bogus" in out, out
    assert "REFUSED: SRV records of bogussrv.dane.example are bogus" in out, out
    rc, out = dane_check(world["a"], "bogustlsa.dane.example")
    assert rc == 1 and "-> bogus-tlsa: TLSA records of" in out, out
    assert re.search(r"WARNING: target \S+: TLSA records of .* are bogus .*; Prosody will not connect to it", out), out
    rc, out = dane_check(world["a"], "insecure.dane.example")
    assert rc == 0 and "Result for insecure.dane.example: no DANE (insecure): PKIX applies" in out, out
    rc, out = dane_check(world["a"], "required.dane.example")
    assert rc == 1 and "but the local policy requires DANE" in out, out


def test_check_command_suggests_a_record_for_the_local_certificate(world):
    rc, out = dane_check(world["a"], SENDER)
    expected = tb.tlsa_data(world["pki"]["leaf"], 1, 1)
    assert f"suggested TLSA for the local certificate of {SENDER}" in out and f"3 1 1 {expected}" in out, out
    rc, out = dane_check(world["a"], "notlsa.dane.example")  # not served here: nothing to suggest
    assert "suggested TLSA" not in out, out


def test_check_from_the_admin_shell(world):
    for domain in ("mismatch.dane.example", "bogussrv.dane.example"):
        ping(world["a"], domain)
    out = world["a"].shell('dane:check("c311.dane.example")', timeout=60, check=False)
    assert "TLSA #1 matches (depth 0)" in out and "OK: DANE check passed" in out, out
    out = world["a"].shell("dane:show()", check=False)
    assert re.search(r"mismatch\.dane\.example: dane \(policy opportunistic", out), out
    assert re.search(r"bogussrv\.dane\.example: bogus - SRV records", out), out


def test_incoming_dane_authenticates_the_sender_for_sasl_external(world):
    assert_pong(world, "c312.dane.example")
    b_log = world["b"].log_text()
    assert re.search(r"DANE: incoming sender\.dane\.example verified by TLSA 3 1 1 at depth 0", b_log), b_log[-3000:]
    assert "Accepting SASL EXTERNAL identity from sender.dane.example" in b_log
    assert re.search(r"SASL EXTERNAL with c312\.dane\.example succeeded", world["a"].log_text())


def test_check_command_warns_before_tlsa_signatures_expire(world):
    a = world["a"]
    rc, out = dane_check(a, "c301.dane.example")
    assert rc == 0 and re.search(r"TLSA signature expires \d{4}-\d\d-\d\d", out), out
    assert "re-sign the zone" not in out, out
    # the test bed signs for 30 days: a 40-day horizon must warn
    a.global_options["dane_check_rrsig_warn"] = 40
    a.write_config()
    try:
        rc, out = dane_check(a, "c301.dane.example")
    finally:
        del a.global_options["dane_check_rrsig_warn"]
        a.write_config()
    assert "WARNING: the signature of the TLSA records of t-c301.dane.example expires within 40 days" in out, out


def test_a_target_with_bogus_tlsa_is_never_used_without_dane(world):
    # the preferred SRV target's TLSA records are bogus: it is never connected to (RFC 7673 3.4, Prosody 0.12 would
    # connect without DANE); Prosody goes on to the next target, whose records verify
    out = ping(world["a"], "mixed.dane.example")
    assert "pong from mixed.dane.example" in out, out
    log = world["a"].log_text()
    assert "DANE: mixed.dane.example verified by TLSA 3 1 1 at depth 0 (target t-mixed-good.dane.example)" in log, log[-3000:]
    assert re.search(r"DANE: skipping 127\.0\.0\.3 port \d+ for mixed\.dane\.example", log), log[-3000:]
    assert "Next target to try is 127.0.0.3:" not in log


def test_direct_tls_targets_are_verified_too(world):
    assert_pong(world, "direct.dane.example")
    assert re.search(r"DANE: direct\.dane\.example verified by TLSA 3 1 1 at depth 0 \(target t-direct\.dane\.example\)",
                     world["a"].log_text())
    assert_refused(world, "direct-bad.dane.example", r"DANE: certificate of t-direct-bad\.dane\.example does not match")
    rc, out = dane_check(world["a"], "direct.dane.example")
    assert rc == 0, out
    assert "SRV _xmpps-server._tcp.direct.dane.example (Direct TLS): secure" in out, out
    assert re.search(r"target t-direct\.dane\.example:\d+ \(Direct TLS\)  addresses 127\.0\.0\.2  -> dane", out), out
    assert re.search(r"Direct TLS 127\.0\.0\.2 port \d+: 2 certificate\(s\)", out), out
    assert "Result for direct.dane.example: DANE verified" in out, out


def test_a_second_connection_reuses_the_dane_decision(world):
    a = world["a"]
    assert_pong(world, "cached.dane.example")
    a.shell(f's2s:close("{SENDER}", "cached.dane.example")')
    a.shell(f's2s:close("cached.dane.example", "{SENDER}")')
    assert_pong(world, "cached.dane.example")
    log = a.log_text()
    # two connections, each verified, but the module asked for the TLSA records once (Prosody itself never does)
    assert len(re.findall(r"DANE: cached\.dane\.example verified by TLSA", log)) == 2, log[-3000:]
    assert len(re.findall(r"Resolve _\d+\._tcp\.t-cached\.dane\.example IN TLSA", log)) == 1, log[-3000:]


def test_the_shell_check_does_not_freeze_the_server(world):
    a, tarpit = world["a"], world["tarpit"]
    result = {}
    checker = threading.Thread(target=lambda: result.update(
        out=a.shell('dane:check("tarpit.dane.example")', timeout=60, check=False)))
    checker.start()
    tarpit.settimeout(30)
    conn, _ = tarpit.accept()  # the check is now waiting for stream features that never come
    try:
        # the server still answers while the check waits
        assert a.shell_result("1 + 1") == "2"
        assert checker.is_alive()
    finally:
        conn.close()
    checker.join(60)
    assert "STARTTLS 127.0.0.1 port" in result["out"] and "failed: no stream features" in result["out"], result
    assert "Result for tarpit.dane.example: DANE FAILED" in result["out"], result


def test_ipv6_targets_are_matched_and_verified(world):
    assert_pong(world, "v6.dane.example")
    assert "DANE: v6.dane.example verified by TLSA 3 1 1 at depth 0 (target t-v6.dane.example)" in world["a"].log_text()
    assert_refused(world, "v6-bad.dane.example", r"DANE: certificate of t-v6-bad\.dane\.example does not match")


def test_resolution_errors_are_refused_not_ignored(world):
    assert_refused(world, "dead.dane.example", r"DANE: SRV lookup for _xmpps?-server\._tcp\.dead\.dane\.example failed \(ServFail\)")


def test_tlsa_without_tls_is_refused(world):
    assert_refused(world, "notls.dane.example", r"DANE: TLSA records are published but the connection was not encrypted")
    assert "DANE: notls.dane.example publishes TLSA records but the stream is not encrypted" in world["a"].log_text()


def test_metrics_count_each_outcome(world):
    # runs last: by now every scenario above has been through A (and A through B's incoming check)
    out = scrape(world["a"])
    for outcome in ("verified", "mismatch", "bogus", "insecure", "no-tlsa", "unusable-only", "resolution-error"):
        assert re.search(r'^prosody_mod_native_dane__outcomes_total\{outcome="%s"\} [1-9]' % outcome, out, re.M), (outcome, out)
    # 24 usage/selector/matching-type combinations, rollover, afterreload, incoming, check-free pings
    assert int(re.search(r'^prosody_mod_native_dane__outcomes_total\{outcome="verified"\} (\d+)', out, re.M).group(1)) >= 24
    for reason in ("mismatch", "bogus", "required", "unusable-only", "resolution-error", "no-tls"):
        assert re.search(r'^prosody_mod_native_dane__refused_total\{reason="%s"\} [1-9]' % reason, out, re.M), (reason, out)
    assert re.search(r"^prosody_mod_native_dane__verify_duration_seconds_count [1-9]", out, re.M), out
    out = scrape(world["b"])
    assert re.search(r'^prosody_mod_native_dane__incoming_outcomes_total\{outcome="verified"\} [1-9]', out, re.M), out


def test_a_silent_resolver_bounces_after_the_resolve_timeout(world):
    # a "resolver" that reads queries and never answers: libunbound would retry for minutes
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    unbound = {"resolvconf": False, "hoststxt": False, "forward": f"127.0.0.1@{silent.getsockname()[1]}",
               "trusted": world["bed"].trust_anchor}
    srv = S2SProsody(name="dane-silent", s2s_port=tb.free_port(), s2s_interface="127.0.0.1", vhosts=[SENDER],
                     modules=["tls", "dialback", "native_dane"],
                     global_options={"unbound": unbound, "dane_resolve_timeout": 1})
    try:
        srv.start()
        out = ping(srv, "c311.dane.example", timeout=20)
        assert "pong" not in out and "DANE: DNS resolution of c311.dane.example timed out" in out, out
        assert "DANE resolution of c311.dane.example timed out after 1s" in srv.log_text()
    finally:
        srv.stop()
        srv.cleanup()
        silent.close()
