#!/bin/sh
# The archive storage benchmark (bench/run runs it with the others).
#   sh bench/archive_bench.sh [--quick] [REF_SIZE [NATIVE_SIZE]] [options]   (--help for all options)
# Loads the installed Prosody's drivers (PROSODY_DIR, default /usr/lib/prosody) and this
# checkout's mod_storage_native + build/prosody_native/*.so (PN_BUILD, default build).
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROSODY_DIR=${PROSODY_DIR:-/usr/lib/prosody}
PN_BUILD=${PN_BUILD:-build}
LUA=${LUA:-lua5.4}
if [ ! -f "$PROSODY_DIR/core/storagemanager.lua" ]; then
	echo "bench/run: Prosody not found in $PROSODY_DIR (set PROSODY_DIR)" >&2
	exit 2
fi
export PROSODY_DIR PN_BUILD
export PN_ROOT="$ROOT"
export LUA_PATH="$PROSODY_DIR/?.lua;$ROOT/modules/?.lua;;"
export LUA_CPATH="$PROSODY_DIR/?.so;$ROOT/$PN_BUILD/?.so;;"
export CFG_PLUGINDIR="$PROSODY_DIR/modules/;$ROOT/modules/"
# Prosody's storage modules resolve relative paths against the data dir; run from the checkout
cd "$ROOT"
exec "$LUA" "$ROOT/bench/archive_bench.lua" "$@"
