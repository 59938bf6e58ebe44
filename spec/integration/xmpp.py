"""slixmpp helpers for the integration specs (asyncio; every wait is bounded by asyncio.wait_for)."""

import asyncio
import itertools
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import slixmpp
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

import harness

NS_MAM = "urn:xmpp:mam:2"
NS_MAM_EXT = "urn:xmpp:mam:2#extended"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_CLIENT = "jabber:client"
NS_SID = "urn:xmpp:sid:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

PLUGINS = ["xep_0030", "xep_0045", "xep_0059", "xep_0198", "xep_0280", "xep_0313"]
TIMEOUT = 15  # seconds for any single network wait

_qids = itertools.count(1)


def run(coro, timeout=90):
    """Run a test coroutine on a fresh event loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that queues every incoming chat/normal message and groupchat message."""

    def __init__(self, jid, password):
        super().__init__(jid, password)
        for p in PLUGINS:
            self.register_plugin(p)
        self["feature_mechanisms"].unencrypted_plain = True
        self.messages = asyncio.Queue()
        self.groupchat = asyncio.Queue()
        self._started = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("failed_auth", self._on_fail)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("groupchat_message", lambda m: self.groupchat.put_nowait(m))

    def _on_start(self, _event):
        if not self._started.done():
            self._started.set_result(True)

    def _on_fail(self, _event):
        if not self._started.done():
            self._started.set_exception(RuntimeError(f"authentication failed for {self.boundjid}"))

    def _on_message(self, msg):
        if msg["type"] in ("chat", "normal") and msg.xml.find(f"{{{NS_MAM}}}result") is None:
            self.messages.put_nowait(msg)

    async def next_message(self, timeout=TIMEOUT):
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def next_groupchat(self, timeout=TIMEOUT):
        return await asyncio.wait_for(self.groupchat.get(), timeout)

    async def close(self):
        # Ack everything we handled first: Prosody's mod_smacks re-routes unacked messages of a closing session
        # (to offline storage), which would hand them to this user's next session a second time.
        sm = self["xep_0198"]
        if sm.enabled_in:
            sm.send_ack()
        fut = self.disconnect()
        if fut is not None:
            try:
                await asyncio.wait_for(fut, 10)
            except asyncio.TimeoutError:
                self.abort()


async def connect(server, user, password="pass", resource="test", presence=True):
    c = Client(f"{user}@{harness.DOMAIN}/{resource}", password)
    c.connect(address=("127.0.0.1", server.c2s_port), disable_starttls=True, force_starttls=False)
    await asyncio.wait_for(c._started, TIMEOUT)
    if presence:
        c.send_presence()
        # the server processes our stanzas in order: a ping round trip proves the presence was handled
        await disco(c, harness.DOMAIN)
    return c


async def disco(client, jid=None):
    info = await client["xep_0030"].get_info(jid=jid or client.boundjid.bare, timeout=TIMEOUT)
    return set(info["disco_info"]["features"])


def parse_stamp(stamp):
    return datetime.strptime(stamp.replace("Z", "+00:00").split(".")[0].replace("+00:00", ""),
                             "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


def xs_datetime(ts):
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MamItem:
    def __init__(self, result_el):
        self.id = result_el.get("id")
        self.queryid = result_el.get("queryid")
        fwd = result_el.find(f"{{{NS_FORWARD}}}forwarded")
        delay = fwd.find(f"{{{NS_DELAY}}}delay")
        self.stamp = delay.get("stamp") if delay is not None else None
        msg = fwd.find(f"{{{NS_CLIENT}}}message")
        self.message = msg
        self.body = msg.findtext(f"{{{NS_CLIENT}}}body") if msg is not None else None
        self.frm = msg.get("from") if msg is not None else None
        self.to = msg.get("to") if msg is not None else None
        self.type = msg.get("type") if msg is not None else None

    def __repr__(self):
        return f"<MamItem {self.id} {self.body!r}>"


class MamPage:
    def __init__(self, items, fin):
        self.items = items
        self.fin = fin
        self.complete = fin.get("complete") == "true"
        rset = fin.find(f"{{{NS_RSM}}}set")
        self.first = self.last = self.count = self.first_index = None
        if rset is not None:
            first = rset.find(f"{{{NS_RSM}}}first")
            if first is not None:
                self.first = first.text
                self.first_index = first.get("index")
            self.last = rset.findtext(f"{{{NS_RSM}}}last")
            count = rset.findtext(f"{{{NS_RSM}}}count")
            self.count = int(count) if count is not None else None

    @property
    def bodies(self):
        return [i.body for i in self.items]

    @property
    def ids(self):
        return [i.id for i in self.items]


class MamError(Exception):
    def __init__(self, iq_error):
        err = iq_error.iq["error"]
        self.type = err["type"]
        self.condition = err["condition"]
        self.text = err["text"]
        self.xml = str(iq_error.iq)
        super().__init__(f"{self.type}/{self.condition}: {self.text}")


async def mam_query(client, *, to=None, fields=None, rsm=None, flip=False, raw_fields=None):
    """Send a MAM query built by hand (so empty <before/>, flip-page, ids, invalid values all work).

    fields: {"with": jid, "start": str, "end": str, "before-id": id, "after-id": id, "ids": [id, ...]}
    rsm:    {"max": n, "after": id, "before": id or "" (empty <before/> = last page)}
    Returns MamPage; raises MamError on an error reply.
    """
    qid = f"q{next(_qids)}"
    query = ET.Element(f"{{{NS_MAM}}}query", {"queryid": qid})
    if fields or raw_fields:
        form = ET.SubElement(query, "{jabber:x:data}x", {"type": "submit"})
        f = ET.SubElement(form, "{jabber:x:data}field", {"var": "FORM_TYPE", "type": "hidden"})
        ET.SubElement(f, "{jabber:x:data}value").text = NS_MAM
        for var, value in (fields or {}).items():
            f = ET.SubElement(form, "{jabber:x:data}field", {"var": var})
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                ET.SubElement(f, "{jabber:x:data}value").text = str(v)
        for el in raw_fields or ():
            form.append(el)
    if rsm:
        rset = ET.SubElement(query, f"{{{NS_RSM}}}set")
        for k in ("max", "after", "before"):
            if k in rsm:
                ET.SubElement(rset, f"{{{NS_RSM}}}{k}").text = None if rsm[k] in ("", None) else str(rsm[k])
    if flip:
        ET.SubElement(query, f"{{{NS_MAM}}}flip-page")

    items = []

    def on_result(msg):
        res = msg.xml.find(f"{{{NS_MAM}}}result")
        if res is not None and res.get("queryid") == qid:
            items.append(MamItem(res))

    name = f"mam-{qid}"
    client.register_handler(Callback(name, MatchXPath(f"{{{NS_CLIENT}}}message/{{{NS_MAM}}}result"), on_result))
    try:
        iq = client.make_iq_set(ito=to)
        iq.xml.append(query)
        try:
            reply = await iq.send(timeout=TIMEOUT)
        except IqError as e:
            raise MamError(e) from None
    finally:
        client.remove_handler(name)
    fin = reply.xml.find(f"{{{NS_MAM}}}fin")
    assert fin is not None, f"no <fin/> in {reply}"
    return MamPage(items, fin)


async def mam_all(client, *, to=None, fields=None, page=50):
    """Every item of a query, paging forward."""
    out, after = [], None
    while True:
        rsm = {"max": page}
        if after:
            rsm["after"] = after
        p = await mam_query(client, to=to, fields=fields, rsm=rsm)
        out += p.items
        if p.complete or not p.items:
            return out
        after = p.last


async def mam_metadata(client):
    iq = client.make_iq_get()
    iq.xml.append(ET.Element(f"{{{NS_MAM}}}metadata"))
    reply = await iq.send(timeout=TIMEOUT)
    md = reply.xml.find(f"{{{NS_MAM}}}metadata")
    assert md is not None, f"no <metadata/> in {reply}"
    out = {}
    for side in ("start", "end"):
        el = md.find(f"{{{NS_MAM}}}{side}")
        out[side] = None if el is None else {"id": el.get("id"), "timestamp": el.get("timestamp")}
    return out


def stanza_id(msg, by):
    for el in msg.xml.findall(f"{{{NS_SID}}}stanza-id"):
        if el.get("by") == by:
            return el.get("id")
    return None
