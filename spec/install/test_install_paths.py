"""Prosody finds the pack however an admin installed it.

(1) a checkout on plugin_paths is what every integration spec uses; here:
(2) `luarocks --lua-version=5.4 --tree=<installer_plugin_path> make` -- what `prosodyctl install` does;
(3) `make install` into a prefix, with Lua's cpath and Prosody's plugin_paths pointing there;
and a missing or mismatched engine fails the module load with a message saying what to build.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import harness

REPO = harness.REPO
ARCHIVE_ONE = ('local a = require"core.storagemanager".open("localhost", "install-check", "archive"); '
               'local k = assert(a:append("alice", nil, require"util.stanza".message({id="x"}), 1, "bob@localhost")); '
               'local it, total = a:find("alice", { key = k, total = true }); local _, v = it(); '
               'return tostring(total) .. " " .. v.attr.id')


def source_copy(tmp):
    """The committed and working-tree files of the checkout, without build outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    dest = Path(tmp) / "src"
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def archive_storage_works(server):
    assert server.shell_result(ARCHIVE_ONE) == "1 x"
    assert "Archive database" in server.log_text()


def test_luarocks_tree_as_installer_plugin_path(tmp_path):
    src = source_copy(tmp_path)
    server = harness.ProsodyServer(storage={"archive": "native"}, name="rock",
                                   global_options={"plugin_paths": []})
    tree = server.tmp / "custom_plugins"
    res = subprocess.run(["luarocks", "--lua-version=5.4", f"--tree={tree}", "make",
                          "rockspec/prosody-native-scm-1.rockspec"], cwd=src, capture_output=True, text=True,
                         env=harness.child_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tree / "share/lua/5.4/mod_storage_native.lua").exists()
    assert (tree / "lib/lua/5.4/prosody_native/archive.so").exists()
    server.start()
    try:
        archive_storage_works(server)
        # the engine came from the tree, not from the checkout
        assert "build" not in server.shell_result('return package.searchpath("prosody_native.archive", package.cpath)')
    finally:
        server.stop()


def test_make_install_prefix(tmp_path):
    src = source_copy(tmp_path)
    prefix = tmp_path / "usr"
    res = subprocess.run(["make", "install", f"PREFIX={prefix}"], cwd=src, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cmod = prefix / "lib/lua/5.4"
    assert (cmod / "prosody_native/archive.so").exists()
    server = harness.ProsodyServer(storage={"archive": "native"}, name="make-install",
                                   global_options={"plugin_paths": [str(prefix / "lib/prosody/modules")]})
    os.environ["LUA_CPATH"] = f"{cmod}/?.so;;"
    try:
        server.start()
        archive_storage_works(server)
    finally:
        os.environ.pop("LUA_CPATH", None)
        server.stop()


def start_with_modules(modules_dir, name):
    server = harness.ProsodyServer(storage={"archive": "native"}, name=name,
                                   global_options={"plugin_paths": [str(modules_dir)]})
    server.start()
    return server


def load_failure(server):
    out = server.shell('>local ok, err = pcall(require"core.storagemanager".load_driver, "localhost", "native"); '
                       'return tostring(ok) .. " " .. tostring(err)')
    return out + server.log_text()


def test_missing_engine_names_what_to_build(tmp_path):
    mods = tmp_path / "modules"
    shutil.copytree(REPO / "modules", mods)
    server = start_with_modules(mods, "missing")
    try:
        text = load_failure(server)
        assert "native engine prosody_native.archive not found" in text
        assert "Build it with `make`" in text
    finally:
        server.stop()


def test_mismatched_engine_is_refused(tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "modules", root / "modules")
    so_dir = root / "build/prosody_native"
    so_dir.mkdir(parents=True)
    stub = tmp_path / "old.c"
    stub.write_text('#include <lua.h>\n#include <lauxlib.h>\nint luaopen_prosody_native_archive(lua_State *L);\n'
                    'int luaopen_prosody_native_archive(lua_State *L) { lua_newtable(L); '
                    'lua_pushinteger(L, 0); lua_setfield(L, -2, "_ABI"); return 1; }\n')
    cflags = subprocess.run(["pkg-config", "--cflags", "lua5.4"], capture_output=True, text=True).stdout.split()
    subprocess.run(["cc", "-shared", "-fPIC", *cflags, "-o", str(so_dir / "archive.so"), str(stub)], check=True)
    env_build = os.environ.pop("PN_BUILD", None)
    try:
        server = start_with_modules(root / "modules", "mismatch")
        try:
            text = load_failure(server)
            assert "has interface version 0 but this shim needs 1" in text
        finally:
            server.stop()
    finally:
        if env_build is not None:
            os.environ["PN_BUILD"] = env_build
