"""mod_native_dane end to end, second part: incoming DANE refusals, the refusal of an address that no validated target
has, decision lifetimes that follow the records' TTLs, and fallback to the next SRV target after a DANE failure.

Two real Prosody servers through the local DNSSEC test bed, as in test_dane_s2s.py. A serves several sender domains
on 127.0.0.1 (one per incoming case, each with its own SRV target and TLSA records); B (dane_incoming = true) serves
one domain per case on 127.0.0.2, 127.0.0.4 and 127.0.0.5. Zone changes are real: the test bed re-signs the zone
and restarts nsd, and the records' TTLs do the rest.
"""

import re
import threading
import time

import pytest

import dnssec_testbed as tb
from test_dane_s2s import S2SProsody, ping, scrape


@pytest.fixture(autouse=True, scope="module")
def dns_test_bed_tools():
    missing = tb.tools_missing()
    assert not missing, f"DNSSEC test bed tools missing: {missing} (make deps installs them)"


SENDER = "sender.dane.example"
B_MAIN, B_MOVED, B_BAD = "127.0.0.2", "127.0.0.4", "127.0.0.5"
SHORT_TTL = 3
NEGATIVE_TTL = 200  # the zone's NSEC records; everything else has 300 unless said otherwise


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dane-more")
    pki = tb.make_pki(d / "pki", ["*.dane.example", "dane.example"])
    ee = tb.tlsa_data(pki["leaf"], 1, 1)
    a_port, b_port = tb.free_port(), tb.free_port()
    while b_port == a_port:
        b_port = tb.free_port()
    bed = tb.DNSSECTestbed(d / "dns", negative_ttl=NEGATIVE_TTL)

    # senders on A (127.0.0.1): the domains B checks incoming connections against
    def sender(name, tlsa):
        bed.add(f"_xmpp-server._tcp.{name}", "SRV", f"0 0 {a_port} xmpp-{name}.dane.example.")
        bed.add(f"xmpp-{name}", "A", "127.0.0.1")
        for rec in tlsa:
            bed.add(f"_{a_port}._tcp.xmpp-{name}", "TLSA", rec)
        return f"{name}.dane.example"

    senders = [sender("sender", [f"3 1 1 {ee}"]),
               sender("badsender", [f"3 1 1 {tb.flip(ee)}"]),   # its certificate matches none of its own records
               sender("badreq", [f"3 1 1 {tb.flip(ee)}"]),      # the same, and B requires DANE from it
               sender("plainsender", [])]                        # signed, no TLSA; B requires DANE from it

    # receivers on B
    domains = []

    def receiver(name, targets):
        """targets: [(priority, label, address, [tlsa], tlsa_ttl)]"""
        for prio, label, addr, tlsa, ttl in targets:
            bed.add(f"_xmpp-server._tcp.{name}", "SRV", f"{prio} 0 {b_port} {label}.dane.example.")
            bed.add(label, "A", addr)
            for rec in tlsa:
                bed.add(f"_{b_port}._tcp.{label}", "TLSA", rec, ttl=ttl)
        domains.append(f"{name}.dane.example")

    for name in ("in-mis", "in-req", "in-plain", "in-ok"):
        receiver(name, [(0, f"t-{name}", B_MAIN, [f"3 1 1 {ee}"], None)])
    receiver("moved", [(0, "t-moved", B_MAIN, [f"3 1 1 {ee}"], None)])
    # A requires DANE for it; its second target publishes no TLSA
    receiver("moved-req", [(0, "t-mr-dane", B_MAIN, [f"3 1 1 {ee}"], None), (10, "t-mr-plain", B_MAIN, [], None)])
    receiver("shortttl", [(0, "t-shortttl", B_MAIN, [f"3 1 1 {ee}"], SHORT_TTL)])
    receiver("fallback", [(0, "t-fb-bad", B_BAD, [f"3 1 1 {tb.flip(ee)}"], None),
                          (10, "t-fb-good", B_MAIN, [f"3 1 1 {ee}"], None)])
    receiver("fallback-all", [(0, "t-fa-1", B_BAD, [f"3 1 1 {tb.flip(ee)}"], None),
                              (10, "t-fa-2", B_MAIN, [f"3 0 1 {tb.flip(tb.tlsa_data(pki['leaf'], 0, 1))}"], None)])
    # the next target is not listening at all
    receiver("fallback-dead", [(0, "t-fd-bad", B_BAD, [f"3 1 1 {tb.flip(ee)}"], None),
                               (10, "t-fd-dead", "127.0.0.6", [f"3 1 1 {ee}"], None)])
    bed.start()

    unbound = {"resolvconf": False, "hoststxt": False, "forward": bed.resolver, "trusted": bed.trust_anchor}
    common = {"unbound": unbound, "ssl": {"certificate": pki["chain"], "key": pki["key"]},
              "s2s_require_encryption": True, "s2s_secure_auth": False, "statistics": "internal",
              "statistics_interval": "manual", "dane_cafile": False, "dane_cache_ttl": 600}
    b = S2SProsody(name="dane-more-B", s2s_port=b_port, s2s_interface=[B_MAIN, B_MOVED, B_BAD], vhosts=domains,
                   modules=["tls", "dialback", "native_dane", "http_openmetrics"],
                   global_options=dict(common, dane_incoming=True,
                                       dane_domain_policy={SENDER: "required", "badreq.dane.example": "required",
                                                           "plainsender.dane.example": "required"}))
    a = S2SProsody(name="dane-more-A", s2s_port=a_port, s2s_interface="127.0.0.1", vhosts=senders,
                   modules=["tls", "dialback", "native_dane", "http_openmetrics"],
                   global_options=dict(common, dane_domain_policy={"moved-req.dane.example": "required"}))
    try:
        b.start()
        a.start()
        yield {"a": a, "b": b, "bed": bed, "pki": pki, "ee": ee, "b_port": b_port}
    finally:
        for s in (a, b):
            s.stop()
        bed.stop()
        for s in (a, b):
            s.cleanup()


def close_s2s(world, domain, sender=SENDER):
    """Close A's connections to domain (both directions), so that the next stanza opens a new one."""
    a = world["a"]
    a.shell(f's2s:close("{sender}", "{domain}")', check=False)
    a.shell(f's2s:close("{domain}", "{sender}")', check=False)


def metric(text, name, label, value):
    m = re.search(r'^prosody_mod_native_dane__%s_total\{%s="%s"\} (\d+)' % (name, label, re.escape(value)), text, re.M)
    return int(m.group(1)) if m else 0


# -- incoming -----------------------------------------------------------------------------------------------------

def test_incoming_required_and_verified_allows_sasl_external(world):
    # B requires DANE from sender.dane.example, whose certificate matches its TLSA records
    out = ping(world["a"], "in-ok.dane.example")
    assert "pong from in-ok.dane.example" in out, out
    b_log = world["b"].log_text()
    assert "DANE: incoming sender.dane.example verified by TLSA 3 1 1 at depth 0" in b_log, b_log[-3000:]
    assert "Accepting SASL EXTERNAL identity from sender.dane.example" in b_log


def test_incoming_mismatch_is_not_authenticated_and_dialback_back_is_refused(world):
    # opportunistic: the certificate that does not match the sender's own TLSA records is marked invalid (no SASL
    # EXTERNAL); dialback then makes B connect to badsender.dane.example, and that connection fails DANE as well
    before = scrape(world["b"])
    out = ping(world["a"], "in-mis.dane.example", sender="badsender.dane.example", timeout=8)
    assert "pong" not in out, out
    b_log = world["b"].log_text()
    assert re.search(r"DANE: incoming badsender\.dane\.example not authenticated by its TLSA records: "
                     r"no matching DANE TLSA records", b_log), b_log[-3000:]
    assert "Accepting SASL EXTERNAL identity from badsender.dane.example" not in b_log
    assert re.search(r"DANE: refusing s2s connection to badsender\.dane\.example: certificate of "
                     r"xmpp-badsender\.dane\.example does not match its TLSA records", b_log), b_log[-3000:]
    after = scrape(world["b"])
    assert metric(after, "incoming_outcomes", "outcome", "mismatch") > metric(before, "incoming_outcomes", "outcome", "mismatch")
    assert metric(after, "refused", "reason", "mismatch") > metric(before, "refused", "reason", "mismatch")


def test_incoming_mismatch_under_required_is_refused_at_once(world):
    before = scrape(world["b"])
    out = ping(world["a"], "in-req.dane.example", sender="badreq.dane.example", timeout=8)
    assert "pong" not in out, out
    b_log = world["b"].log_text()
    assert re.search(r"DANE: incoming badreq\.dane\.example not authenticated by its TLSA records", b_log), b_log[-3000:]
    # closed with a stream error before any dialback for it: B never connects back to badreq
    assert re.search(r"Incoming s2s stream badreq\.dane\.example->in-req\.dane\.example closed: "
                     r"DANE: your certificate does not match your TLSA records", b_log), b_log[-3000:]
    assert not re.search(r"connection to badreq\.dane\.example", b_log)
    a_log = world["a"].log_text()
    assert "DANE: your certificate does not match your TLSA records" in a_log, a_log[-3000:]
    after = scrape(world["b"])
    assert metric(after, "refused", "reason", "incoming-mismatch") == metric(before, "refused", "reason", "incoming-mismatch") + 1


def test_incoming_required_without_tlsa_is_refused(world):
    before = scrape(world["b"])
    out = ping(world["a"], "in-plain.dane.example", sender="plainsender.dane.example", timeout=8)
    assert "pong" not in out, out
    b_log = world["b"].log_text()
    assert "DANE: refusing incoming s2s from plainsender.dane.example: DANE is required (no-tlsa)" in b_log, b_log[-3000:]
    assert "DANE is required for plainsender.dane.example" in world["a"].log_text()
    after = scrape(world["b"])
    assert metric(after, "refused", "reason", "incoming-no-tlsa") == metric(before, "refused", "reason", "incoming-no-tlsa") + 1
    assert metric(after, "incoming_outcomes", "outcome", "no-tlsa") > metric(before, "incoming_outcomes", "outcome", "no-tlsa")


# -- addresses, lifetimes ------------------------------------------------------------------------------------------

def move_after_a_verified_ping(world, domain, target):
    """A pings `domain` (which caches A's decision), then the zone moves `target` to B_MOVED and every cache below
    A's decision is emptied, so Prosody's own next lookup finds an address the decision does not know."""
    a, bed = world["a"], world["bed"]
    out = ping(a, domain)
    assert f"pong from {domain}" in out, out
    close_s2s(world, domain)
    bed.replace(target, "A", [B_MOVED])
    bed.resign()
    bed.flush()
    a.shell_result('require"net.unbound".dns.purge()')


def test_an_address_no_validated_target_has_is_refused(world):
    # A's decision for moved.dane.example says t-moved is 127.0.0.2 (kept 200 s); the zone then moves it to 127.0.0.4
    # and every cache below A's decision is emptied, so Prosody's own lookup connects to an address the decision
    # does not know: B is there with a certificate that matches, but the address was never validated with the TLSA
    a, b, bed = world["a"], world["b"], world["bed"]
    move_after_a_verified_ping(world, "moved.dane.example", "t-moved")
    assert bed.query("t-moved.dane.example", "A")[2][0].split()[-1] == B_MOVED
    before = scrape(a)
    out = ping(a, "moved.dane.example")
    assert "pong" not in out, out
    assert "DANE: connected to 127.0.0.4, which is not an address of any DNSSEC-validated target" in out, out
    after = scrape(a)
    assert metric(after, "refused", "reason", "unmatched-address") == metric(before, "refused", "reason", "unmatched-address") + 1
    # the stale decision is dropped: the next attempt resolves anew, finds 127.0.0.4 validated, and verifies
    out = ping(a, "moved.dane.example")
    assert "pong from moved.dane.example" in out, out
    assert re.search(r"DANE: moved\.dane\.example verified by TLSA 3 1 1 at depth 0", a.log_text())
    assert re.search(r"Received\[s2sin\]: <iq[^>]*to='moved\.dane\.example'", b.log_text())


def test_under_required_an_address_no_target_has_is_refused_once_not_retried_forever(world):
    # As above, but A requires DANE and one target has no TLSA: the refusal is tied to no target of the decision,
    # so there is no next target to move to. It must end (and the decision go) instead of reconnecting to the same
    # address again and again.
    a = world["a"]
    move_after_a_verified_ping(world, "moved-req.dane.example", "t-mr-dane")
    before = scrape(a)
    out = ping(a, "moved-req.dane.example")
    assert "pong" not in out, out
    assert "DANE: connected to 127.0.0.4, which has no DNSSEC-signed TLSA records" in out, out
    after = scrape(a)
    assert metric(after, "refused", "reason", "required") == metric(before, "refused", "reason", "required") + 1
    assert metric(after, "fallbacks", "reason", "required") == metric(before, "fallbacks", "reason", "required")
    out = ping(a, "moved-req.dane.example")
    assert "pong from moved-req.dane.example" in out, out
    assert re.search(r"DANE: moved-req\.dane\.example verified by TLSA 3 1 1 at depth 0", a.log_text())


def test_a_tlsa_change_takes_effect_after_its_ttl_not_after_dane_cache_ttl(world):
    a, bed, ee = world["a"], world["bed"], world["ee"]
    out = ping(a, "shortttl.dane.example")
    assert "pong from shortttl.dane.example" in out, out
    shown = a.shell("dane:show()", check=False)
    m = re.search(r"shortttl\.dane\.example: dane \(policy opportunistic, cached (\d+)s more, bounded by TTL %d of "
                  r"_\d+\._tcp\.t-shortttl\.dane\.example TLSA\)" % SHORT_TTL, shown)
    assert m and int(m.group(1)) <= SHORT_TTL, shown
    # a decision resting on TTL-300 records and the zone's NSEC records (TTL 200: no AAAA, no _xmpps-server SRV) is
    # kept for 200 s, not for dane_cache_ttl (600)
    m = re.search(r"moved\.dane\.example: dane \(policy opportunistic, cached (\d+)s more, bounded by TTL %d of "
                  r"\S+\.moved\.dane\.example NSEC\)" % NEGATIVE_TTL, shown)
    assert m and int(m.group(1)) <= NEGATIVE_TTL, shown
    # the operator replaces the key: the old record goes, a record for another key comes
    bed.replace(f"_{world['b_port']}._tcp.t-shortttl", "TLSA", [f"3 1 1 {tb.flip(ee)}"], ttl=SHORT_TTL)
    changed = time.monotonic()
    bed.resign()
    close_s2s(world, "shortttl.dane.example")
    # within the TTL the validated answer may still be the old one (caches are allowed to keep it); after twice
    # the TTL (the resolver's copy, then the decision made from it) the new record must be in force
    time.sleep(max(0.0, 2 * SHORT_TTL + 1 - (time.monotonic() - changed)))
    out = ping(a, "shortttl.dane.example")
    assert "pong" not in out, out
    assert "DANE: certificate of t-shortttl.dane.example does not match its TLSA records" in out, out


def test_check_command_says_how_long_the_decision_is_kept(world):
    res = world["a"].prosodyctl("mod_native_dane", "check", "in-ok.dane.example", timeout=60, check=False)
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out
    assert re.search(r"the server keeps this decision %ds \(bounded by TTL %d of \S+ NSEC\)" % (NEGATIVE_TTL, NEGATIVE_TTL), out), out
    # the test bed signs for 30 days
    m = re.search(r"the first signature it rests on \(SRV, address or TLSA\) expires (\d{4}-\d\d-\d\d)", out)
    assert m and m.group(1) == time.strftime("%Y-%m-%d", time.gmtime(time.time() + 30 * 86400)), out
    assert "re-sign the zone" not in out, out


# -- fallback to the next SRV target --------------------------------------------------------------------------------

def send_batch(a, domain, tag, count):
    """`count` messages and one ping from A to domain, queued together; returns the shell output of the ping."""
    lua = (f">local st = require'util.stanza'; for i = 1, {count} do prosody.core_post_stanza(prosody.hosts['{SENDER}'], "
           f"st.message({{from='{SENDER}', to='nobody@{domain}', id='{tag}'..i, type='chat'}}):text_tag('body', '{tag}')) end")
    results = {}
    t = threading.Thread(target=lambda: results.update(msgs=a.shell(lua)))
    t.start()
    out = ping(a, domain)
    t.join(30)
    return out, results.get("msgs")


def test_a_dane_failure_on_one_target_falls_back_to_the_next(world):
    a, b = world["a"], world["b"]
    before = scrape(a)
    out, msgs = send_batch(a, "fallback.dane.example", "fb", 3)
    assert "pong from fallback.dane.example" in out, out
    assert msgs is not None, "the messages were not sent"
    a_log = a.log_text()
    assert re.search(r"DANE: refusing s2s connection to fallback\.dane\.example: certificate of t-fb-bad\.dane\.example "
                     r"does not match its TLSA records", a_log), a_log[-4000:]
    assert re.search(r"DANE: \d+ queued stanza\(s\) for fallback\.dane\.example go to its next target \(1 left\)", a_log), a_log[-4000:]
    assert "DANE: fallback.dane.example verified by TLSA 3 1 1 at depth 0 (target t-fb-good.dane.example)" in a_log
    # every queued stanza arrived once, none bounced
    b_log = b.log_text()
    for i in range(1, 4):
        assert len(re.findall(r"Received\[s2sin\]: <message[^>]*id='fb%d'" % i, b_log)) == 1, i
    assert "Sending error replies for" not in "\n".join(l for l in a_log.splitlines() if "fallback.dane.example" in l)
    after = scrape(a)
    assert metric(after, "fallbacks", "reason", "mismatch") == metric(before, "fallbacks", "reason", "mismatch") + 1
    shown = a.shell("dane:show()", check=False)
    assert re.search(r"  target t-fb-bad\.dane\.example:\d+ skipped: certificate of t-fb-bad\.dane\.example does not match",
                     shown), shown
    # the next connection goes straight to the good target while the decision lives
    close_s2s(world, "fallback.dane.example")
    out = ping(a, "fallback.dane.example")
    assert "pong from fallback.dane.example" in out, out
    a_log = a.log_text()
    assert len(re.findall(r"DANE: refusing s2s connection to fallback\.dane\.example: certificate of t-fb-bad", a_log)) == 1, \
        a_log[-4000:]
    assert re.search(r"DANE: skipping 127\.0\.0\.5 port \d+ for fallback\.dane\.example", a_log), a_log[-4000:]


def test_when_every_target_fails_the_bounce_names_each_cause(world):
    a = world["a"]
    out = ping(a, "fallback-all.dane.example")
    assert "pong" not in out, out
    assert re.search(r"DANE: no target of fallback-all\.dane\.example could be verified: "
                     r"certificate of t-fa-1\.dane\.example does not match its TLSA records \([^)]*\); "
                     r"certificate of t-fa-2\.dane\.example does not match its TLSA records", out), out
    # further stanzas are refused at once while the decision lives, with the same text
    out = ping(a, "fallback-all.dane.example")
    assert "DANE: no target of fallback-all.dane.example could be verified" in out, out
    assert len(re.findall(r"DANE: refusing s2s connection to fallback-all\.dane\.example: ", a.log_text())) == 2


def test_when_the_next_target_fails_otherwise_the_bounce_still_names_the_dane_failure(world):
    out = ping(world["a"], "fallback-dead.dane.example")
    assert "pong" not in out, out
    assert re.search(r"DANE: certificate of t-fd-bad\.dane\.example does not match its TLSA records \([^)]*\); "
                     r"then the next target: .*refused", out, re.I), out


def test_signature_expiry_bounds_the_decision_and_warns(tmp_path):
    # records with a one-day TTL, signatures that run out in an hour: the decision must not outlive the signatures
    bed = tb.DNSSECTestbed(tmp_path / "dns", negative_ttl=86400, sig_validity=3600)
    bed.add("_xmpp-server._tcp.expiring", "SRV", "0 0 5269 t-expiring.dane.example.", ttl=86400)
    bed.add("t-expiring", "A", "127.0.0.7", ttl=86400)
    bed.add("_5269._tcp.t-expiring", "TLSA", "3 1 1 " + "ab" * 32, ttl=86400)
    bed.start()
    srv = S2SProsody(name="dane-expiring", s2s_port=tb.free_port(), s2s_interface="127.0.0.1", vhosts=[SENDER],
                     modules=["native_dane"],
                     global_options={"unbound": {"resolvconf": False, "hoststxt": False, "forward": bed.resolver,
                                                 "trusted": bed.trust_anchor},
                                     "dane_cache_ttl": 86400, "dane_check_timeout": 2})
    try:
        res = srv.prosodyctl("mod_native_dane", "check", "expiring.dane.example", timeout=60, check=False)
        out = res.stdout.decode(errors="replace")
        m = re.search(r"the server keeps this decision (\d+)s \(bounded by RRSIG expiry of \S+ (SRV|A|TLSA|NSEC)\)", out)
        assert m and 3500 <= int(m.group(1)) <= 3600, out
        assert "WARNING: a signature of the DNS records of expiring.dane.example expires within 7 days" in out, out
    finally:
        srv.cleanup()
        bed.stop()
