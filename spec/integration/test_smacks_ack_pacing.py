"""Ack-request pacing of mod_native_smacks (smacks_ack_request_interval): a flood is acknowledged in a few <r/>
round trips, light traffic is asked at once, and the last stanzas of a burst are always requested."""

import math
import re
import threading
import time

import harness
from test_smacks_protocol import SM3, client_and_sender, smacks_server, wait_log

R = re.compile(r"<r xmlns=['\"]%s['\"]/>" % SM3)


def unacked(server, full):
    return int(server.shell_result("local s = prosody.full_sessions[%s]; local q = s and s.outgoing_stanza_queue; "
                                   "return q and q:count_unacked() or -1" % harness.lua_string(full)))


def flood(server, n):
    """n messages to an SM client that answers every <r/> at once; returns (<r/> count, seconds until all were
    acknowledged)."""
    user, c, sender = client_and_sender(server)
    body = "y" * 100
    t0 = time.monotonic()

    def send_in_chunks():  # 10 writes, 30 ms apart
        for k in range(10):
            sender.send("".join(f"<message to='{c.jid}' type='chat' id='f{i}'><body>{body}</body></message>"
                                for i in range(k * n // 10, (k + 1) * n // 10)))
            time.sleep(0.03)
    writer = threading.Thread(target=send_in_chunks, daemon=True)
    writer.start()
    got = requests = 0
    while got < n:
        text = c.read_until(r"<message\b.*?</message>|<r xmlns=['\"]%s['\"]/>" % SM3, 20)
        if R.search(text[-40:]) and text.endswith("/>"):
            requests += 1
            c.send(f"<a xmlns='{SM3}' h='{got}'/>")
        else:
            got += 1
    # the rest of the burst is requested once the interval is over, and acknowledged
    deadline = time.monotonic() + 10
    while unacked(server, c.jid) and time.monotonic() < deadline:
        try:
            c.read_until(R.pattern, 0.5)
            requests += 1
            c.send(f"<a xmlns='{SM3}' h='{got}'/>")
        except TimeoutError:
            pass
    took = time.monotonic() - t0  # every request counted above was sent within this time
    assert unacked(server, c.jid) == 0
    writer.join()
    sender.close()
    return requests, took, c


def test_a_flood_is_acknowledged_in_few_round_trips(prosody_factory):
    # an interval long enough that every write of the flood arrives within it, even on a machine slowed by
    # sanitizers and other work (at 0.1 s a slow run spread the writes out so far that none was paced)
    server = smacks_server(prosody_factory, smacks_ack_request_interval=1)
    requests, took, _ = flood(server, 400)
    # at most one request per interval (plus the first and the final one), however the flood was cut into writes
    assert 1 <= requests <= 2 + math.ceil(took / 1), (requests, took)
    assert "Sending <r> (paced)" in server.log_text()


def test_without_pacing_every_write_may_ask(prosody_factory):
    server = smacks_server(prosody_factory, smacks_ack_request_interval=0)
    requests, took, _ = flood(server, 400)
    assert requests >= 1
    assert "Sending <r> (paced)" not in server.log_text()
    print(f"interval 0: {requests} requests for 400 messages in {took:.3f}s")


def test_light_traffic_is_asked_at_once(prosody_factory):
    server = smacks_server(prosody_factory, smacks_ack_request_interval=5)
    user, c, sender = client_and_sender(server)
    for i in range(3):
        sender.send(f"<message to='{c.jid}' type='chat' id='l{i}'><body>hi</body></message>")
        c.read_until(r"<message\b.*?</message>")
        c.read_until(R.pattern, 2)  # well within the 5 s interval: a lone stanza is not paced
        c.send(f"<a xmlns='{SM3}' h='{i + 1}'/>")
    assert unacked(server, c.jid) == 0
    assert "Sending <r> (paced)" not in server.log_text()
    sender.close()


def test_bad_interval_is_refused(prosody_factory):
    server = smacks_server(prosody_factory, smacks_ack_request_interval=-1)
    wait_log(server, "option 'smacks_ack_request_interval' must be")
