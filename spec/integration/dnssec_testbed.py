"""Local DNSSEC test bed and test PKI for the DANE specs (mod_native_dane).

Everything runs on 127.0.0.1 in a temporary directory, with no internet:

  nsd      authoritative for `dane.example.` (signed with ldns-signzone, ECDSA P-256), its unsigned child
           `insecure.dane.example.` (no DS: insecure) and `bogus.dane.example.` (signed, but the parent publishes the DS of
           an unused key: bogus delegation);
  unbound  validating resolver that trusts the DS of `dane.example.` and stubs the zones to nsd.

Records flagged `bogus=True` get their RRSIG corrupted after signing (one base64 character flipped), so the validator
reports them bogus while everything else in the zone stays secure.

    bed = DNSSECTestbed(tmpdir)
    bed.add("_xmpp-server._tcp.good", "SRV", "0 0 5269 xmpp.good.dane.example.")
    bed.add("_5269._tcp.xmpp.good", "TLSA", "3 1 1 ...")
    bed.add("xmpp4", "A", "127.0.0.1", bogus=True)
    bed.add("xmpp5", "A", "127.0.0.5", ttl=4)   # its own TTL (the zone default is 300 s)
    bed.start()                      # -> bed.resolver ("127.0.0.1@port"), bed.trust_anchor ("dane.example. IN DS ...")
    bed.query("_xmpp-server._tcp.good.dane.example", "SRV")  # -> (rcode, ad flag, answer lines) via dig
    bed.replace("_5269._tcp.xmpp.good", "TLSA", ["3 1 1 ..."])  # change the data,
    bed.resign()                     # re-sign with the same keys and restart nsd (the resolver's cache keeps old data)
    bed.flush()                      # restart the validating resolver with an empty cache
    bed.stop()

Needs the Debian packages nsd, unbound, ldnsutils and bind9-dnsutils (spec/deps.sh installs them).

`make_pki(dir, names)` writes a root CA, an issuing CA and a leaf (EC P-256) plus helper files, and `tlsa_data()`
computes TLSA association data with the openssl CLI and hashlib (independently of the engine under test).
"""

import hashlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ZONE = "dane.example."
NSD = "/usr/sbin/nsd"
UNBOUND = "/usr/sbin/unbound"
DIG = "/usr/bin/dig"
TOOLS = (NSD, UNBOUND, DIG, "/usr/bin/ldns-signzone", "/usr/bin/ldns-keygen")


class TestbedError(Exception):
    pass


def tools_missing():
    return [t for t in TOOLS if not os.path.exists(t)]


def free_port(kind=socket.SOCK_STREAM):
    """A port free for both TCP and UDP on 127.0.0.1 (DNS servers listen on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise TestbedError("no free port")


def run(cmd, cwd=None, check=True):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(map(str, cmd))} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


class DNSSECTestbed:
    def __init__(self, tmp, negative_ttl=300, sig_validity=None):
        self.negative_ttl = negative_ttl  # SOA TTL and minimum: ldns-signzone gives NSEC records the smaller of the two
        self.sig_validity = sig_validity  # seconds from now to the RRSIGs' expiration (default: 30 days, to the day)
        self.dir = Path(tmp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = []        # (owner relative to ZONE, type, rdata, bogus)
        self.insecure = []       # records of insecure.dane.example (owner relative to it)
        self.bogus_child = []    # records of bogus.dane.example
        self.dead = []           # child zones whose server refuses to answer (resolution errors)
        self.nsd_port = None
        self.port = None
        self.procs = []
        self.trust_anchor = None
        self.serial = 1

    # -- zone content ---------------------------------------------------------------------------------------------

    def add(self, owner, rtype, rdata, bogus=False, ttl=None):
        self.records.append((owner, rtype, rdata, bogus, ttl))

    def replace(self, owner, rtype, rdatas, ttl=None, bogus=False):
        """Replace the RRset (owner, rtype) of the signed zone; takes effect at resign()."""
        self.records = [r for r in self.records if not (r[0] == owner and r[1] == rtype)]
        for rdata in rdatas:
            self.add(owner, rtype, rdata, bogus=bogus, ttl=ttl)

    def add_insecure(self, owner, rtype, rdata):
        self.insecure.append((owner, rtype, rdata))

    def add_bogus_child(self, owner, rtype, rdata):
        self.bogus_child.append((owner, rtype, rdata))

    def add_dead_child(self, label):
        """`label.dane.example` is delegated (insecurely) to a server that has no data for it (nsd without its
        zone file answers SERVFAIL): a resolution error that is not a DNSSEC failure."""
        self.dead.append(label)

    @property
    def resolver(self):
        return f"127.0.0.1@{self.port}"

    def _zone_text(self, origin, records):
        lines = [f"$ORIGIN {origin}", "$TTL 300",
                 f"@ {self.negative_ttl} IN SOA ns.{ZONE} hostmaster.{ZONE} {self.serial} 3600 600 86400 {self.negative_ttl}",
                 f"@ IN NS ns.{ZONE}"]
        for rec in records:
            owner, rtype, rdata = rec[0], rec[1], rec[2]
            ttl = rec[4] if len(rec) > 4 and rec[4] is not None else ""
            lines.append(f"{owner} {ttl} IN {rtype} {rdata}")
        return "\n".join(lines) + "\n"

    def _keygen(self, name, ksk):
        args = ["ldns-keygen", "-a", "ECDSAP256SHA256"] + (["-k"] if ksk else []) + [name]
        return run(args, cwd=self.dir).stdout.strip()

    def _sign(self, zonefile, origin, zsk, ksk):
        inception = time.strftime("%Y%m%d", time.gmtime(time.time() - 86400))
        if self.sig_validity is None:
            expiration = time.strftime("%Y%m%d", time.gmtime(time.time() + 30 * 86400))
        else:
            expiration = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + self.sig_validity))
        run(["ldns-signzone", "-i", inception, "-e", expiration, "-o", origin, zonefile, zsk, ksk], cwd=self.dir)
        return self.dir / (zonefile + ".signed")

    def _ds(self, key):
        return (self.dir / f"{key}.ds").read_text().split("\n")[0].strip()

    @staticmethod
    def _corrupt(signed_path, bogus):
        """Flip one base64 character in the RRSIG over each (owner FQDN, type) in `bogus`."""
        out, hit = [], set()
        for line in signed_path.read_text().splitlines():
            f = line.split()
            if len(f) > 5 and f[3] == "RRSIG" and (f[0].lower(), f[4].upper()) in bogus:
                sig = f[-1]
                i = len(sig) // 2
                f[-1] = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1:]
                line = "\t".join(f)
                hit.add((f[0].lower(), f[4].upper()))
            out.append(line)
        missing = set(bogus) - hit
        if missing:
            raise TestbedError(f"no RRSIG found to corrupt for {sorted(missing)}")
        signed_path.write_text("\n".join(out) + "\n")

    def _write_parent(self):
        """Writes and signs the parent zone from self.records; returns the signed file."""
        d = self.dir
        ksk, zsk, unused_ksk = self._keys
        parent_records = [r[:4] for r in self.records]
        parent_records.append(("ns", "A", "127.0.0.1", False))
        parent_records.append(("insecure", "NS", f"ns.{ZONE}", False))
        parent_records.append(("bogus", "NS", f"ns.{ZONE}", False))
        for label in self.dead:
            parent_records.append((label, "NS", f"ns.{ZONE}", False))
        # the parent vouches for a key the child does not use: bogus delegation
        ds = self._ds(unused_ksk).split()
        parent_records.append(("bogus", "DS", " ".join(ds[3:]), False))

        (d / "parent.zone").write_text(self._zone_text(ZONE, self.records + parent_records[len(self.records):]))
        for k in (ksk, zsk):
            text = (d / f"{k}.key").read_text()
            with open(d / "parent.zone", "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        signed = self._sign("parent.zone", ZONE, zsk, ksk)
        self._corrupt(signed, {(((r[0] + "." + ZONE) if r[0] != "@" else ZONE).lower(), r[1].upper())
                               for r in self.records if r[3]})
        return signed

    def resign(self, timeout=15.0):
        """Re-sign the parent zone after replace()/add() (same keys, next serial) and restart nsd on its port.
        The validating resolver keeps what it has cached until the records' TTLs run out (or flush())."""
        self.serial += 1
        self._write_parent()
        self._restart("nsd", [NSD, "-c", str(self.dir / "nsd.conf"), "-d"])
        self._wait_secure(timeout, direct=True)

    def flush(self, timeout=15.0):
        """Restart the validating resolver on its port: an empty cache."""
        self._restart("unbound", [UNBOUND, "-d", "-c", str(self.dir / "unbound.conf")])
        self._wait_secure(timeout)

    def _restart(self, name, cmd):
        for p, n in list(self.procs):
            if n == name:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
                self.procs.remove((p, n))
        self._spawn(cmd, name)

    def _wait_secure(self, timeout, direct=False):
        deadline = time.monotonic() + timeout
        while True:
            for p, name in self.procs:
                if p.poll() is not None:
                    raise TestbedError(f"{name} exited with {p.returncode}: {self.log(name)}")
            if direct:  # nsd itself, without the resolver's cache in between
                res = run([DIG, "@127.0.0.1", "-p", str(self.nsd_port), "+tries=1", "+time=1", "SOA", ZONE], check=False)
                if f" {self.serial} " in res.stdout:
                    return
            else:
                rcode, ad, _ = self.query("ns." + ZONE, "A", check=False)
                if rcode == "NOERROR" and ad:
                    return
            if time.monotonic() > deadline:
                raise TestbedError(f"test bed did not answer within {timeout}s: "
                                   f"nsd: {self.log('nsd')} unbound: {self.log('unbound')}")
            time.sleep(0.1)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self, timeout=15.0):
        missing = tools_missing()
        if missing:
            raise TestbedError(f"missing tools {missing}: run `make deps` (spec/deps.sh)")
        d = self.dir
        child = "bogus." + ZONE
        insecure = "insecure." + ZONE

        # keys
        ksk = self._keygen(ZONE, True)
        zsk = self._keygen(ZONE, False)
        child_ksk = self._keygen(child, True)
        child_zsk = self._keygen(child, False)
        unused_ksk = self._keygen(child, True)
        self.trust_anchor = self._ds(ksk)
        self._keys = (ksk, zsk, unused_ksk)
        signed = self._write_parent()

        (d / "bogus.zone").write_text(self._zone_text(child, self.bogus_child))
        for k in (child_ksk, child_zsk):
            with open(d / "bogus.zone", "a") as f:
                f.write((d / f"{k}.key").read_text() + "\n")
        child_signed = self._sign("bogus.zone", child, child_zsk, child_ksk)
        (d / "insecure.zone").write_text(self._zone_text(insecure, self.insecure))

        # nsd
        self.nsd_port = free_port()
        (d / "nsd.conf").write_text(f"""server:
    ip-address: 127.0.0.1@{self.nsd_port}
    port: {self.nsd_port}
    database: ""
    username: ""
    chroot: ""
    zonesdir: "{d}"
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: no
zone:
    name: "{ZONE}"
    zonefile: "{signed}"
zone:
    name: "{child}"
    zonefile: "{child_signed}"
zone:
    name: "{insecure}"
    zonefile: "{d}/insecure.zone"
""" + "".join(f"""zone:
    name: "{label}.{ZONE}"
    zonefile: "{d}/{label}.missing.zone"
""" for label in self.dead))
        run([NSD, "-c", str(d / "nsd.conf"), "-v"], check=False)
        self._spawn([NSD, "-c", str(d / "nsd.conf"), "-d"], "nsd")

        # unbound
        self.port = free_port()
        (d / "anchor.ds").write_text(self.trust_anchor + "\n")
        (d / "unbound.conf").write_text(f"""server:
    interface: 127.0.0.1
    port: {self.port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: ""
    use-syslog: no
    verbosity: 1
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{d}/anchor.ds"
    access-control: 127.0.0.0/8 allow
    val-log-level: 2
    domain-insecure: "example."
    cache-max-ttl: 300
remote-control:
    control-enable: no
stub-zone:
    name: "{ZONE}"
    stub-addr: 127.0.0.1@{self.nsd_port}
stub-zone:
    name: "{child}"
    stub-addr: 127.0.0.1@{self.nsd_port}
stub-zone:
    name: "{insecure}"
    stub-addr: 127.0.0.1@{self.nsd_port}
""" + "".join(f"""stub-zone:
    name: "{label}.{ZONE}"
    stub-addr: 127.0.0.1@{self.nsd_port}
""" for label in self.dead))
        self._spawn([UNBOUND, "-d", "-c", str(d / "unbound.conf")], "unbound")

        deadline = time.monotonic() + timeout
        while True:
            for p, name in self.procs:
                if p.poll() is not None:
                    raise TestbedError(f"{name} exited with {p.returncode}: {self.log(name)}")
            rcode, ad, _ = self.query("ns." + ZONE, "A", check=False)
            if rcode == "NOERROR" and ad:
                return self
            if time.monotonic() > deadline:
                raise TestbedError(f"test bed did not answer securely within {timeout}s: "
                                   f"nsd: {self.log('nsd')} unbound: {self.log('unbound')}")
            time.sleep(0.1)

    def _spawn(self, cmd, name):
        out = open(self.dir / f"{name}.out", "wb")
        try:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                                 start_new_session=True)
        finally:
            out.close()
        self.procs.append((p, name))

    def log(self, name):
        text = ""
        for f in (f"{name}.out", f"{name}.log"):
            try:
                text += (self.dir / f).read_text(errors="replace")[-3000:]
            except FileNotFoundError:
                pass
        return text

    def stop(self):
        for p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs = []

    # -- queries --------------------------------------------------------------------------------------------------

    def query(self, name, rtype, check=True):
        """Asks the validating resolver; returns (rcode, authenticated-data flag, answer lines)."""
        res = run([DIG, "@127.0.0.1", "-p", str(self.port), "+dnssec", "+tries=1", "+time=2", name, rtype],
                  check=check)
        rcode, ad, answers, section = None, False, [], None
        for line in res.stdout.splitlines():
            if "status:" in line:
                rcode = line.split("status:")[1].split(",")[0].strip()
            if line.startswith(";; flags:"):
                ad = " ad" in line.split(";")[2] if line.count(";") >= 3 else " ad " in line
            if line.startswith(";; ANSWER SECTION"):
                section = "answer"
                continue
            if line.startswith(";;"):
                section = None
            if section == "answer" and line.strip() and not line.startswith(";"):
                answers.append(line)
        return rcode, ad, answers


# -- test PKI -------------------------------------------------------------------------------------------------------

EXT = """[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = @alt
[alt]
"""


def make_pki(d, names, prefix="", key=None):
    """Root, issuer and leaf (SANs `names`) under d. Returns a dict of paths: root, int, leaf, key (leaf key),
    chain (leaf + issuer, what a server sends), fullchain (leaf + issuer + root). With `key` the leaf reuses that
    key file (same SPKI, another certificate)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    p = lambda n: str(d / f"{prefix}{n}")  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ext = EXT + "".join(f"DNS.{i + 1} = {n}\n" for i, n in enumerate(names))
    Path(p("ext.cnf")).write_text(ext)
    run(["openssl", "req", "-x509", *ec, "-keyout", p("root.key"), "-out", p("root.pem"), "-subj", f"/CN={prefix}Test-Root",
         "-days", "7300", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run(["openssl", "req", "-new", *ec, "-keyout", p("int.key"), "-out", p("int.csr"), "-subj", f"/CN={prefix}Test-Issuer"])
    run(["openssl", "x509", "-req", "-in", p("int.csr"), "-CA", p("root.pem"), "-CAkey", p("root.key"), "-set_serial", "2",
         "-days", "3650", "-extfile", p("ext.cnf"), "-extensions", "ca", "-out", p("int.pem")])
    if key:
        run(["openssl", "req", "-new", "-key", key, "-out", p("leaf.csr"), "-subj", f"/CN={names[0]}"])
        leaf_key = key
    else:
        run(["openssl", "req", "-new", *ec, "-keyout", p("leaf.key"), "-out", p("leaf.csr"), "-subj", f"/CN={names[0]}"])
        leaf_key = p("leaf.key")
    run(["openssl", "x509", "-req", "-in", p("leaf.csr"), "-CA", p("int.pem"), "-CAkey", p("int.key"), "-set_serial", "3",
         "-days", "30", "-extfile", p("ext.cnf"), "-extensions", "leaf", "-out", p("leaf.pem")])
    leaf, inter, root = (Path(p(n)).read_text() for n in ("leaf.pem", "int.pem", "root.pem"))
    Path(p("chain.pem")).write_text(leaf + inter)
    Path(p("fullchain.pem")).write_text(leaf + inter + root)
    return {"root": p("root.pem"), "int": p("int.pem"), "leaf": p("leaf.pem"), "key": leaf_key,
            "chain": p("chain.pem"), "fullchain": p("fullchain.pem")}


def der(cert_path):
    return subprocess.run(["openssl", "x509", "-in", str(cert_path), "-outform", "DER"], capture_output=True,
                          check=True).stdout


def spki_der(cert_path):
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_path), "-noout", "-pubkey"], capture_output=True,
                         check=True).stdout
    return subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True,
                          check=True).stdout


def tlsa_data(cert_path, selector, mtype):
    """Association data (hex) of a TLSA record with this selector/matching type for the certificate."""
    data = der(cert_path) if selector == 0 else spki_der(cert_path)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return data.hex()


def flip(hexdata):
    """The same data with its last bit flipped: a record that matches nothing."""
    b = bytearray(bytes.fromhex(hexdata))
    b[-1] ^= 1
    return b.hex()
