#!/bin/sh
# Runs bench/limits_bench.lua against the installed Prosody's util.cache/util.throttle and this
# checkout's build (PN_BUILD, default build).  sh bench/limits_bench.sh [--quick]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROSODY_DIR=${PROSODY_DIR:-/usr/lib/prosody}
PN_BUILD=${PN_BUILD:-build}
export LUA_PATH="$PROSODY_DIR/?.lua;;"
export LUA_CPATH="$PROSODY_DIR/?.so;$ROOT/$PN_BUILD/?.so;;"
exec "${LUA:-lua5.4}" "$ROOT/bench/limits_bench.lua" "$@"
