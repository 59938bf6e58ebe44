"""Differential spec: prosody_native.dane against OpenSSL's own command-line tools.

For several chain shapes served by `openssl s_server` on 127.0.0.1, every usage x selector x matching type, for every
certificate of the chain it can name (leaf, issuer, root), matching and mismatching, plus digest-agility and mixed
sets: the verdict of `openssl s_client -dane_tlsa_domain ... -dane_tlsa_rrdata ...` (a live handshake) must equal the
engine's offline verdict on the same chain and records, and so must the first X.509 error. Record sets without any
usable record (s_client refuses to run with those) are compared with `openssl verify`, which is what plain PKIX
means. The association data is computed here with hashlib, independently of the engine.
"""

import concurrent.futures
import functools
import re
import socket
import subprocess
import time

import pytest

import dnssec_testbed as tb
import harness

BASE = "xmpp.dane.example"
WORKERS = 8
LUA_VERIFY = r"""
package.cpath = os.getenv("PN_ROOT") .. "/" .. (os.getenv("PN_BUILD") or "build") .. "/?.so;" .. package.cpath
local dane = require "prosody_native.dane"
local verifiers = {}
for line in io.lines() do
	local chainfile, cafile, records = line:match("^([^|]*)|([^|]*)|(.*)$")
	local v = verifiers[cafile]
	if not v then
		v = assert(dane.new(cafile ~= "-" and { cafile = cafile } or nil))
		verifiers[cafile] = v
	end
	local f = assert(io.open(chainfile, "rb")); local chain = f:read("a"); f:close()
	local recs = {}
	for r in records:gmatch("[^;]+") do
		local u, s, m, data = assert(dane.parse_text(r))
		recs[#recs + 1] = { usage = u, selector = s, mtype = m, data = data }
	end
	local res = assert(v:verify(chain, recs, { base = "xmpp.dane.example" }))
	local ok = res.verdict == "verified" or ((res.verdict == "unusable-only" or res.verdict == "no-records") and res.pkix)
	print(("%s %s %s"):format(res.verdict, ok and "OK" or "FAIL", tostring(res.x509_error or 0)))
end
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("dane-pki")
    p = tb.make_pki(d, [BASE, "dane.example"])
    wrong = tb.make_pki(d, ["other.example"], prefix="wrong-", key=p["key"])
    # the wrong-name leaf signed by the same issuer as the good one
    tb.run(["openssl", "x509", "-req", "-in", wrong["leaf"].replace("leaf.pem", "leaf.csr"), "-CA", p["int"], "-CAkey",
            p["int"].replace("int.pem", "int.key"), "-set_serial", "9", "-days", "30", "-extfile",
            str(d / "wrong-ext.cnf"), "-extensions", "leaf", "-out", str(d / "wrongname.pem")])
    leaf, inter, root = (open(p[n]).read() for n in ("leaf", "int", "root"))
    shapes = {
        "leaf+int": leaf + inter,
        "leaf+int+root": leaf + inter + root,
        "wrongname+int+root": (d / "wrongname.pem").read_text() + inter + root,
        "leaf": leaf,
    }
    files = {}
    for name, text in shapes.items():
        f = d / f"shape-{name}.pem"
        f.write_text(text)
        files[name] = str(f)
    return p, files


class SServer:
    def __init__(self, cert_chain_file, key, tmp):
        certs = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", open(cert_chain_file).read(), re.S)
        (tmp / "s-leaf.pem").write_text(certs[0])
        args = ["-cert", str(tmp / "s-leaf.pem")]
        if certs[1:]:
            (tmp / "s-rest.pem").write_text("".join(certs[1:]))
            args += ["-cert_chain", str(tmp / "s-rest.pem")]
        self.port = tb.free_port()
        self.proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", *args,
                                      "-key", key, "-quiet", "-no_ticket"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("s_server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def s_client(port, records, cafile):
    trust = ["-CAfile", cafile] if cafile != "-" else ["-no-CAfile", "-no-CApath", "-no-CAstore"]
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *trust, "-dane_tlsa_domain", BASE,
            "-dane_ee_no_namechecks"]
    for r in records:
        args += ["-dane_tlsa_rrdata", r]
    res = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    out = res.stdout + res.stderr
    if "Failed to import any TLSA records" in out:
        return "no-usable", None
    first = re.search(r"verify error:num=(\d+)", out)
    if "Verification: OK" in out:
        return "OK", 0
    if "Verification error" in out or first:
        return "FAIL", int(first.group(1)) if first else None
    raise AssertionError(f"cannot read s_client output: {out}")


def openssl_verify(chain_file, cafile, tmp):
    """Plain PKIX on the same chain: `openssl verify` with the rest of the chain as untrusted."""
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", open(chain_file).read(), re.S)
    leaf, rest = tmp / "v-leaf.pem", tmp / "v-rest.pem"
    leaf.write_text(certs[0])
    rest.write_text("".join(certs[1:]))
    trust = ["-CAfile", cafile] if cafile != "-" else ["-no-CAfile", "-no-CApath", "-no-CAstore"]
    args = ["openssl", "verify", *trust, "-purpose", "sslserver", "-verify_hostname", BASE]
    if certs[1:]:
        args += ["-untrusted", str(rest)]
    res = subprocess.run(args + [str(leaf)], capture_output=True, text=True, timeout=30)
    m = re.search(r"error (\d+) at", res.stdout + res.stderr)
    return ("OK", 0) if res.returncode == 0 else ("FAIL", int(m.group(1)) if m else None)


def engine_verdicts(lines):
    env = harness.lua_env({"PN_ROOT": str(harness.REPO)})
    res = subprocess.run([harness.LUA, "-e", LUA_VERIFY], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = []
    for line in res.stdout.splitlines():
        verdict, ok, err = line.split()
        out.append((verdict, ok, int(err)))
    assert len(out) == len(lines)
    return out


@functools.lru_cache(maxsize=None)
def data_for(cert, selector, mtype):
    return tb.tlsa_data(cert, selector, mtype)


def cases_for(p):
    """(label, records) for one chain: every u s m for each certificate it may name, matching and not; agility."""
    certs = {"leaf": p["leaf"], "int": p["int"], "root": p["root"]}
    cases = []
    for u in range(4):
        for s in range(2):
            for m in range(3):
                for cname in (["leaf"] if u in (1, 3) else ["int", "root"]):
                    data = data_for(certs[cname], s, m)
                    cases.append((f"{u} {s} {m} {cname}", [f"{u} {s} {m} {data}"]))
                    bad = tb.flip(data) if m else data_for(p["int"] if cname == "leaf" else p["leaf"], s, 0)
                    cases.append((f"{u} {s} {m} {cname} mismatch", [f"{u} {s} {m} {bad}"]))
    ee256, ee512 = data_for(p["leaf"], 1, 1), data_for(p["leaf"], 1, 2)
    ta256 = data_for(p["int"], 1, 1)
    cases += [
        ("agility: good 3 1 1, bad 3 1 2", [f"3 1 1 {ee256}", f"3 1 2 {tb.flip(ee512)}"]),
        ("agility: bad 3 1 1, good 3 1 2", [f"3 1 1 {tb.flip(ee256)}", f"3 1 2 {ee512}"]),
        ("agility: good 3 1 1, bad 3 0 2", [f"3 1 1 {ee256}", f"3 0 2 {tb.flip(data_for(p['leaf'], 0, 2))}"]),
        ("agility across certificates", [f"2 1 1 {ta256}", f"2 1 2 {tb.flip(data_for(p['root'], 1, 2))}"]),
        ("bad EE, good TA", [f"3 1 1 {tb.flip(ee256)}", f"2 1 1 {ta256}"]),
        ("bad EE, good PKIX-EE", [f"3 1 1 {tb.flip(ee256)}", f"1 1 1 {ee256}"]),
        ("unusable + bad EE", [f"4 1 1 {ee256}", f"3 1 1 {tb.flip(ee256)}"]),
        ("unusable + good EE", [f"3 1 1 {ee256[:-2]}", f"3 1 1 {ee256}"]),
        ("unusable only", [f"4 1 1 {ee256}", f"3 2 1 {ee256}", f"3 1 1 {ee256[:-2]}"]),
    ]
    return cases


@pytest.mark.parametrize("shape,trusted", [
    ("leaf+int", True), ("leaf+int", False), ("leaf+int+root", True), ("leaf+int+root", False),
    ("wrongname+int+root", True), ("leaf", True),
])
def test_engine_agrees_with_openssl(pki, shape, trusted, tmp_path):
    p, files = pki
    chain_file = files[shape]
    cafile = p["root"] if trusted else "-"
    key = p["key"]
    cases = cases_for(p)
    # s_server answers one handshake at a time: several of them keep the clients busy
    servers = []
    try:
        for _ in range(WORKERS):
            servers.append(SServer(chain_file, key, tmp_path))
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            theirs = list(pool.map(lambda ic: s_client(servers[ic[0] % WORKERS].port, ic[1][1], cafile),
                                   enumerate(cases)))
    finally:
        for server in servers:
            server.stop()
    ours = engine_verdicts([f"{chain_file}|{cafile}|{';'.join(recs)}" for _, recs in cases])
    pkix = openssl_verify(chain_file, cafile, tmp_path)
    disagreements = []
    verified = mismatched = 0
    for (label, _), (t_ok, t_err), (verdict, o_ok, o_err) in zip(cases, theirs, ours):
        if t_ok == "no-usable":
            # s_client will not run without a usable record: compare with plain PKIX (openssl verify)
            expect = pkix
            if verdict != "unusable-only" or (o_ok, o_err) != expect:
                disagreements.append(f"{label}: openssl verify {expect}, engine {verdict} {o_ok} {o_err}")
            continue
        if t_ok != o_ok or t_err != o_err:
            disagreements.append(f"{label}: s_client {t_ok} {t_err}, engine {verdict} {o_ok} {o_err}")
        verified += o_ok == "OK"
        mismatched += o_ok == "FAIL"
    assert not disagreements, "\n".join(disagreements)
    # every shape has both outcomes: a suite where everything passes (or fails) compares nothing
    assert verified > 0 and mismatched > 0, (verified, mismatched)
