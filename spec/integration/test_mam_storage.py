"""MAM storage integration: a real Prosody with mod_mam / mod_muc_mam / mod_offline on the native archive driver,
driven by slixmpp clients.

The archive stores are mapped to the native driver (harness.NATIVE_ARCHIVE_STORAGE). PN_STORAGE=internal runs the
same specs against Prosody's own driver (reference behaviour).
"""

import asyncio
import itertools
import os
import re
import sqlite3
import time
import xml.etree.ElementTree as ET

import pytest

import harness
from xmpp import (NS_MAM, NS_MAM_EXT, MamError, connect, disco, mam_all, mam_metadata, mam_query, run, stanza_id,
                  xs_datetime)

# PN_STORAGE=sql|internal reruns these specs on a Prosody driver for comparison (not part of make check);
# the two specs that read the native database file itself then fail, as they should.
STORAGE_DRIVER = os.environ.get("PN_STORAGE", "native")
STORAGE = {store: STORAGE_DRIVER for store in harness.NATIVE_ARCHIVE_STORAGE}
MUC_OPTIONS = {"muc_room_locking": False, "muc_room_default_persistent": True}
# reference runs on Prosody's SQL driver need its connection settings
DRIVER_OPTIONS = {"sql": {"driver": "SQLite3", "database": "prosody.sqlite"}} if STORAGE_DRIVER == "sql" else {}


def mam_server(factory, **kwargs):
    options = dict(DRIVER_OPTIONS)
    options.update(kwargs.pop("global_options", {}))
    return factory(storage=STORAGE, muc_options=MUC_OPTIONS, global_options=options, **kwargs)

_names = itertools.count(1)


def fresh_users(server, *prefixes):
    """Register new users (unique per test) and return their local parts."""
    out = []
    for p in prefixes:
        name = f"{p}{next(_names)}"
        server.register(name, "pass")
        out.append(name)
    return out


@pytest.fixture(scope="module")
def server(module_prosody):
    return mam_server(module_prosody, name="mam")


STORAGE_ERROR = re.compile(r"storage_\w+\terror\t|Could not archive stanza|Could not delete messages|"
                           r"Error storing|does not support archiving")


@pytest.fixture(autouse=True)
def no_storage_errors(request):
    """Every spec here also fails when the driver logged an error (e.g. a failed page read that mod_mam cannot see)."""
    seen = {id(srv): len(srv.log_text()) for srv in harness.SERVERS}
    yield
    servers = list(harness.SERVERS)
    bad = []
    for srv in servers:
        new = srv.log_text()[seen.get(id(srv), 0):]
        bad += [f"{srv.name}: {line}" for line in new.splitlines() if STORAGE_ERROR.search(line)]
    assert not bad, "storage errors in the Prosody log:\n" + "\n".join(bad[:20])


async def converse(server, sender, recipient, bodies):
    """`sender` sends `bodies` to `recipient` (online); returns the recipient's stanza-ids in order."""
    a = await connect(server, sender)
    b = await connect(server, recipient)
    try:
        ids = []
        for body in bodies:
            a.send_message(mto=server.jid(recipient), mbody=body, mtype="chat")
        for body in bodies:
            msg = await b.next_message()
            assert msg["body"] == body
            ids.append(stanza_id(msg, server.jid(recipient)))
        assert all(ids), "every delivered message carries the recipient archive's <stanza-id/>"
        return ids
    finally:
        await a.close()
        await b.close()


def shell_append(server, user, items, store="archive", host=harness.DOMAIN):
    """Append (body, when, with) items straight into a user's archive through the storage manager, in one shell
    line. Returns the keys the driver returned."""
    parts = []
    for body, when, with_ in items:
        parts.append(
            "k[#k+1]=tostring(s:append(%s, nil, st.message({to=%s, from=%s, type='chat'}):tag('body'):text(%s):up(), %r, %s))"
            % (harness.lua_string(user), harness.lua_string(with_), harness.lua_string(f"{user}@{host}/x"),
               harness.lua_string(body), when, harness.lua_string(with_)))
    lua = ("local st=require'util.stanza'; local s=require'core.storagemanager'.open(%s,%s,'archive'); local k={}; %s;"
           " return table.concat(k, ',')") % (harness.lua_string(host), harness.lua_string(store), "; ".join(parts))
    keys = server.shell_result(lua).split(",")
    assert len(keys) == len(items) and all(k and k != "nil" for k in keys), keys
    return keys


# -- paging ----------------------------------------------------------------------------------------------------------

def test_page_forward_with_rsm_after(server):
    alice, bob = fresh_users(server, "alice", "bob")
    bodies = [f"fwd {i}" for i in range(12)]

    async def main():
        bob_ids = await converse(server, alice, bob, bodies)
        c = await connect(server, alice)
        try:
            p1 = await mam_query(c, rsm={"max": 5})
            assert p1.bodies == bodies[0:5]
            assert not p1.complete
            assert p1.count == 12
            assert (p1.first, p1.last) == (p1.ids[0], p1.ids[-1])
            p2 = await mam_query(c, rsm={"max": 5, "after": p1.last})
            assert p2.bodies == bodies[5:10]
            assert not p2.complete
            assert p2.count == 12
            p3 = await mam_query(c, rsm={"max": 5, "after": p2.last})
            assert p3.bodies == bodies[10:12]
            assert p3.complete
            ids = p1.ids + p2.ids + p3.ids
            assert len(set(ids)) == 12, "ids are unique"
            for item in p1.items + p2.items + p3.items:
                assert item.frm.startswith(server.jid(alice)) and item.to == server.jid(bob)
                assert item.stamp and item.stamp.endswith("Z")
        finally:
            await c.close()
        # bob's archive holds the incoming copies, under the ids he saw as <stanza-id/>
        b = await connect(server, bob)
        try:
            items = await mam_all(b, page=5)
            assert [i.body for i in items] == bodies
            assert [i.id for i in items] == bob_ids
        finally:
            await b.close()

    run(main())


def test_page_backward_with_rsm_before(server):
    alice, bob = fresh_users(server, "alice", "bob")
    bodies = [f"back {i}" for i in range(12)]

    async def main():
        await converse(server, alice, bob, bodies)
        c = await connect(server, alice)
        try:
            last = await mam_query(c, rsm={"max": 5, "before": ""})  # empty <before/>: the last page
            assert last.bodies == bodies[7:12], "last page, in chronological order"
            assert not last.complete
            assert last.count == 12
            assert (last.first, last.last) == (last.ids[0], last.ids[-1])
            mid = await mam_query(c, rsm={"max": 5, "before": last.first})
            assert mid.bodies == bodies[2:7]
            assert not mid.complete
            first = await mam_query(c, rsm={"max": 5, "before": mid.first})
            assert first.bodies == bodies[0:2]
            assert first.complete
            # and forward again from the middle of the backward walk
            again = await mam_query(c, rsm={"max": 3, "after": mid.last})
            assert again.bodies == bodies[7:10]
        finally:
            await c.close()

    run(main())


def test_flip_page(server):
    alice, bob = fresh_users(server, "alice", "bob")
    bodies = [f"flip {i}" for i in range(8)]

    async def main():
        await converse(server, alice, bob, bodies)
        c = await connect(server, alice)
        try:
            fwd = await mam_query(c, rsm={"max": 3}, flip=True)
            assert fwd.bodies == list(reversed(bodies[0:3])), "first page, newest first"
            assert not fwd.complete
            back = await mam_query(c, rsm={"max": 3, "before": ""}, flip=True)
            assert back.bodies == list(reversed(bodies[5:8])), "last page, newest first"
            plain = await mam_query(c, rsm={"max": 3, "before": ""})
            assert back.ids == list(reversed(plain.ids))
        finally:
            await c.close()

    run(main())


def test_totals_and_max_zero(server):
    alice, bob, carol = fresh_users(server, "alice", "bob", "carol")

    async def main():
        await converse(server, alice, bob, [f"tb {i}" for i in range(7)])
        await converse(server, alice, carol, [f"tc {i}" for i in range(3)])
        c = await connect(server, alice)
        try:
            only_count = await mam_query(c, rsm={"max": 0})
            assert only_count.items == []
            assert only_count.count == 10
            page = await mam_query(c, rsm={"max": 2})
            assert page.count == 10
            filtered = await mam_query(c, fields={"with": server.jid(carol)}, rsm={"max": 1})
            assert filtered.count == 3, "the total counts the filtered set"
            assert not filtered.complete
        finally:
            await c.close()

    run(main())


# -- filters ---------------------------------------------------------------------------------------------------------

def test_with_filter(server):
    alice, bob, carol = fresh_users(server, "alice", "bob", "carol")

    async def main():
        await converse(server, alice, bob, ["to bob 1", "to bob 2"])
        await converse(server, alice, carol, ["to carol 1"])
        await converse(server, carol, alice, ["from carol 1"])
        await converse(server, alice, bob, ["to bob 3"])
        c = await connect(server, alice)
        try:
            with_bob = await mam_query(c, fields={"with": server.jid(bob)})
            assert with_bob.bodies == ["to bob 1", "to bob 2", "to bob 3"]
            assert with_bob.complete and with_bob.count == 3
            with_carol = await mam_query(c, fields={"with": server.jid(carol)})
            assert with_carol.bodies == ["to carol 1", "from carol 1"], "with matches both directions"
            # a full JID is reduced to the bare JID by mod_mam
            full = await mam_query(c, fields={"with": server.jid(carol) + "/test"})
            assert full.bodies == with_carol.bodies
            nobody = await mam_query(c, fields={"with": "nobody@localhost"})
            assert nobody.items == [] and nobody.complete
            assert nobody.count == 0
            # with + RSM paging
            p = await mam_query(c, fields={"with": server.jid(bob)}, rsm={"max": 2, "before": ""})
            assert p.bodies == ["to bob 2", "to bob 3"]
            assert p.count == 3
        finally:
            await c.close()

    run(main())


T0 = 1_600_000_000  # 2020-09-13T12:26:40Z


def test_time_ranges(server):
    (dave,) = fresh_users(server, "dave")
    # five items a minute apart, appended through the storage manager with chosen timestamps
    keys = shell_append(server, dave, [(f"t{i}", T0 + 60 * i, "x@localhost") for i in range(5)])

    async def main():
        c = await connect(server, dave)
        try:
            both = await mam_query(c, fields={"start": xs_datetime(T0 + 60), "end": xs_datetime(T0 + 180)})
            assert both.bodies == ["t1", "t2", "t3"], "start and end are inclusive"
            assert both.ids == keys[1:4]
            assert both.count == 3
            start = await mam_query(c, fields={"start": xs_datetime(T0 + 61)})
            assert start.bodies == ["t2", "t3", "t4"]
            end = await mam_query(c, fields={"end": xs_datetime(T0 + 119)})
            assert end.bodies == ["t0", "t1"]
            # 0.12.3's util.datetime.parse drops fractional seconds: T0+60.5 .. T0+180.25 acts as T0+60 .. T0+180
            frac = await mam_query(c, fields={"start": "2020-09-13T12:27:40.500Z", "end": "2020-09-13T12:29:40.250Z"})
            assert frac.bodies == ["t1", "t2", "t3"]
            empty = await mam_query(c, fields={"start": xs_datetime(T0 + 241)})
            assert empty.items == [] and empty.complete
            ranged_page = await mam_query(c, fields={"start": xs_datetime(T0)}, rsm={"max": 2, "before": ""})
            assert ranged_page.bodies == ["t3", "t4"]
            assert ranged_page.count == 5
            stamps = [i.stamp for i in (await mam_query(c)).items]
            assert stamps == [xs_datetime(T0 + 60 * i) for i in range(5)], "<delay/> carries the stored time"
        finally:
            await c.close()

    run(main())


def test_live_message_times(server):
    """Live-archived messages carry the archiving time; a start/end window around their stamps finds them all."""
    alice, bob = fresh_users(server, "alice", "bob")

    async def main():
        before = int(time.time())
        await converse(server, alice, bob, ["now 1", "now 2"])
        after = int(time.time())
        c = await connect(server, alice)
        try:
            items = (await mam_query(c)).items
            assert [i.body for i in items] == ["now 1", "now 2"]
            for i in items:
                assert xs_datetime(before) <= i.stamp <= xs_datetime(after)
            window = await mam_query(c, fields={"start": xs_datetime(before), "end": xs_datetime(after)})
            assert window.bodies == ["now 1", "now 2"]
            past = await mam_query(c, fields={"end": xs_datetime(before - 1)})
            assert past.items == []
        finally:
            await c.close()

    run(main())


# -- #extended: ids, before-id, after-id, metadata ---------------------------------------------------------------------

def test_extended_feature_advertised(server):
    (alice,) = fresh_users(server, "alice")

    async def main():
        c = await connect(server, alice)
        try:
            features = await disco(c)
            assert NS_MAM in features
            assert NS_MAM_EXT in features
            assert "urn:xmpp:sid:0" in features
        finally:
            await c.close()

    run(main())


def test_ids_before_id_after_id(server):
    alice, bob = fresh_users(server, "alice", "bob")
    bodies = [f"id {i}" for i in range(6)]

    async def main():
        await converse(server, alice, bob, bodies)
        c = await connect(server, alice)
        try:
            ids = (await mam_query(c)).ids
            assert len(ids) == 6
            picked = await mam_query(c, fields={"ids": [ids[4], ids[1], ids[2]]})
            assert picked.ids == [ids[1], ids[2], ids[4]], "ids come back in archive order"
            assert picked.bodies == [bodies[1], bodies[2], bodies[4]]
            # unknown ids in `ids` are skipped, as Prosody's own drivers do
            mixed = await mam_query(c, fields={"ids": ["no-such-id", ids[3]]})
            assert mixed.ids == [ids[3]]
            after = await mam_query(c, fields={"after-id": ids[3]})
            assert after.ids == ids[4:], "after-id is exclusive"
            before = await mam_query(c, fields={"before-id": ids[2]})
            assert before.ids == ids[:2], "before-id is exclusive and does not reverse"
            between = await mam_query(c, fields={"after-id": ids[0], "before-id": ids[5]})
            assert between.ids == ids[1:5]
            paged = await mam_query(c, fields={"after-id": ids[0]}, rsm={"max": 2})
            assert paged.ids == ids[1:3] and not paged.complete
            # RSM after overrides the form's after-id
            override = await mam_query(c, fields={"after-id": ids[0]}, rsm={"max": 10, "after": ids[3]})
            assert override.ids == ids[4:]
        finally:
            await c.close()

    run(main())


def test_metadata(server):
    alice, bob, carol = fresh_users(server, "alice", "bob", "carol")

    async def main():
        c = await connect(server, carol)
        try:
            md = await mam_metadata(c)
            assert md == {"start": None, "end": None}, "empty archive: empty <metadata/>"
        finally:
            await c.close()
        await converse(server, alice, bob, ["m1", "m2", "m3"])
        c = await connect(server, alice)
        try:
            items = (await mam_query(c)).items
            md = await mam_metadata(c)
            assert md["start"] == {"id": items[0].id, "timestamp": items[0].stamp}
            assert md["end"] == {"id": items[-1].id, "timestamp": items[-1].stamp}
        finally:
            await c.close()

    run(main())


async def outcome(client, **kwargs):
    """("ok", bodies) or (error type, condition) of a MAM query."""
    try:
        return ("ok", (await mam_query(client, **kwargs)).bodies)
    except MamError as e:
        return (e.type, e.condition)


# -- errors ----------------------------------------------------------------------------------------------------------

def test_unknown_ids_are_item_not_found(server):
    alice, bob = fresh_users(server, "alice", "bob")

    async def main():
        await converse(server, alice, bob, ["one", "two"])
        c = await connect(server, alice)
        try:
            cases = {"rsm after": {"rsm": {"after": "no-such-id"}},
                     "rsm before": {"rsm": {"before": "no-such-id"}},
                     "after-id": {"fields": {"after-id": "no-such-id"}},
                     "before-id": {"fields": {"before-id": "no-such-id"}}}
            outcomes = {name: await outcome(c, **kw) for name, kw in cases.items()}
            assert outcomes == {name: ("modify", "item-not-found") for name in cases}
            # an id from somebody else's archive is unknown in this one
            b = await connect(server, bob)
            try:
                bob_first = (await mam_query(b)).first
            finally:
                await b.close()
            with pytest.raises(MamError) as e:
                await mam_query(c, rsm={"after": bob_first})
            assert e.value.condition == "item-not-found"
            # the archive still answers normally afterwards
            assert (await mam_query(c)).bodies == ["one", "two"]
        finally:
            await c.close()

    run(main())


def test_malformed_queries(server):
    alice, bob = fresh_users(server, "alice", "bob")

    async def main():
        await converse(server, alice, bob, ["a", "b", "c"])
        c = await connect(server, alice)
        try:
            # mod_mam validates xs:dateTime fields through util.dataforms: bad-request
            with pytest.raises(MamError) as e:
                await mam_query(c, fields={"start": "not-a-date"})
            assert (e.value.type, e.value.condition) == ("modify", "bad-request")
            assert "invalid timestamp" in (e.value.text or "")
            assert await outcome(c, fields={"end": "yesterday"}) == ("modify", "bad-request")
            # a form of the wrong type
            bad_form = ET.Element("{jabber:x:data}x", {"type": "submit"})
            ft = ET.SubElement(bad_form, "{jabber:x:data}field", {"var": "FORM_TYPE"})
            ET.SubElement(ft, "{jabber:x:data}value").text = "urn:example:not-mam"
            iq = c.make_iq_set()
            q = ET.SubElement(iq.xml, f"{{{NS_MAM}}}query")
            q.append(bad_form)
            from slixmpp.exceptions import IqError
            with pytest.raises(IqError) as e2:
                await iq.send(timeout=15)
            assert e2.value.iq["error"]["condition"] == "bad-request"
            # max=-1: Prosody 0.12 does not reject it; it asks the driver for limit 0 and reports the total.
            neg = await mam_query(c, rsm={"max": -1})
            assert neg.items == []
            assert neg.count == 3
            # a non-numeric max falls back to the default page size (20)
            nan = await mam_query(c, rsm={"max": "many"})
            assert nan.bodies == ["a", "b", "c"] and nan.complete
            # max=-3 asks the driver for limit -2, which it refuses (nil, err): mod_mam answers with an error
            # (an exception inside the driver would leave the query unanswered)
            assert await outcome(c, rsm={"max": -3}) == ("cancel", "internal-server-error")
            # max=2.5: limit 3.5, taken as at most 3 items; mod_mam shows 2 and says there are more
            frac = await mam_query(c, rsm={"max": "2.5"})
            assert frac.bodies == ["a", "b"] and not frac.complete
            assert frac.count == 3
        finally:
            await c.close()

    run(main())


# -- MUC -------------------------------------------------------------------------------------------------------------

def test_muc_archive_and_late_joiner(server):
    alice, bob = fresh_users(server, "alice", "bob")
    room = f"room{next(_names)}@{harness.MUC_DOMAIN}"
    bodies = [f"room msg {i}" for i in range(4)]

    async def main():
        a = await connect(server, alice)
        try:
            await asyncio.wait_for(a["xep_0045"].join_muc_wait(room, f"nick-{alice}", maxstanzas=0), 15)
            room_ids = []
            for body in bodies:
                a.send_message(mto=room, mbody=body, mtype="groupchat")
                echo = await a.next_groupchat()
                assert echo["body"] == body
                room_ids.append(stanza_id(echo, room))
            assert all(room_ids), "the room stamps a <stanza-id by=room/> on each message"
            b = await connect(server, bob)
            try:
                await asyncio.wait_for(b["xep_0045"].join_muc_wait(room, f"nick-{bob}", maxstanzas=0), 15)
                page = await mam_query(b, to=room)
                assert page.bodies == bodies
                assert page.ids == room_ids
                assert page.count == 4
                assert all(i.frm == f"{room}/nick-{alice}" for i in page.items)
                last = await mam_query(b, to=room, rsm={"max": 2, "before": ""})
                assert last.bodies == bodies[2:]
                after = await mam_query(b, to=room, rsm={"max": 10, "after": room_ids[0]})
                assert after.bodies == bodies[1:]
            finally:
                await b.close()
        finally:
            await a.close()

    run(main())


def test_muc_history_with_a_fractional_maxstanzas(server):
    """<history maxstanzas='3.5'/> beyond the room's in-memory history: mod_muc_mam asks the driver for limit 3.5,
    read as at most 3 items (as the in-memory history reads it)."""
    alice, bob = fresh_users(server, "alice", "bob")
    room = f"fraction{next(_names)}@{harness.MUC_DOMAIN}"
    bodies = ["f1", "f2", "f3"]

    async def main():
        a = await connect(server, alice)
        try:
            await asyncio.wait_for(a["xep_0045"].join_muc_wait(room, "alice", maxstanzas=0), 15)
            for body in bodies:
                a.send_message(mto=room, mbody=body, mtype="groupchat")
                assert (await a.next_groupchat())["body"] == body
            b = await connect(server, bob)
            try:
                await asyncio.wait_for(b["xep_0045"].join_muc_wait(room, "bob", maxstanzas=3.5), 15)
                got = [(await b.next_groupchat())["body"] for _ in bodies]
                assert got == bodies
                a.send_message(mto=room, mbody="live", mtype="groupchat")
                assert (await b.next_groupchat())["body"] == "live"  # and nothing else came in between
            finally:
                await b.close()
        finally:
            await a.close()

    run(main())


def test_muc_history_after_restart_comes_from_archive(prosody_factory):
    """After a restart the in-memory room history is gone: a joiner's history is read from muc_log."""
    srv = mam_server(prosody_factory, users=[("alice", "pass"), ("bob", "pass")])
    room = f"history@{harness.MUC_DOMAIN}"
    bodies = ["h1", "h2", "h3"]

    async def post():
        a = await connect(srv, "alice")
        try:
            await asyncio.wait_for(a["xep_0045"].join_muc_wait(room, "alice", maxstanzas=0), 15)
            for body in bodies:
                a.send_message(mto=room, mbody=body, mtype="groupchat")
                assert (await a.next_groupchat())["body"] == body
        finally:
            await a.close()

    async def join_late():
        b = await connect(srv, "bob")
        try:
            await asyncio.wait_for(b["xep_0045"].join_muc_wait(room, "bob", maxstanzas=10), 15)
            got = []
            while len(got) < len(bodies):
                got.append((await b.next_groupchat())["body"])
            assert got == bodies
            page = await mam_query(b, to=room)
            assert page.bodies == bodies
        finally:
            await b.close()

    run(post())
    srv.restart()
    run(join_late())


# -- offline ---------------------------------------------------------------------------------------------------------

def test_offline_delivery(server):
    alice, bob = fresh_users(server, "alice", "bob")

    async def main():
        a = await connect(server, alice)
        try:
            for i in range(3):
                a.send_message(mto=server.jid(bob), mbody=f"offline {i}", mtype="chat")
            await disco(a)  # round trip: alice's messages have been routed
        finally:
            await a.close()
        b = await connect(server, bob)
        try:
            got = [await b.next_message() for _ in range(3)]
            assert [m["body"] for m in got] == [f"offline {i}" for i in range(3)]
            for m in got:
                delay = m.xml.find("{urn:xmpp:delay}delay")
                assert delay is not None and delay.get("stamp"), "offline delivery carries <delay/>"
                assert delay.get("from") == harness.DOMAIN
            # also archived in bob's MAM archive
            assert (await mam_query(b)).bodies == [f"offline {i}" for i in range(3)]
        finally:
            await b.close()
        # the offline store was emptied after delivery: a second login gets nothing
        b = await connect(server, bob, resource="again")
        try:
            await disco(b)
            assert b.messages.empty()
        finally:
            await b.close()

    run(main())
    n = server.shell_result(
        "local n=0; for _ in require'core.storagemanager'.open('localhost','offline','archive'):find(%s) do n=n+1 end;"
        " return n" % harness.lua_string(bob))
    assert n == "0"


# -- persistence -----------------------------------------------------------------------------------------------------

def test_archive_survives_restart(prosody_factory):
    srv = mam_server(prosody_factory, users=[("alice", "pass"), ("bob", "pass")])
    bodies = [f"persist {i}" for i in range(5)]

    async def before():
        await converse(srv, "alice", "bob", bodies)
        c = await connect(srv, "alice")
        try:
            return (await mam_query(c)).ids
        finally:
            await c.close()

    async def after(ids):
        c = await connect(srv, "alice")
        try:
            page = await mam_query(c)
            assert page.bodies == bodies and page.ids == ids and page.count == 5
            assert (await mam_query(c, rsm={"after": ids[1]})).ids == ids[2:]
        finally:
            await c.close()

    ids = run(before())
    srv.restart()
    run(after(ids))


# -- expiry ----------------------------------------------------------------------------------------------------------

def count_items(server, user, store="archive", host=harness.DOMAIN):
    """The driver's total for one archive, through the storage manager."""
    return int(server.shell_result(
        "local d, t = require'core.storagemanager'.open(%s,%s,'archive'):find(%s, {limit=0, total=true});"
        " return t" % (harness.lua_string(host), harness.lua_string(store), harness.lua_string(user))))


def test_wildcard_delete_by_end_time(server):
    """archive:delete(true, {["end"]=t}) (what mod_mam's expiry calls) removes every user's items up to t."""
    u1, u2 = fresh_users(server, "exp", "exp")
    old = T0 - 86400 * 365
    shell_append(server, u1, [("old a", old, "x@localhost"), ("old b", old + 10, "x@localhost"),
                              ("new a", T0 + 86400 * 365 * 2, "x@localhost")])
    shell_append(server, u2, [("old c", old + 5, "y@localhost"), ("new b", T0 + 86400 * 365 * 2, "y@localhost")])
    assert (count_items(server, u1), count_items(server, u2)) == (3, 2)
    deleted = server.shell_result(
        "return (require'core.storagemanager'.open('localhost','archive','archive'):delete(true, {['end']=%d}))"
        % (old + 10))
    # other tests' items are newer than `old`, so exactly the three old items go
    assert deleted == "3", deleted
    assert (count_items(server, u1), count_items(server, u2)) == (1, 1)

    async def main():
        c = await connect(server, u1)
        try:
            page = await mam_query(c)
            assert page.bodies == ["new a"] and page.count == 1
        finally:
            await c.close()

    run(main())


def test_mod_mam_expiry_task(prosody_factory):
    """mod_mam's daily "Remove expired messages" task, run on demand through the shell, drops items older than
    archive_expires_after and keeps newer ones."""
    srv = mam_server(prosody_factory, global_options={"archive_expires_after": "1d"},
                          users=[("alice", "pass"), ("bob", "pass")])
    now = int(time.time())
    shell_append(srv, "alice", [("two days old", now - 2 * 86400, "bob@localhost"),
                                ("25 hours old", now - 25 * 3600, "bob@localhost"),
                                ("one hour old", now - 3600, "bob@localhost")])

    async def live():
        await converse(srv, "alice", "bob", ["fresh"])

    run(live())
    assert count_items(srv, "alice") == 4
    ran = srv.shell_result(
        "local n=0; for _, t in ipairs(require'core.modulemanager'.get_module('localhost','mam').module:get_host_items('task'))"
        " do if t.name == 'Remove expired messages' then t:run(os.time()); n=n+1 end end; return n")
    assert ran == "1", "mod_mam registered its daily expiry task"

    async def check():
        c = await connect(srv, "alice")
        try:
            page = await mam_query(c)
            assert page.bodies == ["one hour old", "fresh"]
            assert page.count == 2
        finally:
            await c.close()

    run(check())
    assert "Could not delete messages" not in srv.log_text()


# -- the database behind it --------------------------------------------------------------------------------------------

def test_native_database_counters(server):
    """The per-archive counters in the native database equal the real item counts. Another process sees appends
    once their batch commits: within storage_native_commit_delay (0.05 s by default) of the first."""
    alice, bob = fresh_users(server, "alice", "bob")
    run(converse(server, alice, bob, ["c1", "c2", "c3"]))
    db = server.native_db_path()
    assert db.exists(), f"native database not found at {db}"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        deadline = time.monotonic() + 5  # bounds a busy machine, far above the commit delay
        while True:
            rows = con.execute("SELECT o.host, o.store, o.user, o.items, (SELECT count(*) FROM items i WHERE i.owner = o.id)"
                               " FROM owners o").fetchall()
            mine = {(r[1], r[2]): r[3] for r in rows if r[0] == harness.DOMAIN and r[2] in (alice, bob)}
            if (mine.get(("archive", alice)) == 3 and mine.get(("archive", bob)) == 3) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        mismatched = [r for r in rows if r[3] != r[4]]
        assert not mismatched, mismatched
        assert mine.get(("archive", alice)) == 3 and mine.get(("archive", bob)) == 3, mine
    finally:
        con.close()


# -- stanza fidelity ---------------------------------------------------------------------------------------------------

RICH_PAYLOAD = ("<x xmlns='urn:example:rt' a='1&amp;2' b=\"q'uote\" c='&lt;&gt;&quot;'>"
                "<y>text &lt;tag&gt; &amp; \U0001D11E \u00fcn\u00ef \u4e2d\u6587</y>"
                "<z xmlns='urn:example:other' xml:lang='de'/>mixed <w/> content"
                "<empty></empty><ws>  spaced  \n line </ws></x>")
RICH_BODY = "<&>\"' \U0001F600 caf\u00e9 \u0645\u0631\u062d\u0628\u0627"


def canonical(el):
    return ET.canonicalize(ET.tostring(el, encoding="unicode"))


def test_stanza_round_trip(server):
    """An archived stanza comes back with every element, attribute, namespace and character intact."""
    alice, bob = fresh_users(server, "alice", "bob")
    sent = ET.fromstring(RICH_PAYLOAD)

    async def main():
        a = await connect(server, alice)
        b = await connect(server, bob)
        try:
            msg = a.make_message(mto=server.jid(bob), mbody=RICH_BODY, mtype="chat")
            msg["lang"] = "fr"
            msg.xml.append(ET.fromstring(RICH_PAYLOAD))
            msg.send()
            live = await b.next_message()
            assert live["body"] == RICH_BODY
        finally:
            await b.close()
        try:
            for client, peer in ((a, None),):
                item = (await mam_query(client)).items[-1]
                assert item.body == RICH_BODY
                assert item.message.get("{http://www.w3.org/XML/1998/namespace}lang") == "fr"
                got = item.message.find("{urn:example:rt}x")
                assert got is not None, ET.tostring(item.message, encoding="unicode")
                assert canonical(got) == canonical(sent)
        finally:
            await a.close()
        b = await connect(server, bob)
        try:
            item = (await mam_query(b)).items[-1]
            assert item.body == RICH_BODY
            assert canonical(item.message.find("{urn:example:rt}x")) == canonical(sent)
        finally:
            await b.close()

    run(main())


def test_raw_protocol_shape(server):
    """Wire-level check with a raw socket: <result/> forwarding, <fin/> and RSM <set/> exactly as XEP-0313 shapes them."""
    alice, bob = fresh_users(server, "alice", "bob")
    run(converse(server, alice, bob, ["raw 1", "raw 2", "raw 3"]))
    c = harness.RawXMPP(server.c2s_port)
    try:
        c.login(alice, "pass")
        reply = c.iq("r0", "<iq type='set' id='r0'><query xmlns='urn:xmpp:mam:2' queryid='qr0'>"
                           "<set xmlns='http://jabber.org/protocol/rsm'><max>0</max></set></query></iq>")
        assert "<result" not in reply
        assert re.search(r"<count>3</count>", reply), reply
        assert "<first" not in reply and "<last" not in reply
        reply = c.iq("r1", "<iq type='set' id='r1'><query xmlns='urn:xmpp:mam:2' queryid='qr1'>"
                           "<set xmlns='http://jabber.org/protocol/rsm'><max>2</max><before/></set></query></iq>")
        results = re.findall(r"<result[^>]*queryid=['\"]qr1['\"][^>]*id=['\"]([^'\"]+)['\"]|"
                             r"<result[^>]*id=['\"]([^'\"]+)['\"][^>]*queryid=['\"]qr1['\"]", reply)
        ids = [x or y for x, y in results]
        assert len(ids) == 2, reply
        assert reply.count("<forwarded xmlns='urn:xmpp:forward:0'>") == 2
        assert re.search(r"<fin[^>]*xmlns='urn:xmpp:mam:2'", reply)
        assert not re.search(r"<fin[^>]*complete=", reply), "a partial page is not complete"
        assert re.search(r"<first>%s</first>" % re.escape(ids[0]), reply)
        assert re.search(r"<last>%s</last>" % re.escape(ids[1]), reply)
        assert ">raw 2</body>" in reply and ">raw 3</body>" in reply
    finally:
        c.close()


# -- quota, room destruction, account deletion -------------------------------------------------------------------------

def test_quota_truncates_oldest(prosody_factory):
    """With storage_archive_item_limit = 10 the driver answers quota-limit and mod_mam truncates the oldest items:
    the archive keeps the newest messages, without gaps."""
    srv = mam_server(prosody_factory, global_options={"storage_archive_item_limit": 10},
                     users=[("alice", "pass"), ("bob", "pass")])
    bodies = [f"quota {i}" for i in range(16)]

    async def main():
        await converse(srv, "alice", "bob", bodies)
        c = await connect(srv, "alice")
        try:
            page = await mam_query(c)
            assert page.bodies == bodies[6:], "the newest 10 are kept"
            assert page.count == 10
        finally:
            await c.close()

    run(main())
    assert "Could not archive stanza" not in srv.log_text()


def test_room_destruction_deletes_its_archive(server):
    (alice,) = fresh_users(server, "alice")
    room = f"doomed{next(_names)}@{harness.MUC_DOMAIN}"
    node = room.split("@")[0]

    async def main():
        a = await connect(server, alice)
        try:
            await asyncio.wait_for(a["xep_0045"].join_muc_wait(room, "owner", maxstanzas=0), 15)
            for i in range(3):
                a.send_message(mto=room, mbody=f"doomed {i}", mtype="groupchat")
                await a.next_groupchat()
            assert (await mam_query(a, to=room)).count == 3
            await asyncio.wait_for(a["xep_0045"].destroy(room), 15)
        finally:
            await a.close()

    run(main())
    assert count_items(server, node, store="muc_log", host=harness.MUC_DOMAIN) == 0


def test_deleting_an_account_purges_its_archive(server):
    alice, bob = fresh_users(server, "alice", "bob")
    run(converse(server, alice, bob, ["gone 1", "gone 2"]))
    assert count_items(server, alice) == 2
    ok = server.shell_result("return (require'core.usermanager'.delete_user(%s, 'localhost'))" % harness.lua_string(alice))
    assert ok == "true"
    assert count_items(server, alice) == 0, "driver:purge removed the user's archive"
    assert count_items(server, bob) == 2, "other users keep theirs"
    server.register(alice, "pass")

    async def main():
        c = await connect(server, alice)
        try:
            page = await mam_query(c)
            assert page.items == [] and page.count == 0
        finally:
            await c.close()

    run(main())


# -- volume and ordering -------------------------------------------------------------------------------------------------

def test_many_offline_messages_in_order(server):
    """mod_offline reads the whole offline archive in one unlimited find(): hundreds of messages arrive in order,
    once each, and the store is empty afterwards."""
    alice, bob = fresh_users(server, "alice", "bob")
    n = 600

    async def main():
        a = await connect(server, alice)
        try:
            for i in range(n):
                a.send_message(mto=server.jid(bob), mbody=f"bulk {i}", mtype="chat")
            await disco(a)
        finally:
            await a.close()
        b = await connect(server, bob)
        try:
            got = [(await b.next_message())["body"] for _ in range(n)]
            assert got == [f"bulk {i}" for i in range(n)]
            await disco(b)
            assert b.messages.empty(), "no duplicates"
            items = await mam_all(b, page=50)
            assert [i.body for i in items] == got
        finally:
            await b.close()

    run(main(), timeout=150)
    assert count_items(server, bob, store="offline") == 0
    assert count_items(server, bob) == n


def test_concurrent_senders_archive_in_delivery_order(server):
    """Three senders at once: the recipient's archive order is the order the server delivered in, and the ids are the
    <stanza-id/>s the recipient saw live."""
    s1, s2, s3, bob = fresh_users(server, "s", "s", "s", "bob")
    per_sender = 40

    async def main():
        senders = [await connect(server, u) for u in (s1, s2, s3)]
        b = await connect(server, bob)
        try:
            for i in range(per_sender):
                for u, c in zip((s1, s2, s3), senders):
                    c.send_message(mto=server.jid(bob), mbody=f"{u} {i}", mtype="chat")
            live = [await b.next_message() for _ in range(3 * per_sender)]
            live_ids = [stanza_id(m, server.jid(bob)) for m in live]
            items = await mam_all(b, page=50)
            assert [i.id for i in items] == live_ids
            assert [i.body for i in items] == [m["body"] for m in live]
            for u in (s1, s2, s3):
                mine = [body for body in (i.body for i in items) if body.startswith(u + " ")]
                assert mine == [f"{u} {i}" for i in range(per_sender)], "each sender's order is kept"
            page = await mam_query(b, rsm={"max": 0})
            assert page.count == 3 * per_sender
        finally:
            for c in senders + [b]:
                await c.close()

    run(main(), timeout=150)


def test_delivered_ids_survive_server_sigkill(prosody_factory):
    """Prosody killed with SIGKILL right after delivering messages (default durability): after a restart every
    <stanza-id/> a client saw is in the archive."""
    srv = mam_server(prosody_factory, users=[("alice", "pass"), ("bob", "pass")])
    bodies = [f"kill {i}" for i in range(50)]
    ids = run(converse(srv, "alice", "bob", bodies))
    srv.kill()
    srv.start()

    async def main():
        b = await connect(srv, "bob")
        try:
            items = await mam_all(b, page=50)
            assert [i.id for i in items] == ids
            assert [i.body for i in items] == bodies
        finally:
            await b.close()

    run(main())
    con = sqlite3.connect(str(srv.native_db_path()), timeout=10) if STORAGE_DRIVER == "native" else None
    if con is not None:
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()


# -- PEP items on the driver (append with a key: replace-and-move, truncate, lookup by key) ------------------------------

NS_PUBSUB = "http://jabber.org/protocol/pubsub"


def pep_publish(c, iq_id, item_id, text, max_items=3):
    opts = ("<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            f"<field var='pubsub#max_items'><value>{max_items}</value></field></x></publish-options>")
    reply = c.iq(iq_id, f"<iq type='set' id='{iq_id}'><pubsub xmlns='{NS_PUBSUB}'><publish node='urn:example:pep'>"
                        f"<item id='{item_id}'><entry xmlns='urn:example:e'>{text}</entry></item></publish>{opts}"
                        "</pubsub></iq>")
    assert "type='result'" in reply, reply
    return reply


def pep_items(c, iq_id, jid, extra=""):
    reply = c.iq(iq_id, f"<iq type='get' id='{iq_id}' to='{jid}'><pubsub xmlns='{NS_PUBSUB}'>"
                        f"<items node='urn:example:pep'{extra}</pubsub></iq>")
    assert "type='result'" in reply, reply
    return re.findall(r"<item\b[^>]*\bid='([^']+)'[^>]*><entry xmlns='urn:example:e'>([^<]*)</entry>", reply)


def test_pep_items_on_the_driver(prosody_factory):
    storage = dict(STORAGE, pep_data=STORAGE_DRIVER)
    srv = prosody_factory(storage=storage, muc_options=MUC_OPTIONS, global_options=dict(DRIVER_OPTIONS),
                          modules=["pep"], users=[("alice", "pass")])
    c = harness.RawXMPP(srv.c2s_port)
    try:
        jid = srv.jid("alice")
        c.login("alice", "pass")
        for n, (item, text) in enumerate([("a", "one"), ("b", "two"), ("c", "three")]):
            pep_publish(c, f"p{n}", item, text)
        assert pep_items(c, "g1", jid, "/>") == [("a", "one"), ("b", "two"), ("c", "three")]
        pep_publish(c, "p3", "a", "one again")  # same id: replaced and moved to the newest position
        assert pep_items(c, "g2", jid, "/>") == [("b", "two"), ("c", "three"), ("a", "one again")]
        pep_publish(c, "p4", "d", "four")  # max_items 3: the oldest goes
        assert pep_items(c, "g3", jid, "/>") == [("c", "three"), ("a", "one again"), ("d", "four")]
        assert pep_items(c, "g4", jid, "><item id='c'/></items>") == [("c", "three")]
        assert pep_items(c, "g5", jid, " max_items='1'/>") == [("d", "four")]
    finally:
        c.close()
    srv.restart()
    c = harness.RawXMPP(srv.c2s_port)
    try:
        c.login("alice", "pass")
        assert pep_items(c, "g6", srv.jid("alice"), "/>") == [("c", "three"), ("a", "one again"), ("d", "four")]
    finally:
        c.close()


# -- a foreign lock on the database ------------------------------------------------------------------------------------

def test_foreign_write_lock_delays_but_loses_nothing(server):
    """Another process (a backup script, the sqlite3 shell) holds the database's write lock for a second: queries
    still answer, and a message archived meanwhile is stored once the lock goes (busy timeout), not dropped."""
    alice, bob = fresh_users(server, "alice", "bob")
    first_ids = run(converse(server, alice, bob, ["before lock"]))

    async def main():
        a = await connect(server, alice)
        b = await connect(server, bob)
        lock = sqlite3.connect(str(server.native_db_path()), isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN IMMEDIATE")
            try:
                page = await mam_query(b)  # WAL readers are not blocked by a writer
                assert page.ids == first_ids
                a.send_message(mto=server.jid(bob), mbody="during lock", mtype="chat")
                await asyncio.sleep(1.0)
            finally:
                lock.execute("ROLLBACK")
            msg = await b.next_message()
            assert msg["body"] == "during lock"
            sid = stanza_id(msg, server.jid(bob))
            assert sid, "archived (stanza-id stamped) once the lock was released"
            page = await mam_query(b)
            assert page.bodies == ["before lock", "during lock"]
            assert page.ids == first_ids + [sid]
            assert (await mam_query(a)).bodies == ["before lock", "during lock"]
        finally:
            lock.close()
            await a.close()
            await b.close()

    run(main())
    assert "Could not archive stanza" not in server.log_text()


def test_large_message_and_non_ascii_user(server):
    """A ~120 kB body and a non-ASCII local part round-trip through both archives and the `with` filter."""
    (bob,) = fresh_users(server, "bob")
    jurgen = f"j\u00fcrgen{next(_names)}"
    server.register(jurgen, "pass")
    big = "\u00e9" * 60000 + "<&>"

    async def main():
        await converse(server, jurgen, bob, [big])
        a = await connect(server, jurgen)
        try:
            page = await mam_query(a)
            assert page.count == 1 and page.bodies == [big]
        finally:
            await a.close()
        b = await connect(server, bob)
        try:
            page = await mam_query(b, fields={"with": server.jid(jurgen)})
            assert page.count == 1 and page.bodies == [big]
            assert page.items[0].frm.startswith(server.jid(jurgen))
        finally:
            await b.close()

    run(main())
