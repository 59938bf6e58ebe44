"""mod_native_limits never limits server-to-server streams or external components (XEP-0114), even from an address
that is not exempt, while the clients of the same host, from the same address, are limited.

The s2s spec federates two real Prosody servers on loopback through the DNS test bed of the DANE specs (the fixture
of test_smacks_s2s): alice@sma sends to bob@smb, and smb runs mod_native_limits with budgets far smaller than what
the link carries. The component spec connects a raw XEP-0114 component to the anonymous host's server.
"""

import hashlib
import re

import harness
from test_limits_helpers import MUC_HOST, Anon, decisions, limits_server, ping
from test_smacks_s2s import A_ADDR, A_HOST, B_ADDR, B_HOST, S2SProsody, chat, dns, read_ids  # noqa: F401

NS_MUC = "http://jabber.org/protocol/muc"
OFF = {"address": False, "ipv4/24": False, "ipv6/64": False, "ipv6/48": False, "global": False}
# One connection and one login for the whole host, three stanzas, one unsolicited message, one room created or
# joined per address: anything but a client's first steps would be refused if it were counted.
TIGHT = {
    "native_limits_exempt_loopback": False,
    "native_limits_connections": dict(OFF, **{"global": "1/10min burst 1"}),
    "native_limits_logins": dict(OFF, **{"global": "1/10min burst 1"}),
    "native_limits_stanzas": {"address": "1/10min burst 3"},
    "native_limits_session_stanzas": "1/10min burst 3",
    "native_limits_unsolicited": "1/10min burst 1",
    "native_limits_max_delay": 0,
    "native_limits_stanza_close_after": 100,
}
TIGHT_MUC = {
    "native_limits_exempt_loopback": False,
    "native_limits_muc_joins": {"address": "1/10min burst 1"},
    "native_limits_muc_creations": {"address": "1/10min burst 1"},
    "muc_room_locking": False,
}


def test_s2s_streams_are_never_limited(dns, tmp_path):  # noqa: F811
    unbound = {"resolvconf": False, "hoststxt": False, "forward": dns["bed"].resolver, "trusted": dns["bed"].trust_anchor}
    g = {"unbound": unbound, "s2s_require_encryption": True, "s2s_secure_auth": False,
         "ssl": {"certificate": dns["pki"]["chain"], "key": dns["pki"]["key"], "cafile": dns["pki"]["root"]}}
    a = S2SProsody(name="limits-s2s-A", s2s_port=dns["a_port"], s2s_interface=A_ADDR, vhost=A_HOST,
                   global_options=g, modules=["tls", "dialback"])
    b = S2SProsody(name="limits-s2s-B", s2s_port=dns["b_port"], s2s_interface=B_ADDR, vhost=B_HOST,
                   global_options={**g, **TIGHT}, modules=["tls", "dialback", "native_limits"])
    try:
        for srv in (a, b):
            srv.start()
        a.register_on_vhost("alice")
        b.register_on_vhost("bob")
        alice, bob = a.client("alice"), b.client("bob")  # client() sends presence: bob's first stanza
        ids = [f"m{i}" for i in range(12)]
        chat(alice, f"bob@{B_HOST}", ids)
        assert read_ids(bob, len(ids)) == ids
        assert "incoming" in b.shell_result(
            "for s in pairs(prosody.incoming_s2s) do if s.from_host == %s then return 'incoming' end end; return 'none'"
            % harness.lua_string(A_HOST))
        # bob, a client of the same server on loopback, is limited: two more stanzas, then refused
        assert [ping(bob, i, B_HOST) for i in range(3)] == ["ok", "ok", "refused"]
        for c in (alice, bob):
            c.close()
    finally:
        for srv in (a, b):
            srv.stop()
            srv.cleanup()


class Component:
    """A raw XEP-0114 component."""

    def __init__(self, port, domain, secret):
        self.c = harness.RawXMPP(port, domain=domain)
        self.c.send(f"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' "
                    f"to='{domain}'>")
        head = self.c.read_until(r"<stream:stream[^>]*>")
        stream_id = re.search(r"\bid=['\"]([^'\"]+)", head).group(1)
        self.c.send(f"<handshake>{hashlib.sha1((stream_id + secret).encode()).hexdigest()}</handshake>")
        self.c.read_until(r"<handshake\s*/>|<handshake></handshake>")

    def send(self, xml):
        self.c.send(xml)

    def close(self):
        self.c.close()


def test_external_components_are_never_limited(prosody_factory):
    port = harness.free_port()
    srv = limits_server(prosody_factory, host_options=TIGHT, muc=True, muc_options=TIGHT_MUC, extra_config=(
        f'component_ports = {{ {port} }}\ncomponent_interfaces = {{ "127.0.0.1" }}\n'
        'Component "bot.localhost"\n    component_secret = "s3cret"\n'))
    user = Anon(srv)
    assert user.login()[0] == "ok"
    bot = Component(port, "bot.localhost", "s3cret")
    try:
        bot.send("".join(f"<message from='helper@bot.localhost' to='{user.jid}' type='chat' id='c{i}'>"
                         f"<body>{i}</body></message>" for i in range(12)))
        got = [re.search(r"\bid=['\"]([^'\"]+)", user.read_until(r"<message\b.*?</message>")).group(1)
               for _ in range(12)]
        assert got == [f"c{i}" for i in range(12)]
        # a bridge-like component creates and joins rooms on the limited MUC service, from the same address
        for i in range(3):
            bot.send(f"<presence from='helper@bot.localhost/b' to='room{i}@{MUC_HOST}/bot'><x xmlns='{NS_MUC}'/></presence>")
            text = bot.c.read_until(r"<presence[^>]*from=['\"]room%d@%s/bot['\"][^>]*>.*?</presence>" % (i, MUC_HOST))
            assert "type='error'" not in text, text
        # the client of the anonymous host, on the same address as the component, is limited: one room, three
        # stanzas
        user.send(f"<presence to='mine@{MUC_HOST}/me'><x xmlns='{NS_MUC}'/></presence>")
        text = user.read_until(r"<presence[^>]*from=['\"]mine@%s/me['\"][^>]*>.*?</presence>" % MUC_HOST)
        assert "type='error'" not in text, text
        user.send(f"<presence to='more@{MUC_HOST}/me'><x xmlns='{NS_MUC}'/></presence>")
        text = user.read_until(r"<presence[^>]*from=['\"]more@%s/me['\"][^>]*>.*?</presence>" % MUC_HOST)
        assert "Too many new rooms from your network" in text, text
        assert [ping(user, 1), ping(user, 2)] == ["ok", "refused"]
        assert decisions(srv, "session_stanzas", "refuse") == 1
    finally:
        bot.close()
        user.close()
