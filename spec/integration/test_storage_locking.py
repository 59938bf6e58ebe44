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


def test_commands_work_while_prosody_holds_a_batch_open(prosody_factory):
    """A running Prosody holds the write lock for a whole batch of appends (up to storage_native_commit_delay):
    prosodyctl's stats, check and backup need no write lock at all, and import waits for its turn."""
    server = prosody_factory(storage={"archive": "native"},
                             global_options={"storage_native_commit_delay": 3, "storage_native_busy_timeout": WAIT},
                             users=[("alice", "pw")])
    store = 'require"core.storagemanager"'
    opened = [0]

    def open_batch():
        """An append in Prosody: it begins a batch, committed 3 s later."""
        opened[0] += 1
        assert server.shell_result(
            f'return {store}.open("localhost", "archive", "archive"):append("alice", "live{opened[0]}", '
            f'require"util.stanza".message():text_tag("body", "live"), os.time(), "carol@localhost")') \
            == f"live{opened[0]}"

    open_batch()
    stats = server.prosodyctl("mod_storage_native", "stats").stdout.decode()
    assert re.search(r"items\s+\d+", stats)
    open_batch()
    assert server.prosodyctl("mod_storage_native", "check").stdout.decode().strip().endswith(": ok")
    open_batch()
    copy = server.tmp / "backup.sqlite"
    server.prosodyctl("mod_storage_native", "backup", str(copy))
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    for i in range(3):
        server.shell_result(
            f'return {store}.load_driver("localhost", "internal"):open("archive", "archive"):append("bob", "old{i}", '
            f'require"util.stanza".message():text_tag("body", "old"), {1000 + i}, "carol@localhost")')
    open_batch()
    out = server.prosodyctl("mod_storage_native", "import", "internal", "archive").stdout.decode()
    assert "localhost archive bob: 3 copied, 0 already present" in out
    assert server.shell_result(
        f'local _, total = {store}.open("localhost", "archive", "archive"):find("bob", '
        '{ limit = 0, total = true }); return total') == "3"
    assert "database is locked" not in server.log_text()


def test_prosody_starts_while_another_process_holds_the_write_lock(prosody_factory):
    """A maintenance script or the sqlite3 shell holding the write lock while Prosody starts: the driver loads
    (opening an up-to-date database takes no write lock) and archives once the lock is gone."""
    server = prosody_factory(storage={"archive": "native"},
                             global_options={"storage_native_busy_timeout": WAIT},
                             users=[("alice", "pw")])
    assert server.shell_result('return require"core.storagemanager".open("localhost", "archive", "archive")'
                               ':append("alice", "before", require"util.stanza".message(), 1, "bob@localhost")') \
        == "before"
    server.stop()
    lock = sqlite3.connect(str(server.native_db_path()), isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN IMMEDIATE")
        server.start()
        assert server.shell_result('return require"core.storagemanager".get_driver("localhost", "archive").name') \
            == "native"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert server.shell_result('return require"core.storagemanager".open("localhost", "archive", "archive")'
                               ':append("alice", "after", require"util.stanza".message(), 2, "bob@localhost")') \
        == "after"
    assert "cannot open the archive database" not in server.log_text()
    assert not [line for line in server.log_errors() if "storage" in line]
