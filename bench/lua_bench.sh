#!/bin/sh
# Runs bench/NAME_bench.lua with the installed Prosody's util.* on LUA_PATH (PROSODY_DIR, default
# /usr/lib/prosody) and this checkout's engines on LUA_CPATH (PN_BUILD, default build).
#   sh bench/lua_bench.sh smacks|limits|limits_shim|dane [--quick]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROSODY_DIR=${PROSODY_DIR:-/usr/lib/prosody}
PN_BUILD=${PN_BUILD:-build}
name=${1:?usage: sh bench/lua_bench.sh NAME [args], NAME being smacks, limits, limits_shim or dane}
shift
export LUA_PATH="$PROSODY_DIR/?.lua;;"
export LUA_CPATH="$PROSODY_DIR/?.so;$ROOT/$PN_BUILD/?.so;;"
exec "${LUA:-lua5.4}" "$ROOT/bench/${name}_bench.lua" "$@"
