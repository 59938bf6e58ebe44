"""Another process holding the database's write lock (a maintenance script, the sqlite3
shell) must not freeze Prosody: the archiving stanza waits, everything else goes on, and
the message is archived once the lock goes."""
import re
import sqlite3

import harness

WAIT = 60000  # ms: storage_native_busy_timeout, far beyond the test's own timeouts


def test_server_answers_while_an_append_waits_for_a_foreign_lock(prosody_factory):
    server = prosody_factory(storage={"archive": "native"},
                             global_options={"storage_native_busy_timeout": WAIT},
                             users=[("alice", "pw"), ("bob", "pw"), ("carol", "pw")])
    alice, bob, carol = (harness.RawXMPP(server.c2s_port, timeout=15) for _ in range(3))
    alice.login("alice", "pw")
    bob.login("bob", "pw")
    carol.login("carol", "pw")
    for c in (alice, bob, carol):  # available, so messages reach the session
        c.send("<presence/>")
    lock = sqlite3.connect(str(server.native_db_path()), isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")
        alice.send("<message type='chat' to='bob@localhost' id='locked1'><body>during the lock</body></message>")
        # A frozen server would answer only after storage_native_busy_timeout (60 s);
        # this read gives up after 15 s.
        reply = carol.iq("disco1", "<iq type='get' to='localhost' id='disco1'>"
                                   "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        assert "type='result'" in reply or 'type="result"' in reply
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    delivered = bob.read_until(r"<message[^>]*id=['\"]locked1['\"].*?</message>")
    assert "during the lock" in delivered
    sid = re.search(r"<stanza-id[^>]*by=['\"]bob@localhost['\"][^>]*id=['\"]([^'\"]+)", delivered) or \
        re.search(r"<stanza-id[^>]*id=['\"]([^'\"]+)['\"][^>]*by=['\"]bob@localhost['\"]", delivered)
    assert sid, f"archived before delivery: {delivered}"
    stored = server.shell_result('local it = require"core.storagemanager".open("localhost", "archive", "archive")'
                                 f':find("bob", {{ key = "{sid.group(1)}" }}); local _, v = it(); '
                                 'return v and v:get_child_text("body")')
    assert stored == "during the lock"
    assert "database is locked" not in server.log_text()
    for c in (alice, bob, carol):
        c.close()
