#!/bin/sh
# Runs bench/smacks_bench.lua against the installed Prosody's util.smqueue/util.stanza and this
# checkout's build (PN_BUILD, default build).  sh bench/smacks_bench.sh [--quick]
# SMACKS_BENCH_SESSIONS sets the number of hibernated sessions for the memory case (default 1000).
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROSODY_DIR=${PROSODY_DIR:-/usr/lib/prosody}
PN_BUILD=${PN_BUILD:-build}
export LUA_PATH="$PROSODY_DIR/?.lua;;"
export LUA_CPATH="$PROSODY_DIR/?.so;$ROOT/$PN_BUILD/?.so;;"
exec "${LUA:-lua5.4}" "$ROOT/bench/smacks_bench.lua" "$@"
