"""prosody-native: end-to-end cost of stream management, server CPU per delivered message.

    /usr/bin/python3 bench/smacks_bench.py [--quick] [N]

Starts a throwaway Prosody (spec/integration/harness.py) three times: stream management off, Prosody's mod_smacks,
mod_native_smacks. A sender floods N <message type='chat'> with <no-store/> (no MAM, no offline) to one full JID
whose client has stream management enabled (except "off") and answers every <r/> at once with the count of stanzas
it parsed. Server CPU = utime + stime of the Prosody process (procfs) from the first message sent to the last one
received. Reports µs per delivered message (median of REPS runs per mode) and the overhead of each module against
"off"; the issue's target for mod_native_smacks is at most +4 % (mod_smacks measured ≈ +12 %).
"""

import os
import socket
import statistics
import sys
import threading
import time
import xml.parsers.expat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "spec", "integration"))

import harness  # noqa: E402
from harness import RawXMPP  # noqa: E402

SM3 = "urn:xmpp:sm:3"
MODES = {
    "off": {"modules_disabled": ["smacks"]},
    "mod_smacks": {},
    "native_smacks": {"modules": ["native_smacks"], "modules_disabled": ["smacks"]},
}


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Receiver(threading.Thread):
    """Reads the stream with expat, counts top-level stanzas, answers <r/> with <a h/> at once."""

    def __init__(self, client, expect):
        super().__init__(daemon=True)
        self.c = client
        self.expect = expect
        self.messages = 0
        self.stanzas = 0
        self.acks_sent = 0
        self.done = threading.Event()
        self.synced = threading.Event()
        self.depth = 0
        p = xml.parsers.expat.ParserCreate()
        p.StartElementHandler = self.start_element
        p.EndElementHandler = self.end_element
        self.parser = p

    def start_element(self, name, attrs):
        self.depth += 1
        if self.depth == 2 and name == "iq" and attrs.get("id") == "sync":
            self.synced.set()

    def end_element(self, name):
        if self.depth == 2:
            if name in ("message", "presence", "iq"):
                self.stanzas += 1
                if name == "message":
                    self.messages += 1
                    if self.messages >= self.expect:
                        self.done.set()
            elif name == "r":
                self.c.sock.sendall(f"<a xmlns='{SM3}' h='{self.stanzas % 2**32}'/>".encode())
                self.acks_sent += 1
        self.depth -= 1

    def run(self):
        self.parser.Parse("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        self.parser.Parse(self.c.buf.encode())
        self.c.sock.settimeout(None)
        while not self.done.is_set():
            try:
                data = self.c.sock.recv(65536)
            except OSError:  # closed by the main thread once everything arrived
                break
            if not data:
                break
            self.parser.Parse(data)


def one_run(mode, n):
    srv = harness.ProsodyServer(name=f"bench-{mode}", **MODES[mode])
    # Prosody logs every stanza at debug level; a benchmark measures the server, not its debug log
    srv.global_options["log"] = {"info": str(srv.log_path)}
    srv.write_config()
    try:
        srv.register("recv", "pass")
        srv.register("send", "pass")
        srv.start()
        rc = RawXMPP(srv.c2s_port)
        jid = rc.login("recv", "pass", "bench")
        if mode != "off":
            rc.send(f"<enable xmlns='{SM3}' resume='true'/>")
            rc.read_until(r"<enabled\b[^>]*/>")
        # from here on the receiver thread reads (and counts, and acks) everything
        recv = Receiver(rc, n)
        recv.start()
        rc.send("<presence/><iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>")
        if not recv.synced.wait(10):
            raise RuntimeError("no answer to the sync ping")
        sc = RawXMPP(srv.c2s_port)
        sc.login("send", "pass", "flood")
        body = "x" * 120
        batch = "".join(f"<message to='{jid}' type='chat' id='b{i}'><body>{body}</body>"
                        f"<no-store xmlns='urn:xmpp:hints'/></message>" for i in range(200))
        cpu0, t0 = cpu_seconds(srv.pid), time.monotonic()
        for _ in range(n // 200):
            sc.sock.sendall(batch.encode())
        if not recv.done.wait(300):
            raise RuntimeError(f"{mode}: only {recv.messages} of {n} messages arrived")
        cpu, wall = cpu_seconds(srv.pid) - cpu0, time.monotonic() - t0
        sc.close()
        rc.sock.close()
        return cpu * 1e6 / n, wall, recv.acks_sent
    finally:
        srv.cleanup()


def main():
    quick = "--quick" in sys.argv
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else (4000 if quick else 20000)
    n -= n % 200
    reps = 3 if quick else 5
    print(f"smacks end-to-end bench: {n} messages per run, {reps} runs per mode (median), server CPU per message")
    results = {}
    for _ in range(reps):
        for mode in MODES:  # interleaved, so drift on a noisy machine hits every mode alike
            us, wall, acks = one_run(mode, n)
            results.setdefault(mode, []).append((us, wall, acks))
    base = statistics.median(r[0] for r in results["off"])
    for mode, runs in results.items():
        us = statistics.median(r[0] for r in runs)
        acks = statistics.median(r[2] for r in runs)
        extra = "" if mode == "off" else f"   overhead {100 * (us - base) / base:+6.1f} %"
        print(f"{mode:<14} {us:8.1f} µs CPU per delivered message   <a/> per 1000 messages {1000 * acks / n:6.1f}{extra}")
    native = statistics.median(r[0] for r in results["native_smacks"])
    overhead = 100 * (native - base) / base
    print(("target met" if overhead <= 4 else "target missed") + f": mod_native_smacks overhead {overhead:+.1f} % (target <= +4 %)")


if __name__ == "__main__":
    main()
