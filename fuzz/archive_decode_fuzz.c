/* libFuzzer target: the archive engine's value decoder on arbitrary bytes.
 * The decoder reads values back from the database file, which anything with write
 * access to it can alter: it must reject every malformed input without reading out
 * of bounds, recursing without limit or leaking. Built by `make fuzz`. */
#include <stddef.h>
#include <stdint.h>

#include "../csrc/archive.c"

#include <lualib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lua_State *state(void) {
	static lua_State *L;
	if(!L) {
		L = luaL_newstate();
		luaL_openlibs(L);
		luaL_requiref(L, "prosody_native.archive", luaopen_prosody_native_archive, 0);
		lua_getfield(L, -1, "_decode");
		lua_setglobal(L, "decode");
		lua_pop(L, 1);
		lua_newtable(L); /* stands in for util.stanza's metatable */
		lua_setglobal(L, "element_mt");
	}
	return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	lua_State *L = state();
	int top = lua_gettop(L);
	lua_getglobal(L, "decode");
	lua_pushlstring(L, (const char *)data, size);
	lua_getglobal(L, "element_mt");
	if(lua_pcall(L, 2, 1, 0) == LUA_OK && lua_istable(L, -1)) {
		/* A decoded value must be encodable again: walks everything decode built. */
		lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
		lua_getfield(L, -1, "prosody_native.archive");
		lua_getfield(L, -1, "_encode");
		lua_pushvalue(L, top + 1);
		lua_getglobal(L, "element_mt");
		lua_pcall(L, 2, 1, 0);
	}
	lua_settop(L, top);
	lua_gc(L, LUA_GCSTEP, 0);
	return 0;
}
