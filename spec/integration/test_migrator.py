"""Prosody's own prosody-migrator moves archives into mod_storage_native and back out again
through the storage API alone, keeping keys, order, fractional times, peers and payloads.

prosody-migrator has its data directory (/var/lib/prosody) and installer plugin tree
(/var/lib/prosody/custom_plugins) compiled in and reads no Prosody config, so an admin's
migration runs with the pack installed where `prosodyctl install` puts it and with every
option at its default. The spec runs the real /usr/bin/prosody-migrator exactly so, inside a
private mount namespace in which a temporary directory stands in for /var/lib/prosody.
"""
import shutil
import subprocess

import pytest

import harness

STORE = 'require"core.storagemanager"'
ROOM_HOST = harness.MUC_DOMAIN

# (key, when, with, body): explicit keys, times out of order (archives keep append order, never
# time order), a payload with characters that need escaping. mod_storage_internal on Lua 5.4
# cannot take a fractional `when` (util.datetime hands it to os.date), so fractional times are
# exercised on the leg through mod_storage_sql.
ALICE = [(f"a-{i}", 1700000000 + i + (5 if i == 3 else 0), f"bob@{harness.DOMAIN}", f"hello <{i}> & ü")
         for i in range(1, 8)]
BOB = [("b-1", 1600000000, f"alice@{harness.DOMAIN}/phone", "only one")]
ROOM = [(f"r-{i}", 1700001000 + i, f"support@{ROOM_HOST}/visitor{i}", f"line {i}") for i in range(1, 5)]
FRACTIONAL = [(f"f-{i}", 1700000000 + 0.125 * i + (3 if i == 2 else 0), f"carol@{harness.DOMAIN}", f"frac {i}")
              for i in range(1, 6)]


def append_items(server, host, store, user, items):
    for key, when, with_, body in items:
        server.shell_result(
            f'local a = {STORE}.open({harness.lua_string(host)}, {harness.lua_string(store)}, "archive"); '
            f'return a:append({harness.lua_string(user)}, {harness.lua_string(key)}, '
            f'require"util.stanza".message({{to={harness.lua_string(user + "@" + host)}, from={harness.lua_string(with_)}}})'
            f':text_tag("body", {harness.lua_string(body)}), {when!r}, {harness.lua_string(with_)})')


def read_items(server, host, store, user):
    """Every item of one archive in order, as (key, when, with, body), through the storage API."""
    text = server.shell_result(
        f'local out = {{}}; for k, v, w, p in {STORE}.open({harness.lua_string(host)}, {harness.lua_string(store)}, '
        f'"archive"):find({harness.lua_string(user)}) do '
        'out[#out+1] = table.concat({k, ("%.17g"):format(w), p, v:get_child_text("body")}, " | "); end; '
        'return table.concat(out, " ;; ")')
    return [tuple(i.split(" | ")) for i in text.split(" ;; ") if i]


def expected(items):
    return [(k, "%.17g" % w, p, b) for k, w, p, b in items]


@pytest.fixture(scope="module")
def rock_tree(tmp_path_factory):
    """The pack built and installed by luarocks into a tree, as `prosodyctl install` does."""
    base = tmp_path_factory.mktemp("rock")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=harness.REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    src = base / "src"
    for f in files:
        if (harness.REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(harness.REPO / f, src / f)
    tree = base / "tree"
    res = subprocess.run(["luarocks", "--lua-version=5.4", f"--tree={tree}", "make",
                          "rockspec/prosody-native-scm-1.rockspec"], cwd=src, capture_output=True, text=True,
                         env=harness.child_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return tree


def installed_datadir(path, rock_tree):
    """A stand-in for /var/lib/prosody with the pack in its installer plugin tree."""
    path.mkdir()
    shutil.copytree(rock_tree, path / "custom_plugins", symlinks=True)
    return path


def migrator_config(path, input_store, output_store):
    def store(conf):
        body = [f"    {k} = {harness.lua_string(str(v))};" for k, v in conf.items()]
        body.append(f"    hosts = {{ [{harness.lua_string(harness.DOMAIN)}] = {{ \"archive-archive\" }}; "
                    f"[{harness.lua_string(ROOM_HOST)}] = {{ \"muc_log-archive\" }} }};")
        return "\n".join(body)
    path.write_text(f"input {{\n{store(input_store)}\n}}\noutput {{\n{store(output_store)}\n}}\n")


def run_migrator(datadir, config, tmp):
    """The real prosody-migrator with `datadir` mounted over /var/lib/prosody."""
    log = tmp / f"migrator-{config.stem}.log"
    script = ('mount --bind "$1" /var/lib/prosody && shift && exec "$@"')
    with open(log, "wb") as out:
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                              str(datadir), "/usr/bin/prosody-migrator", "--root", "--config", str(config),
                              "input", "output"],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=harness.child_env(), timeout=120)
    text = log.read_text(errors="replace")
    assert res.returncode == 0, text
    assert "Done!" in text, text
    assert "error" not in text.lower(), text
    return text


@pytest.fixture
def namespace_available(tmp_path):
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f'mount --bind "{tmp_path}" /var/lib/prosody'], capture_output=True)
    assert probe.returncode == 0, "the migrator spec needs root and mount namespaces: " + probe.stderr.decode()


def fill_internal(server):
    append_items(server, harness.DOMAIN, "archive", "alice", ALICE)
    append_items(server, harness.DOMAIN, "archive", "bob", BOB)
    append_items(server, ROOM_HOST, "muc_log", "support", ROOM)


def assert_same_archives(server):
    assert read_items(server, harness.DOMAIN, "archive", "alice") == expected(ALICE)
    assert read_items(server, harness.DOMAIN, "archive", "bob") == expected(BOB)
    assert read_items(server, ROOM_HOST, "muc_log", "support") == expected(ROOM)


def test_prosody_migrator_round_trip_internal_native_internal(prosody_factory, tmp_path, rock_tree, namespace_available):
    source = prosody_factory(name="mig-source", default_storage="internal")
    fill_internal(source)
    assert_same_archives(source)

    # internal -> native, with the migrator's defaults (it reads no storage_native_* option)
    datadir = installed_datadir(tmp_path / "var-lib-prosody", rock_tree)
    to_native = tmp_path / "to-native.cfg.lua"
    migrator_config(to_native, {"type": "internal", "path": source.data_dir}, {"type": "native"})
    run_migrator(datadir, to_native, tmp_path)
    database = datadir / "prosody-native.sqlite"
    assert database.exists()

    # a Prosody on our driver serves exactly what the migrator wrote
    native = prosody_factory(name="mig-native", storage={"archive": "native", "muc_log": "native"},
                             global_options={"storage_native_path": str(database)})
    assert_same_archives(native)
    assert native.shell_result(f'return select(2, {STORE}.open("{harness.DOMAIN}", "archive", "archive")'
                               ':find("alice", { total = true; limit = 0 }))') == str(len(ALICE))
    native.stop()

    # native -> internal: the migrator reads our archives through the same API
    back = prosody_factory(name="mig-back", default_storage="internal")
    to_internal = tmp_path / "to-internal.cfg.lua"
    migrator_config(to_internal, {"type": "native"}, {"type": "internal", "path": back.data_dir})
    run_migrator(datadir, to_internal, tmp_path)
    assert_same_archives(back)


def test_prosody_migrator_round_trip_native_sql_native(prosody_factory, tmp_path, rock_tree, namespace_available):
    """Fractional times and the MUC store through mod_storage_sql and back into a new database."""
    first = installed_datadir(tmp_path / "first", rock_tree)
    origin = prosody_factory(name="mig-origin", storage={"archive": "native", "muc_log": "native"},
                             global_options={"storage_native_path": str(first / "prosody-native.sqlite")})
    append_items(origin, harness.DOMAIN, "archive", "alice", FRACTIONAL)
    append_items(origin, ROOM_HOST, "muc_log", "support", ROOM)
    origin.stop()

    sql_file = tmp_path / "prosody.sqlite"
    to_sql = tmp_path / "to-sql.cfg.lua"
    sql = {"type": "sql", "driver": "SQLite3", "database": sql_file}
    migrator_config(to_sql, {"type": "native"}, sql)
    run_migrator(first, to_sql, tmp_path)
    in_sql = prosody_factory(name="mig-sql", default_storage="sql",
                             global_options={"sql": {"driver": "SQLite3", "database": str(sql_file)}})
    assert read_items(in_sql, harness.DOMAIN, "archive", "alice") == expected(FRACTIONAL)
    in_sql.stop()

    second = installed_datadir(tmp_path / "second", rock_tree)
    from_sql = tmp_path / "from-sql.cfg.lua"
    migrator_config(from_sql, sql, {"type": "native"})
    run_migrator(second, from_sql, tmp_path)
    again = prosody_factory(name="mig-again", storage={"archive": "native", "muc_log": "native"},
                            global_options={"storage_native_path": str(second / "prosody-native.sqlite")})
    assert read_items(again, harness.DOMAIN, "archive", "alice") == expected(FRACTIONAL)
    assert read_items(again, ROOM_HOST, "muc_log", "support") == expected(ROOM)
