"""mod_native_smacks over BOSH: mod_bosh writes stanzas without a bytes/out stage, so the queue must take them from
the stanzas/out stage there. A raw BOSH client enables stream management, receives messages and acknowledges them."""

import base64
import re
import urllib.request

import harness
from harness import RawXMPP
from test_smacks_protocol import SMACKS, drop, new_user, resume, sm_client, wait_hibernating

BOSH_NS = "http://jabber.org/protocol/httpbind"
SM3 = "urn:xmpp:sm:3"


class Bosh:
    """A BOSH client logged in with PLAIN and (unless bind=False) bound."""

    def __init__(self, srv, user, bind=True):
        self.srv, self.rid = srv, 7000
        text = self.req(f"<body rid='{self.rid}' to='{harness.DOMAIN}' xml:lang='en' wait='2' hold='1' ver='1.6' "
                        f"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh' xmlns='{BOSH_NS}'/>")
        self.sid = re.search(r"sid=['\"]([^'\"]+)", text).group(1)
        cred = base64.b64encode(f"\0{user}\0pass".encode()).decode()
        assert "<success" in self.body(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>")
        self.req(f"<body rid='{self.next_rid()}' sid='{self.sid}' xmpp:restart='true' "
                 f"xmlns:xmpp='urn:xmpp:xbosh' xmlns='{BOSH_NS}'/>")
        if not bind:
            return
        text = self.body("<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                         "<resource>bosh</resource></bind></iq>")
        self.jid = re.search(r"<jid>([^<]+)</jid>", text).group(1)

    def next_rid(self):
        self.rid += 1
        return self.rid

    def req(self, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.srv.http_port}/http-bind", data=body.encode(),
                                     headers={"Content-Type": "text/xml; charset=utf-8"})
        return urllib.request.urlopen(req, timeout=15).read().decode()

    def body(self, inner=""):
        return self.req(f"<body rid='{self.next_rid()}' sid='{self.sid}' xmlns='{BOSH_NS}'>{inner}</body>")


def test_stanzas_sent_over_bosh_are_queued_counted_and_acknowledged(prosody_factory):
    srv = prosody_factory(modules=SMACKS["modules"] + ["bosh"], modules_disabled=SMACKS["modules_disabled"],
                          global_options={"smacks_ack_timeout": 0})
    user = new_user(srv, "bosh")
    client = Bosh(srv, user)
    assert "<enabled" in client.body(f"<enable xmlns='{SM3}'/>")

    sender = RawXMPP(srv.c2s_port)
    sender.login(new_user(srv, "s"), "pass")
    for i in range(3):
        sender.send(f"<message to='{client.jid}' type='chat' id='bm{i}'><body>over bosh {i}</body></message>")
    seen = ""
    for _ in range(10):
        seen += client.body()
        if seen.count("<message") >= 3:
            break
    assert [m for m in re.findall(r"over bosh (\d)", seen)] == ["0", "1", "2"]

    queue = ("(function() local q = prosody.full_sessions[" + harness.lua_string(client.jid) + "]"
             ".outgoing_stanza_queue.q return ('%d %d'):format(q:sent(), q:unacked()) end)()")
    sent, unacked = map(int, srv.shell_result(queue).split())
    assert sent >= 3 and unacked == sent  # the messages, and whatever else went out since <enabled/> (none acked)

    answer = client.body(f"<a xmlns='{SM3}' h='{sent}'/><r xmlns='{SM3}'/>")
    assert "handled-count-too-high" not in answer and "terminate" not in answer, answer
    assert re.search(r"<a [^>]*h=['\"]\d+['\"]", answer + client.body()), "no answer to <r/>"
    assert srv.shell_result(queue).split() == [str(sent), "0"]


def test_resumption_is_neither_offered_over_bosh_nor_taken_to_it(prosody_factory):
    srv = prosody_factory(modules=SMACKS["modules"] + ["bosh"], modules_disabled=SMACKS["modules_disabled"],
                          global_options={"smacks_ack_timeout": 0, "smacks_hibernation_time": 30})
    user = new_user(srv, "bosh")
    enabled = Bosh(srv, user).body(f"<enable xmlns='{SM3}' resume='true'/>")
    assert "<enabled" in enabled and "resume=" not in enabled and " id=" not in enabled, enabled
    # a TCP session of the same account with resumption, gone
    phone = sm_client(srv, user)
    previd = phone.sm["id"]
    drop(phone)
    wait_hibernating(srv, user)
    # a BOSH connection asks to take it over: refused before anything moves
    answer = Bosh(srv, user, bind=False).body(f"<resume xmlns='{SM3}' previd='{previd}' h='0'/>")
    assert "<failed" in answer and "<feature-not-implemented" in answer, answer
    # the session is untouched: still hibernating, and a TCP connection resumes it
    wait_hibernating(srv, user)
    _, resp = resume(srv, user, previd, 0)
    assert "<resumed" in resp, resp
