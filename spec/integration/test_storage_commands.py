"""prosodyctl mod_storage_native commands against a running server: import from another
driver (keys, times and peers kept, resumable), check, stats, backup."""
import re
import sqlite3

import harness

STORE = 'require"core.storagemanager"'


def internal_archive(server, user, items):
    """Appends (key, when, with, body) items to `user`'s archive in the internal driver."""
    for key, when, with_, body in items:
        server.shell_result(
            f'local a = {STORE}.load_driver("localhost", "internal"):open("archive", "archive"); '
            f'return a:append({harness.lua_string(user)}, {harness.lua_string(key)}, '
            f'require"util.stanza".message({{to="{user}@localhost", from={harness.lua_string(with_)}}})'
            f':text_tag("body", {harness.lua_string(body)}), {when}, {harness.lua_string(with_)})')


def native_items(server, user):
    text = server.shell_result(
        f'local out = {{}}; for k, v, w, p in {STORE}.open("localhost", "archive", "archive"):find("{user}") do '
        'out[#out+1] = table.concat({k, tostring(w), p, v:get_child_text("body")}, ","); end; '
        'return table.concat(out, ";")')
    return [tuple(i.split(",")) for i in text.split(";") if i]


def test_import_from_internal_keeps_ids_and_resumes(prosody_factory):
    server = prosody_factory(storage={"archive": "native"}, users=[("alice", "pw")])
    items = [(f"id{i}", 1000 + (7 - i), "bob@localhost", f"hello {i}") for i in range(1, 6)]
    internal_archive(server, "alice", items[:3])
    # a first, partial import ...
    res = server.prosodyctl("mod_storage_native", "import", "internal", "archive")
    assert "localhost archive alice: 3 copied, 0 already present" in res.stdout.decode()
    # ... more arrives in the old store, the import runs again and picks up where it was
    internal_archive(server, "alice", items[3:])
    res = server.prosodyctl("mod_storage_native", "import", "internal", "archive")
    out = res.stdout.decode()
    assert "localhost archive alice: 2 copied, 3 already present" in out
    assert "2 items imported" in out
    assert native_items(server, "alice") == [(k, str(w), p, b) for k, w, p, b in items]


def native_append(server, user, key, when):
    assert server.shell_result(
        f'return {STORE}.open("localhost", "archive", "archive"):append({harness.lua_string(user)}, '
        f'{harness.lua_string(key)}, require"util.stanza".message():text_tag("body", "native"), {when}, '
        '"bob@localhost")') == key


def test_import_refuses_to_put_old_history_after_newer_native_items(prosody_factory):
    """Imported items are appended: once Prosody archives natively, they would sort after the messages archived
    since (the newest MAM page would show old history, a client catching up after its last id would get all of
    it as new). An archive holding such newer items is left alone and the import fails, saying what to do; items
    older than what is imported are no obstacle."""
    server = prosody_factory(storage={"archive": "native"}, users=[("alice", "pw"), ("bob", "pw"), ("carol", "pw")])
    old = [(f"old{i}", 1000 + i, "bob@localhost", f"history {i}") for i in range(1, 4)]
    for user in ("alice", "bob", "carol"):
        internal_archive(server, user, [(f"{user}-{k}", w, p, b) for k, w, p, b in old])
    native_append(server, "alice", "live1", "os.time()")  # archived since the switch
    native_append(server, "carol", "ancient", 500)  # older than anything imported
    res = server.prosodyctl("mod_storage_native", "import", "internal", "archive", check=False)
    out = res.stdout.decode()
    assert res.returncode == 1, out
    assert "localhost archive alice: FAILED: refused: the native archive already holds 1 item(s) newer" in out
    assert "then switch storage to native" in out
    assert "localhost archive bob: 3 copied, 0 already present" in out
    assert "localhost archive carol: 3 copied, 0 already present" in out
    assert [k for k, *_ in native_items(server, "alice")] == ["live1"]
    assert [k for k, *_ in native_items(server, "carol")] == ["ancient"] + [f"carol-old{i}" for i in range(1, 4)]


def test_import_refuses_unknown_driver(prosody_factory):
    server = prosody_factory(storage={"archive": "native"})
    res = server.prosodyctl("mod_storage_native", "import", "no_such_driver", check=False)
    assert res.returncode == 1
    assert 'cannot load storage driver "no_such_driver"' in res.stdout.decode()


def test_check_stats_and_online_backup(prosody_factory):
    server = prosody_factory(storage={"archive": "native"}, users=[("alice", "pw")])
    for i in range(20):
        server.shell_result(f'return {STORE}.open("localhost", "archive", "archive"):append("alice", nil, '
                            f'require"util.stanza".message():text_tag("body", "m{i}"), {i}, "bob@localhost")')
    res = server.prosodyctl("mod_storage_native", "check")
    assert res.stdout.decode().strip().endswith(": ok")
    stats = res = server.prosodyctl("mod_storage_native", "stats").stdout.decode()
    assert "items       20" in stats
    copy = server.tmp / "backup.sqlite"
    server.prosodyctl("mod_storage_native", "backup", str(copy))
    # the server keeps archiving while and after the copy is taken
    assert server.shell_result(f'return {STORE}.open("localhost", "archive", "archive"):append("alice", nil, '
                               f'require"util.stanza".message(), 99, "bob@localhost") ~= nil') == "true"
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 20
    res = server.prosodyctl("mod_storage_native", "backup", str(copy), check=False)
    assert res.returncode == 1
    assert "backup failed" in res.stdout.decode()


def test_vacuum_and_a_database_restored_without_incremental_auto_vacuum(prosody_factory):
    """A database copied with `sqlite3 .dump | sqlite3` (or VACUUMed with auto_vacuum off) is not in incremental
    auto-vacuum mode, and PRAGMA auto_vacuum cannot change that once it has tables. Deletes still return, the
    vacuum command says why it cannot return free pages and how to convert the file; once converted, it does."""
    server = prosody_factory(storage={"archive": "native"}, users=[("alice", "pw")])
    append = (f'local a = {STORE}.open("localhost", "archive", "archive"); for i = 1, 300 do '
              'assert(a:append("alice", nil, require"util.stanza".message():text_tag("body", ("x"):rep(1000)), i, '
              '"bob@localhost")) end; return "ok"')
    delete = f'return (select(1, {STORE}.open("localhost", "archive", "archive"):delete("alice")))'
    assert server.shell_result(append) == "ok"
    server.stop()
    with sqlite3.connect(server.native_db_path(), isolation_level=None) as db:
        db.execute("PRAGMA auto_vacuum = NONE")
        db.execute("VACUUM")
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    db.close()
    server.start()
    assert server.shell_result(delete) == "300"  # no endless vacuuming after the delete
    assert "not in incremental auto-vacuum mode" in server.log_text()
    stats = server.prosodyctl("mod_storage_native", "stats").stdout.decode()
    assert "auto_vacuum none" in stats
    assert int(re.search(r"free_pages\s+(\d+)", stats).group(1)) > 50
    res = server.prosodyctl("mod_storage_native", "vacuum", check=False)
    out = res.stdout.decode()
    assert res.returncode == 1, out
    assert "not in incremental auto-vacuum mode (auto_vacuum = 0)" in out
    assert "PRAGMA auto_vacuum = INCREMENTAL; VACUUM;" in out

    # the conversion it tells of, then the command does its work
    server.stop()
    with sqlite3.connect(server.native_db_path(), isolation_level=None) as db:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")
    db.close()
    server.start()
    assert server.shell_result(append) == "ok"
    assert server.shell_result(delete) == "300"  # the driver returns the freed pages itself
    stats = server.prosodyctl("mod_storage_native", "stats").stdout.decode()
    assert "auto_vacuum incremental" in stats
    assert "free_pages  0" in stats
    res = server.prosodyctl("mod_storage_native", "vacuum")
    assert "0 free pages returned to the file system" in res.stdout.decode()


def test_unknown_command_prints_usage(prosody_factory):
    server = prosody_factory(storage={"archive": "native"})
    res = server.prosodyctl("mod_storage_native", "frobnicate", check=False)
    assert res.returncode == 2
    assert "usage: prosodyctl mod_storage_native" in res.stdout.decode()


def test_archive_keeps_working_after_prosody_daemonizes(tmp_path):
    """`prosodyctl start` runs Prosody with -D: it forks after the storage driver has
    opened the database and started its checkpoint thread. The driver closes both just
    before (no SQLite connection may cross a fork) and the daemon opens them again; a
    `prosodyctl` command opening the same file meanwhile must not cost it anything."""
    import os
    import signal
    import socket
    import subprocess
    import time

    server = harness.ProsodyServer(storage={"archive": "native"}, name="daemonized")
    try:
        launcher = subprocess.run([harness.PROSODY, "-D", "--config", str(server.config_path)],
                                  env=harness.child_env(), cwd=str(server.tmp), timeout=60,
                                  stdin=subprocess.DEVNULL, capture_output=True)
        assert launcher.returncode == 0, launcher.stderr
        deadline = time.monotonic() + 20
        pid = None
        while time.monotonic() < deadline:
            text = server.pidfile.read_text().strip() if server.pidfile.exists() else ""
            if text and server._port_open():
                pid = int(text)
                break
            time.sleep(0.05)
        assert pid, "daemonized prosody did not come up"
        try:
            assert "Successfully daemonized" in server.log_text()
            for i in range(3):
                assert server.shell_result(
                    f'return {STORE}.open("localhost", "archive", "archive"):append("alice", "d{i}", '
                    f'require"util.stanza".message(), {i}, "bob@localhost")') == f"d{i}"
            assert server.shell_result(
                f'local _, total = {STORE}.open("localhost", "archive", "archive"):find("alice", '
                '{ limit = 0, total = true }); return total') == "3"
            # another process opens the database (its first opener after the fork) ...
            assert "items       3" in server.prosodyctl("mod_storage_native", "stats").stdout.decode()
            # ... and the daemon's later appends all reach the file
            assert server.shell_result(
                f'local a = {STORE}.open("localhost", "archive", "archive"); '
                'for i = 4, 500 do assert(a:append("alice", "d" .. i, require"util.stanza".message(), i, '
                '"bob@localhost")) end return "ok"') == "ok"
            assert "cannot open the archive database again" not in server.log_text()
            assert "open when the process forked" not in server.log_text()
        finally:
            os.kill(pid, signal.SIGTERM)
            exited = False
            for _ in range(400):  # a clean shutdown takes well under a second; a hang never ends
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    exited = True
                    break
                time.sleep(0.05)
            if not exited:
                os.kill(pid, signal.SIGKILL)
        assert exited, "the daemonized Prosody hung at shutdown"
        with sqlite3.connect(server.native_db_path()) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT count(*) FROM items").fetchone()[0] == 500
    finally:
        server.cleanup()
