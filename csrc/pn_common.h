/* prosody-native: helpers shared by the native engines.
 * Copyright (c) prosody-native contributors. MIT licence.
 *
 * Header-only on purpose: every engine is one translation unit, and nothing here
 * is big enough to deserve a library of its own.
 */
#ifndef PN_COMMON_H
#define PN_COMMON_H

#include <errno.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

#include <lua.h>
#include <lauxlib.h>

/* Version of the interface between the Lua shims and the engines; the shims refuse
 * an engine whose _ABI differs (prosody_native_loader.lib.lua). */
#define PN_ABI 1

/* Expected failure: pushes nil, message, code and returns 3, as liolib does. */
static inline int pn_fail(lua_State *L, const char *msg, const char *code) {
	lua_pushnil(L);
	lua_pushstring(L, msg);
	if(code)
		lua_pushstring(L, code);
	else
		lua_pushnil(L);
	return 3;
}

/* Seconds on a clock that never jumps, for budgets and intervals. */
static inline double pn_monotonic(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Seconds since the epoch, with sub-second precision. */
static inline double pn_realtime(void) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Fills buf with len bytes from the kernel's CSPRNG; 0 on success, -1 with errno. */
static inline int pn_random_bytes(unsigned char *buf, size_t len) {
	while(len > 0) {
		ssize_t got = getrandom(buf, len, 0);
		if(got < 0) {
			if(errno == EINTR)
				continue;
			return -1;
		}
		buf += got;
		len -= (size_t)got;
	}
	return 0;
}

/* Creates the metatable `name` with __name set, the methods as __index and the
 * metamethods registered; leaves nothing on the stack. */
static inline void pn_new_class(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods) {
	luaL_newmetatable(L, name);
	luaL_setfuncs(L, meta, 0);
	lua_newtable(L);
	luaL_setfuncs(L, methods, 0);
	lua_setfield(L, -2, "__index");
	lua_pop(L, 1);
}

/* Reads an optional integer field, raising a clear error when it has another type. */
static inline lua_Integer pn_opt_integer_field(lua_State *L, int t, const char *field, lua_Integer def) {
	lua_Integer v = def;
	int isnum;
	if(lua_getfield(L, t, field) != LUA_TNIL) {
		v = lua_tointegerx(L, -1, &isnum);
		if(!isnum)
			luaL_error(L, "option '%s' must be an integer", field);
	}
	lua_pop(L, 1);
	return v;
}

static inline lua_Number pn_opt_number_field(lua_State *L, int t, const char *field, lua_Number def) {
	lua_Number v = def;
	int isnum;
	if(lua_getfield(L, t, field) != LUA_TNIL) {
		v = lua_tonumberx(L, -1, &isnum);
		if(!isnum)
			luaL_error(L, "option '%s' must be a number", field);
	}
	lua_pop(L, 1);
	return v;
}

#endif
