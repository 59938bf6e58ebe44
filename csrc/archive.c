/* prosody-native: archive engine -- ordered per-owner archives of Lua values in SQLite.
 * Copyright (c) prosody-native contributors. MIT licence.
 *
 * An archive belongs to an owner (host, store, user) and holds items (key, when, with,
 * value) in append order. Values are Lua values in a compact binary encoding; tables
 * whose metatable is the `element_mt` given at open time are encoded as XML-like
 * elements (name, attr, children) and come back as fresh tables with that metatable,
 * so reading a page never parses XML. The engine knows nothing about Prosody.
 *
 * Rules kept everywhere: no statement stays open across calls (every result is
 * materialised, every statement reset), and every write is one transaction that
 * keeps the per-owner item counter exact.
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <sqlite3.h>

#include "pn_common.h"

#define ARCHIVE_MT "prosody_native.archive"
#define SCHEMA_VERSION 2
#define STMT_CACHE_SIZE 48
#define VALUE_FORMAT 1
#define MAX_DEPTH 64
#define MAX_IDS 4096
/* A WAL longer than this is checkpointed and truncated, not just copied back. */
#define WAL_RESET_FRAMES 4096

struct stmt_slot {
	char *sql;
	sqlite3_stmt *stmt;
	unsigned long used;
};

struct checkpointer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	int running;
	int stop;
	int wal_full;      /* set by the writer when the WAL passed WAL_RESET_FRAMES */
	int failed;        /* the thread could not open its connection */
	int writing;       /* the engine's own connection is in a write transaction */
	int restarting;    /* the thread is in a restarting checkpoint (its own field) */
	int interval_changed; /* db:configure() gave a new interval */
	/* Durability tickets: everything committed before ticket N was taken is on disk
	 * once synced >= N, unless N is in (failed_from, failed_to]: the fsync meant to
	 * cover it failed. */
	unsigned long requested, synced, failed_from, failed_to;
	pthread_cond_t synced_cond;
	double interval;
	char *path;
	int log_fd[2];     /* the append logs to fdatasync with each checkpoint, or -1 */
};

typedef struct {
	sqlite3 *db;               /* NULL once closed */
	int element_mt_ref;        /* registry ref of the element metatable, or LUA_NOREF */
	struct stmt_slot cache[STMT_CACHE_SIZE];
	unsigned long clock;
	unsigned char *buf;        /* encoding buffer, reused across appends */
	size_t buf_len, buf_cap;
	struct checkpointer ckpt;
	/* What it takes to reopen after a fork (Prosody daemonizes after loading). */
	pid_t pid;
	char *path;
	int durable, busy_ms;
	double interval;
	unsigned long generation;  /* fork_generation when opened */
	/* Group commit: consecutive appends share one write transaction, each also written
	 * to the append log (one write(2), so it survives a kill) until the commit. */
	int batch_max;             /* appends per transaction; 0 commits each append */
	double batch_delay;        /* seconds an open batch may wait for more appends */
	int batch_open, batch_count;
	double batch_started;
	/* Two append logs, written in turn: a log is overwritten only once the WAL holding
	 * the commits of its records is on disk (its ticket), so a record always has one
	 * durable copy after the first background sync. log_fd[0] carries the lock. */
	int log_fd[2];             /* -1 when another process has the logs */
	off_t log_size[2];         /* where the next record goes in each */
	unsigned long log_ticket[2];
	int log_cur;               /* the log being written */
	int log_dirty;             /* the log holds appends the database lost (rolled back) */
	int detached;              /* closed by db:detach(), opened again at the next use */
	int writing;               /* what ckpt.writing was last set to */
	uint64_t next_lsn;
	unsigned char *rec;        /* record buffer, reused */
	size_t rec_cap;
	double commit_per_row;     /* seconds a delete's commit took per row deleted, averaged */
	int auto_vacuum;           /* the file's mode: 2 (incremental) unless made elsewhere */
} archive_db;

/* ---------------------------------------------------------------- growable text */

typedef struct {
	char *s;
	size_t len, cap;
	int oom;
} strbuf;

static void sb_add(strbuf *sb, const char *text) {
	size_t n = strlen(text);
	if(sb->oom)
		return;
	if(sb->len + n + 1 > sb->cap) {
		size_t cap = sb->cap ? sb->cap * 2 : 256;
		char *s;
		while(cap < sb->len + n + 1)
			cap *= 2;
		s = realloc(sb->s, cap);
		if(!s) {
			sb->oom = 1;
			return;
		}
		sb->s = s;
		sb->cap = cap;
	}
	memcpy(sb->s + sb->len, text, n + 1);
	sb->len += n;
}

/* ---------------------------------------------------------------- statements */

static sqlite3_stmt *stmt_get(archive_db *a, const char *sql) {
	struct stmt_slot *victim = &a->cache[0];
	sqlite3_stmt *stmt;
	int i;
	for(i = 0; i < STMT_CACHE_SIZE; i++) {
		struct stmt_slot *slot = &a->cache[i];
		if(slot->sql && strcmp(slot->sql, sql) == 0) {
			slot->used = ++a->clock;
			sqlite3_reset(slot->stmt);
			sqlite3_clear_bindings(slot->stmt);
			return slot->stmt;
		}
		if(slot->used < victim->used)
			victim = slot;
	}
	if(sqlite3_prepare_v3(a->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, NULL) != SQLITE_OK)
		return NULL;
	if(victim->sql) {
		free(victim->sql);
		sqlite3_finalize(victim->stmt);
	}
	victim->sql = strdup(sql);
	if(!victim->sql) {
		sqlite3_finalize(stmt);
		victim->stmt = NULL;
		victim->used = 0;
		return NULL;
	}
	victim->stmt = stmt;
	victim->used = ++a->clock;
	return stmt;
}

static void stmt_cache_clear(archive_db *a) {
	int i;
	for(i = 0; i < STMT_CACHE_SIZE; i++) {
		if(a->cache[i].sql) {
			sqlite3_finalize(a->cache[i].stmt);
			free(a->cache[i].sql);
		}
		a->cache[i].sql = NULL;
		a->cache[i].stmt = NULL;
		a->cache[i].used = 0;
	}
}

static int exec_sql(archive_db *a, const char *sql) {
	return sqlite3_exec(a->db, sql, NULL, NULL, NULL);
}

/* Tells the checkpoint thread whether this connection is in a write transaction: a
 * restarting checkpoint waits for the write lock while it is (it ends soon), and for
 * nothing else. Set only once BEGIN IMMEDIATE succeeded and cleared only once the
 * transaction ended, so the thread never waits for readers while holding the lock. */
static void set_writing(archive_db *a, int writing) {
	if(a->writing == writing)
		return;
	a->writing = writing;
	if(!a->ckpt.running)
		return;
	pthread_mutex_lock(&a->ckpt.lock);
	a->ckpt.writing = writing;
	pthread_mutex_unlock(&a->ckpt.lock);
}

/* An earlier call may have been interrupted by a Lua error (out of memory while
 * pushing results): never let that leave a transaction or a read open. */
static void recover(archive_db *a) {
	int i;
	for(i = 0; i < STMT_CACHE_SIZE; i++)
		if(a->cache[i].stmt)
			sqlite3_reset(a->cache[i].stmt);
	if(!sqlite3_get_autocommit(a->db))
		exec_sql(a, "ROLLBACK");
	set_writing(a, 0);
}

/* A stable code for the failures a caller may act on (retry, alert). */
static const char *error_code(int code) {
	switch(code & 0xff) {
	case SQLITE_BUSY: return "busy";
	case SQLITE_LOCKED: return "locked";
	case SQLITE_READONLY: return "read-only";
	case SQLITE_FULL: return "disk-full";
	case SQLITE_IOERR: return "io-error";
	case SQLITE_CORRUPT: case SQLITE_NOTADB: return "corrupt";
	case SQLITE_NOMEM: return "out-of-memory";
	case SQLITE_CONSTRAINT: return "constraint";
	default: return "sqlite-error";
	}
}

static void batch_lost(archive_db *a);

/* Any failure rolls the whole transaction back: a batch of appends included, which
 * the append log then brings back before the next operation. */
static int db_error(lua_State *L, archive_db *a) {
	int code = sqlite3_extended_errcode(a->db);
	lua_pushnil(L);
	lua_pushstring(L, sqlite3_errmsg(a->db));
	lua_pushstring(L, error_code(code));
	if(!sqlite3_get_autocommit(a->db))
		exec_sql(a, "ROLLBACK");
	set_writing(a, 0);
	if(a->batch_open)
		batch_lost(a);
	return 3;
}

/* ---------------------------------------------------------------- value codec */

typedef struct {
	unsigned char *p;
	size_t len, cap;
} outbuf;

static void out_reserve(lua_State *L, archive_db *a, size_t more) {
	if(a->buf_len + more > a->buf_cap) {
		size_t cap = a->buf_cap ? a->buf_cap : 1024;
		unsigned char *p;
		while(cap < a->buf_len + more) {
			if(cap > ((size_t)1 << 30))
				luaL_error(L, "value too large to archive");
			cap *= 2;
		}
		p = realloc(a->buf, cap);
		if(!p)
			luaL_error(L, "out of memory encoding value");
		a->buf = p;
		a->buf_cap = cap;
	}
}

static void out_byte(lua_State *L, archive_db *a, unsigned char b) {
	out_reserve(L, a, 1);
	a->buf[a->buf_len++] = b;
}

static void out_varint(lua_State *L, archive_db *a, uint64_t v) {
	out_reserve(L, a, 10);
	do {
		unsigned char b = v & 0x7f;
		v >>= 7;
		a->buf[a->buf_len++] = b | (v ? 0x80 : 0);
	} while(v);
}

static void out_bytes(lua_State *L, archive_db *a, const char *s, size_t n) {
	out_varint(L, a, n);
	out_reserve(L, a, n);
	memcpy(a->buf + a->buf_len, s, n);
	a->buf_len += n;
}

enum {
	V_FALSE = 'F', V_TRUE = 'T', V_INT = 'I', V_FLOAT = 'D', V_STRING = 'S',
	V_TABLE = 'M', V_ELEMENT = 'E'
};

static int is_element(lua_State *L, archive_db *a, int idx) {
	int same;
	if(a->element_mt_ref == LUA_NOREF || !lua_getmetatable(L, idx))
		return 0;
	lua_rawgeti(L, LUA_REGISTRYINDEX, a->element_mt_ref);
	same = lua_rawequal(L, -1, -2);
	lua_pop(L, 2);
	return same;
}

static void encode_value(lua_State *L, archive_db *a, int idx, int depth);

static void encode_string_field(lua_State *L, archive_db *a, int idx, const char *what) {
	size_t n;
	const char *s;
	if(lua_type(L, idx) != LUA_TSTRING)
		luaL_error(L, "cannot archive element: %s is a %s, not a string", what, luaL_typename(L, idx));
	s = lua_tolstring(L, idx, &n);
	out_bytes(L, a, s, n);
}

/* Encodes a string-to-string map (attributes, namespace prefixes). */
static void encode_string_map(lua_State *L, archive_db *a, int idx, const char *what) {
	size_t count = 0, count_at;
	unsigned char tmp[10];
	size_t tmp_len = 0, i;
	uint64_t v;
	idx = lua_absindex(L, idx);
	lua_pushnil(L);
	while(lua_next(L, idx)) {
		count++;
		lua_pop(L, 1);
	}
	v = count;
	do {
		unsigned char b = v & 0x7f;
		v >>= 7;
		tmp[tmp_len++] = b | (v ? 0x80 : 0);
	} while(v);
	out_reserve(L, a, tmp_len);
	count_at = a->buf_len;
	for(i = 0; i < tmp_len; i++)
		a->buf[count_at + i] = tmp[i];
	a->buf_len += tmp_len;
	lua_pushnil(L);
	while(lua_next(L, idx)) {
		encode_string_field(L, a, -2, what);
		encode_string_field(L, a, -1, what);
		lua_pop(L, 1);
	}
}

static void encode_element(lua_State *L, archive_db *a, int idx, int depth) {
	lua_Integer n, i;
	out_byte(L, a, V_ELEMENT);
	lua_getfield(L, idx, "name");
	encode_string_field(L, a, -1, "element name");
	lua_pop(L, 1);

	lua_getfield(L, idx, "attr");
	if(lua_istable(L, -1))
		encode_string_map(L, a, -1, "attribute");
	else if(lua_isnil(L, -1))
		out_varint(L, a, 0);
	else
		luaL_error(L, "cannot archive element: attr is a %s", luaL_typename(L, -1));
	lua_pop(L, 1);

	lua_getfield(L, idx, "namespaces");
	if(lua_istable(L, -1)) {
		out_byte(L, a, 1);
		encode_string_map(L, a, -1, "namespace prefix");
	} else {
		out_byte(L, a, 0);
	}
	lua_pop(L, 1);

	n = (lua_Integer)lua_rawlen(L, idx);
	out_varint(L, a, (uint64_t)n);
	for(i = 1; i <= n; i++) {
		lua_rawgeti(L, idx, i);
		if(lua_type(L, -1) == LUA_TSTRING) {
			size_t len;
			const char *s = lua_tolstring(L, -1, &len);
			out_byte(L, a, V_STRING);
			out_bytes(L, a, s, len);
		} else if(lua_istable(L, -1) && is_element(L, a, -1)) {
			encode_value(L, a, lua_gettop(L), depth + 1);
		} else {
			luaL_error(L, "cannot archive element: child %d is a %s", (int)i, luaL_typename(L, -1));
		}
		lua_pop(L, 1);
	}
}

static void encode_value(lua_State *L, archive_db *a, int idx, int depth) {
	idx = lua_absindex(L, idx);
	if(depth > MAX_DEPTH)
		luaL_error(L, "cannot archive value: nested deeper than %d levels", MAX_DEPTH);
	luaL_checkstack(L, 6, "archive value nesting");
	switch(lua_type(L, idx)) {
	case LUA_TBOOLEAN:
		out_byte(L, a, lua_toboolean(L, idx) ? V_TRUE : V_FALSE);
		break;
	case LUA_TNUMBER:
		if(lua_isinteger(L, idx)) {
			lua_Integer v = lua_tointeger(L, idx);
			uint64_t u = (uint64_t)v;
			out_byte(L, a, V_INT);
			out_varint(L, a, (u << 1) ^ (v < 0 ? ~(uint64_t)0 : 0));
		} else {
			double d = lua_tonumber(L, idx);
			uint64_t bits;
			int i;
			memcpy(&bits, &d, sizeof bits);
			out_byte(L, a, V_FLOAT);
			out_reserve(L, a, 8);
			for(i = 0; i < 8; i++)
				a->buf[a->buf_len++] = (unsigned char)(bits >> (8 * i));
		}
		break;
	case LUA_TSTRING: {
		size_t n;
		const char *s = lua_tolstring(L, idx, &n);
		out_byte(L, a, V_STRING);
		out_bytes(L, a, s, n);
		break;
	}
	case LUA_TTABLE:
		if(is_element(L, a, idx)) {
			encode_element(L, a, idx, depth);
		} else {
			size_t count = 0;
			out_byte(L, a, V_TABLE);
			lua_pushnil(L);
			while(lua_next(L, idx)) {
				count++;
				lua_pop(L, 1);
			}
			out_varint(L, a, count);
			lua_pushnil(L);
			while(lua_next(L, idx)) {
				int kt = lua_type(L, -2);
				if(kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN)
					luaL_error(L, "cannot archive value: table key of type %s", lua_typename(L, kt));
				encode_value(L, a, -2, depth + 1);
				encode_value(L, a, -1, depth + 1);
				lua_pop(L, 1);
			}
		}
		break;
	default:
		luaL_error(L, "cannot archive value of type %s", luaL_typename(L, idx));
	}
}

/* Encodes the value at idx into a->buf (format byte first). */
static void encode(lua_State *L, archive_db *a, int idx) {
	a->buf_len = 0;
	out_byte(L, a, VALUE_FORMAT);
	encode_value(L, a, idx, 0);
}

typedef struct {
	const unsigned char *p, *end;
	int element_mt;   /* absolute stack index of the element metatable, 0 if none */
} inbuf;

static int in_varint(inbuf *in, uint64_t *v) {
	int shift = 0;
	*v = 0;
	while(in->p < in->end && shift < 64) {
		unsigned char b = *in->p++;
		*v |= (uint64_t)(b & 0x7f) << shift;
		if(!(b & 0x80))
			return 1;
		shift += 7;
	}
	return 0;
}

static int in_string(lua_State *L, inbuf *in) {
	uint64_t n;
	if(!in_varint(in, &n) || n > (uint64_t)(in->end - in->p))
		return 0;
	lua_pushlstring(L, (const char *)in->p, (size_t)n);
	in->p += n;
	return 1;
}

static int decode_value(lua_State *L, inbuf *in, int depth);

static int decode_string_map(lua_State *L, inbuf *in) {
	uint64_t count, i;
	if(!in_varint(in, &count) || count > (uint64_t)(in->end - in->p))
		return 0;
	lua_createtable(L, 0, (int)count);
	for(i = 0; i < count; i++) {
		if(!in_string(L, in))
			return 0;
		if(!in_string(L, in))
			return 0;
		lua_rawset(L, -3);
	}
	return 1;
}

static int decode_element(lua_State *L, inbuf *in, int depth) {
	uint64_t nchildren, i;
	int el, tags, ntags = 0;
	lua_createtable(L, 0, 4);
	el = lua_gettop(L);
	if(!in_string(L, in))
		return 0;
	lua_setfield(L, el, "name");
	if(!decode_string_map(L, in))
		return 0;
	lua_setfield(L, el, "attr");
	if(in->p >= in->end)
		return 0;
	if(*in->p++) {
		if(!decode_string_map(L, in))
			return 0;
		lua_setfield(L, el, "namespaces");
	}
	if(!in_varint(in, &nchildren) || nchildren > (uint64_t)(in->end - in->p))
		return 0;
	lua_createtable(L, (int)nchildren, 0);
	tags = lua_gettop(L);
	for(i = 1; i <= nchildren; i++) {
		if(in->p >= in->end)
			return 0;
		if(*in->p == V_STRING) {
			in->p++;
			if(!in_string(L, in))
				return 0;
		} else if(*in->p == V_ELEMENT) {
			if(!decode_value(L, in, depth + 1))
				return 0;
			lua_pushvalue(L, -1);
			lua_rawseti(L, tags, ++ntags);
		} else {
			return 0;
		}
		lua_rawseti(L, el, (lua_Integer)i);
	}
	lua_setfield(L, el, "tags");
	if(in->element_mt) {
		lua_pushvalue(L, in->element_mt);
		lua_setmetatable(L, el);
	}
	return 1;
}

/* Pushes the decoded value; returns 0 (with junk on the stack) on malformed input. */
static int decode_value(lua_State *L, inbuf *in, int depth) {
	unsigned char tag;
	if(depth > MAX_DEPTH || in->p >= in->end || !lua_checkstack(L, 8))
		return 0;
	tag = *in->p++;
	switch(tag) {
	case V_FALSE:
		lua_pushboolean(L, 0);
		return 1;
	case V_TRUE:
		lua_pushboolean(L, 1);
		return 1;
	case V_INT: {
		uint64_t u;
		if(!in_varint(in, &u))
			return 0;
		lua_pushinteger(L, (lua_Integer)((u >> 1) ^ (~(u & 1) + 1)));
		return 1;
	}
	case V_FLOAT: {
		uint64_t bits = 0;
		double d;
		int i;
		if(in->end - in->p < 8)
			return 0;
		for(i = 0; i < 8; i++)
			bits |= (uint64_t)in->p[i] << (8 * i);
		in->p += 8;
		memcpy(&d, &bits, sizeof d);
		lua_pushnumber(L, d);
		return 1;
	}
	case V_STRING:
		return in_string(L, in);
	case V_TABLE: {
		uint64_t count, i;
		if(!in_varint(in, &count) || count > (uint64_t)(in->end - in->p))
			return 0;
		lua_createtable(L, 0, (int)count);
		for(i = 0; i < count; i++) {
			if(!decode_value(L, in, depth + 1))
				return 0;
			if(lua_isnil(L, -1) || (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1))))
				return 0;
			if(!decode_value(L, in, depth + 1))
				return 0;
			lua_rawset(L, -3);
		}
		return 1;
	}
	case V_ELEMENT:
		return decode_element(L, in, depth);
	default:
		return 0;
	}
}

/* Pushes the value encoded in blob; raises on corruption (it never happens with
 * data the engine wrote, so it is not an expected failure). */
static void decode(lua_State *L, const void *blob, int len, int element_mt) {
	int top = lua_gettop(L);
	inbuf in;
	in.p = blob;
	in.end = in.p + (len > 0 ? len : 0);
	in.element_mt = element_mt;
	if(len < 1 || *in.p++ != VALUE_FORMAT || !decode_value(L, &in, 0) || in.p != in.end) {
		lua_settop(L, top);
		luaL_error(L, "archived value is corrupt or of an unknown format");
	}
}

static int push_element_mt(lua_State *L, archive_db *a) {
	if(a->element_mt_ref == LUA_NOREF)
		return 0;
	lua_rawgeti(L, LUA_REGISTRYINDEX, a->element_mt_ref);
	return lua_gettop(L);
}

/* ---------------------------------------------------------------- checkpointer */

/* A second connection that checkpoints the WAL every `interval` seconds: this is the
 * group commit of durability "normal" (appends commit without fsync; the checkpoint
 * fsyncs the WAL) and keeps checkpoint I/O off the caller's thread in both modes. */
/* A passive checkpoint never blocks the writer, but while appends keep coming the WAL
 * is never entirely copied back, so SQLite never rewinds it and it grows without end.
 * Past WAL_RESET_FRAMES a restarting checkpoint makes the writer wait for the short
 * final copy (its busy handler, then the shim's retries), and the WAL starts over from
 * its beginning (journal_size_limit trims the file then). */
/* fsyncs the database file through this connection's handle, holding no lock. */
static void sync_db_file(sqlite3 *db) {
	sqlite3_file *file = NULL;
	if(sqlite3_file_control(db, "main", SQLITE_FCNTL_FILE_POINTER, &file) == SQLITE_OK
			&& file && file->pMethods)
		file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);
}

/* The restart holds the write lock while it copies the frames still left and fsyncs
 * the database file: with nothing prepared, that fsync flushed everything the passive
 * pass had written and blocked the writer for 50-230 ms (measured during a 1,000,000
 * row expiry). So flush first, without a lock: the restart is left the frames that
 * came in meanwhile and a short fsync.
 * A restart also waits, write lock held, until no reader uses the WAL, and a reader
 * may hold its snapshot for minutes (VACUUM INTO, a `sqlite3` shell in a transaction,
 * Litestream): appends failed behind it. So while the passive pass could not copy
 * every frame (a reader needs them) there is no restart -- the WAL grows until that
 * reader is done, and a later pass catches up -- and a restart gives up at once when
 * it finds a reader after all (poll_briefly). */
static void checkpoint(struct checkpointer *c, sqlite3 *db) {
	int frames = 0, copied = 0;
	sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_PASSIVE, &frames, &copied);
	if(frames <= WAL_RESET_FRAMES || copied < frames)
		return;
	sync_db_file(db);
	c->restarting = 1;
	sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_RESTART, NULL, NULL);
	c->restarting = 0;
}

/* The checkpointer's busy handler: a busy writer holds its lock for microseconds at a
 * time, so poll often and briefly (SQLite's default sleeps milliseconds and, against a
 * writer in a tight loop, never finds the lock free). Gives up after about a second.
 * A restart waits only while the engine's own connection is in a write transaction,
 * which ends within the batch delay: what else holds it up is another process's write
 * lock or a reader still on the WAL, waited for with the write lock held (every
 * append would wait too), so it gives up at once. */
static int poll_briefly(void *arg, int tries) {
	struct checkpointer *c = arg;
	struct timespec pause = { 0, 50000 };
	if(tries >= 20000)
		return 0;
	if(c->restarting) {
		int writing;
		pthread_mutex_lock(&c->lock);
		writing = c->writing;
		pthread_mutex_unlock(&c->lock);
		if(!writing)
			return 0;
	}
	nanosleep(&pause, NULL);
	return 1;
}

/* WAL hook of the writer: wakes the checkpointer early when the WAL grew long. */
static int wal_grown(void *arg, sqlite3 *db, const char *name, int frames) {
	struct checkpointer *c = arg;
	(void)db;
	(void)name;
	if(frames > WAL_RESET_FRAMES) {
		pthread_mutex_lock(&c->lock);
		if(!c->wal_full) {
			c->wal_full = 1;
			pthread_cond_signal(&c->wake);
		}
		pthread_mutex_unlock(&c->lock);
	}
	return SQLITE_OK;
}

/* fsyncs the WAL through this connection's handle of it: makes every frame written
 * so far, by any connection, durable. Falls back to a checkpoint, which syncs too. */
static int sync_wal(sqlite3 *db) {
	sqlite3_file *wal = NULL;
	if(sqlite3_file_control(db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal) == SQLITE_OK
			&& wal && wal->pMethods && wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL) == SQLITE_OK)
		return 0;
	return sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_FULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}

static void *checkpointer_main(void *arg) {
	struct checkpointer *c = arg;
	sqlite3 *db = NULL;
	double next_checkpoint;
	if(sqlite3_open_v2(c->path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
		sqlite3_close(db);
		pthread_mutex_lock(&c->lock);
		c->failed = 1;
		pthread_cond_broadcast(&c->synced_cond);
		pthread_mutex_unlock(&c->lock);
		return NULL;
	}
	sqlite3_busy_handler(db, poll_briefly, c);
	/* A connection learns that the file is in WAL mode on its first read; until then
	 * every checkpoint is a silent no-op. */
	sqlite3_exec(db, "SELECT count(*) FROM sqlite_master", NULL, NULL, NULL);
	pthread_mutex_lock(&c->lock);
	next_checkpoint = pn_monotonic() + c->interval;
	while(!c->stop) {
		unsigned long target;
		int due, sync_failed;
		if(!c->wal_full && c->requested == c->synced && !c->interval_changed) {
			struct timespec until;
			double whole, frac = modf(next_checkpoint, &whole);
			until.tv_sec = (time_t)whole;
			until.tv_nsec = (long)(frac * 1e9);
			pthread_cond_timedwait(&c->wake, &c->lock, &until);
		}
		if(c->stop)
			break;
		if(c->interval_changed) {
			c->interval_changed = 0;
			next_checkpoint = pn_monotonic() + c->interval;
		}
		target = c->requested;
		due = c->wal_full || pn_monotonic() >= next_checkpoint;
		c->wal_full = 0;
		pthread_mutex_unlock(&c->lock);
		/* one fsync serves every ticket taken so far: group commit */
		sync_failed = target != c->synced && sync_wal(db) != 0;
		pthread_mutex_lock(&c->lock);
		/* A failed fsync fails its tickets for good: a later one that succeeds says
		 * nothing of pages the kernel may have dropped after the error. Failures in a
		 * row make one range, so a waiter that looks late still sees its own. */
		if(sync_failed) {
			if(c->failed_to != c->synced)
				c->failed_from = c->synced;
			c->failed_to = target;
		}
		/* before the checkpoint: a durable write waits for its fsync, not for that */
		c->synced = target;
		pthread_cond_broadcast(&c->synced_cond);
		if(!due)
			continue;
		pthread_mutex_unlock(&c->lock);
		/* appends still waiting in an open batch: their records in the log are what
		 * a power cut would keep, so they get the same window as the WAL */
		if(c->log_fd[0] >= 0) {
			fdatasync(c->log_fd[0]);
			fdatasync(c->log_fd[1]);
		}
		checkpoint(c, db);
		pthread_mutex_lock(&c->lock);
		next_checkpoint = pn_monotonic() + c->interval;
	}
	pthread_mutex_unlock(&c->lock);
	sqlite3_close(db);
	return NULL;
}

static int checkpointer_start(struct checkpointer *c, const char *path, double interval, const int log_fd[2]) {
	pthread_condattr_t attr;
	c->log_fd[0] = log_fd[0];
	c->log_fd[1] = log_fd[1];
	c->path = strdup(path);
	if(!c->path)
		return -1;
	c->interval = interval;
	c->stop = 0;
	c->wal_full = 0;
	c->failed = 0;
	c->writing = c->restarting = c->interval_changed = 0;
	c->requested = c->synced = c->failed_from = c->failed_to = 0;
	pthread_mutex_init(&c->lock, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&c->wake, &attr);
	pthread_condattr_destroy(&attr);
	pthread_cond_init(&c->synced_cond, NULL);
	if(pthread_create(&c->thread, NULL, checkpointer_main, c) != 0) {
		pthread_cond_destroy(&c->synced_cond);
		pthread_cond_destroy(&c->wake);
		pthread_mutex_destroy(&c->lock);
		free(c->path);
		c->path = NULL;
		return -1;
	}
	c->running = 1;
	return 0;
}

static void checkpointer_stop(struct checkpointer *c) {
	if(!c->running)
		return;
	pthread_mutex_lock(&c->lock);
	c->stop = 1;
	pthread_cond_signal(&c->wake);
	pthread_mutex_unlock(&c->lock);
	pthread_join(c->thread, NULL);
	pthread_cond_destroy(&c->synced_cond);
	pthread_cond_destroy(&c->wake);
	pthread_mutex_destroy(&c->lock);
	free(c->path);
	c->path = NULL;
	c->running = 0;
}

/* ---------------------------------------------------------------- open / close */

/* Fork detection without a getpid() system call per operation: the child handler
 * bumps the generation, and drops random bytes the parent could use too. One
 * getrandom() serves many keys. */
static unsigned long fork_generation;
static unsigned char random_pool[640];
static size_t random_left;

static void forked_child(void) {
	fork_generation++;
	random_left = 0;
}

static const char *open_database(archive_db *a, const char *path, int durable, int busy_ms, int *readonly);
static int batch_commit(archive_db *a);
static int log_open(archive_db *a, const char *path);

/* Opens the database again after db:detach(), in whichever process uses it next (the
 * daemonized child, or the same process). Stays detached on failure, so the next call
 * tries again. */
static void reattach(lua_State *L, archive_db *a) {
	int readonly = 0;
	const char *stage;
	memset(&a->ckpt, 0, sizeof a->ckpt);
	a->writing = 0;
	stage = open_database(a, a->path, a->durable, a->busy_ms, &readonly);
	if(stage || checkpointer_start(&a->ckpt, a->path, a->interval, a->log_fd) != 0) {
		char msg[512];
		snprintf(msg, sizeof msg, "%s: cannot open the archive database again (%s): %s", a->path,
			stage ? stage : "thread", stage && a->db ? sqlite3_errmsg(a->db) : "cannot start the checkpoint thread");
		if(a->db) {
			stmt_cache_clear(a);
			sqlite3_close_v2(a->db);
			a->db = NULL;
		}
		luaL_error(L, "%s", msg);
	}
	sqlite3_wal_hook(a->db, wal_grown, &a->ckpt);
	a->detached = 0;
	a->pid = getpid();
	a->generation = fork_generation;
}

static archive_db *check_db(lua_State *L) {
	archive_db *a = luaL_checkudata(L, 1, ARCHIVE_MT);
	if(!a->db && !a->detached)
		luaL_argerror(L, 1, "archive database is closed");
	/* SQLite connections must not cross a fork: a child sharing the parent's lock and
	 * WAL-index state through them can lose commits to a third process's recovery */
	if(a->db && a->generation != fork_generation)
		luaL_error(L, "%s: the archive database was open when the process forked; "
			"db:detach() must come before a fork", a->path);
	if(!a->db)
		reattach(L, a);
	return a;
}

static void archive_release(lua_State *L, archive_db *a) {
	int i;
	if(a->db && a->pid != getpid()) {
		/* the parent's connection and thread: not ours to close */
		a->db = NULL;
	}
	if(a->db) {
		sqlite3_wal_hook(a->db, NULL, NULL);
		checkpointer_stop(&a->ckpt);
		/* A batch that cannot be committed now stays in the logs for the next open;
		 * once all is committed and the WAL is on disk, the logs are not needed. */
		int clean = a->log_fd[0] >= 0 && !a->log_dirty;
		if(a->batch_open)
			clean = clean && !sqlite3_get_autocommit(a->db) && batch_commit(a) == 0;
		if(clean && sync_wal(a->db) == 0) {
			(void)!ftruncate(a->log_fd[0], 0);
			(void)!ftruncate(a->log_fd[1], 0);
		}
		a->batch_open = 0;
		recover(a);
		exec_sql(a, "PRAGMA optimize");
		stmt_cache_clear(a);
		sqlite3_close_v2(a->db);
		a->db = NULL;
	}
	if(a->element_mt_ref != LUA_NOREF) {
		luaL_unref(L, LUA_REGISTRYINDEX, a->element_mt_ref);
		a->element_mt_ref = LUA_NOREF;
	}
	free(a->buf);
	a->buf = NULL;
	a->buf_len = a->buf_cap = 0;
	free(a->path);
	a->path = NULL;
	free(a->rec);
	a->rec = NULL;
	a->rec_cap = 0;
	for(i = 0; i < 2; i++) {
		if(a->log_fd[i] >= 0)
			close(a->log_fd[i]);
		a->log_fd[i] = -1;
	}
}

static const char *const SCHEMA[] = {
	"CREATE TABLE IF NOT EXISTS owners ("
	" id INTEGER PRIMARY KEY,"
	" host TEXT NOT NULL, store TEXT NOT NULL, user TEXT NOT NULL,"
	" items INTEGER NOT NULL DEFAULT 0,"
	" UNIQUE (host, store, user))",
	/* seq is the rowid: append order. Without AUTOINCREMENT a deleted newest seq may
	 * come back, which is harmless (keys are the ids clients see, and they are never
	 * reused) and saves writing sqlite_sequence on every append. */
	"CREATE TABLE IF NOT EXISTS items ("
	" seq INTEGER PRIMARY KEY,"
	" owner INTEGER NOT NULL,"
	" key TEXT NOT NULL,"
	" \"when\" REAL NOT NULL,"
	" \"with\" TEXT NOT NULL,"
	" value BLOB NOT NULL)",
	/* Index entries end with the rowid, so (owner) orders by (owner, seq) and
	 * (owner, with) by (owner, with, seq): each page is one index range. */
	"CREATE UNIQUE INDEX IF NOT EXISTS items_key ON items (owner, key)",
	"CREATE INDEX IF NOT EXISTS items_owner ON items (owner)",
	"CREATE INDEX IF NOT EXISTS items_with ON items (owner, \"with\")",
	"CREATE INDEX IF NOT EXISTS items_when ON items (owner, \"when\")",
	/* Schema 2: the last append-log record applied, moved in the same transaction as
	 * the appends, so a record is never applied twice. */
	"CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
	"INSERT OR IGNORE INTO meta (name, value) VALUES ('applied_lsn', 0)",
	NULL
};

/* The file's auto_vacuum mode, which PRAGMA auto_vacuum = INCREMENTAL cannot change once
 * it has tables: one copied with `sqlite3 .dump` or VACUUMed elsewhere may be in another. */
static int read_auto_vacuum(archive_db *a) {
	sqlite3_stmt *st = stmt_get(a, "PRAGMA auto_vacuum");
	int rc;
	if(!st)
		return -1;
	rc = sqlite3_step(st);
	a->auto_vacuum = rc == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
	sqlite3_reset(st);
	return rc == SQLITE_ROW ? 0 : -1;
}

static const char *open_database(archive_db *a, const char *path, int durable, int busy_ms, int *readonly) {
	int i, version = -1;
	sqlite3_stmt *st;
	const char *journal;
	if(sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK)
		return "open";
	sqlite3_extended_result_codes(a->db, 1);
	sqlite3_busy_timeout(a->db, busy_ms);
	*readonly = sqlite3_db_readonly(a->db, "main");
	if(*readonly)
		return "read-only";
	/* Reading the schema version is the first read: a file that is not a database
	 * fails here with SQLITE_NOTADB. */
	if(sqlite3_prepare_v2(a->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
		return "read";
	if(sqlite3_step(st) == SQLITE_ROW)
		version = sqlite3_column_int(st, 0);
	if(sqlite3_finalize(st) != SQLITE_OK)
		return "read";
	if(version > SCHEMA_VERSION)
		return "newer-schema";
	/* auto_vacuum only takes effect before the first table exists (and setting it
	 * takes the write lock: not for a current schema, see below) */
	if(version != SCHEMA_VERSION && exec_sql(a, "PRAGMA auto_vacuum = INCREMENTAL") != SQLITE_OK)
		return "configure";
	if(sqlite3_prepare_v2(a->db, "PRAGMA journal_mode = WAL", -1, &st, NULL) != SQLITE_OK)
		return "configure";
	journal = sqlite3_step(st) == SQLITE_ROW ? (const char *)sqlite3_column_text(st, 0) : NULL;
	if(!journal || strcmp(journal, "wal") != 0) {
		sqlite3_finalize(st);
		return "wal";
	}
	sqlite3_finalize(st);
	if(exec_sql(a, durable ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL") != SQLITE_OK
			|| exec_sql(a, "PRAGMA wal_autocheckpoint = 0") != SQLITE_OK
			|| exec_sql(a, "PRAGMA journal_size_limit = 67108864") != SQLITE_OK
			|| exec_sql(a, "PRAGMA secure_delete = FAST") != SQLITE_OK
			|| exec_sql(a, "PRAGMA cache_size = -16384") != SQLITE_OK)
		return "configure";
	/* A current schema needs no write lock, which a running Prosody holds for a whole
	 * batch of appends and another process (a script, the sqlite3 shell) for as long
	 * as it likes: prosodyctl, a second host's open and the open after db:detach()
	 * must not depend on getting it. */
	if(version != SCHEMA_VERSION) {
		if(exec_sql(a, "BEGIN IMMEDIATE") != SQLITE_OK)
			return "schema";
		for(i = 0; SCHEMA[i]; i++) {
			if(exec_sql(a, SCHEMA[i]) != SQLITE_OK)
				return "schema";
		}
		if(exec_sql(a, "PRAGMA user_version = 2") != SQLITE_OK || exec_sql(a, "COMMIT") != SQLITE_OK)
			return "schema";
	}
	/* Keeps the planner's statistics fresh for the with/when choices (cheap at open).
	 * It may write: only if the lock is free now, it is no reason to wait. */
	if(!a->detached) {
		sqlite3_busy_timeout(a->db, 0);
		exec_sql(a, "PRAGMA optimize = 0x10002");
		sqlite3_busy_timeout(a->db, busy_ms);
	}
	return read_auto_vacuum(a) < 0 ? "read" : NULL;
}

/* archive.open(path, options?) -> db | nil, err, code
 * options: durability = "full" | "normal", sync_interval (s), busy_timeout (ms),
 * element_mt (metatable marking element tables), batch (appends per transaction,
 * default 0: each append commits), batch_delay (s, default 0.01). */
static int Larchive_open(lua_State *L) {
	const char *path = luaL_checkstring(L, 1);
	const char *durability = "normal";
	int durable, busy_ms = 5000, readonly = 0, rc;
	lua_Integer batch = 0;
	double interval = 1.0, batch_delay = 0.01;
	const char *stage;
	archive_db *a;

	if(!lua_isnoneornil(L, 2)) {
		luaL_checktype(L, 2, LUA_TTABLE);
		lua_getfield(L, 2, "durability");
		if(!lua_isnil(L, -1))
			durability = luaL_checkstring(L, -1);
		lua_pop(L, 1);
		interval = pn_opt_number_field(L, 2, "sync_interval", interval);
		busy_ms = (int)pn_opt_integer_field(L, 2, "busy_timeout", busy_ms);
		batch = pn_opt_integer_field(L, 2, "batch", batch);
		batch_delay = pn_opt_number_field(L, 2, "batch_delay", batch_delay);
	}
	if(strcmp(durability, "full") == 0)
		durable = 1;
	else if(strcmp(durability, "normal") == 0)
		durable = 0;
	else
		return luaL_error(L, "durability must be \"full\" or \"normal\", not \"%s\"", durability);
	luaL_argcheck(L, interval > 0 && interval <= 3600, 2, "sync_interval must be in (0, 3600] seconds");
	luaL_argcheck(L, busy_ms >= 0, 2, "busy_timeout must not be negative");
	luaL_argcheck(L, batch >= 0 && batch <= 1000000, 2, "batch must be 0 to 1000000 appends");
	luaL_argcheck(L, batch_delay > 0 && batch_delay <= 60, 2, "batch_delay must be in (0, 60] seconds");

	/* Born closed: whatever fails below leaves a consistent object for __gc. */
	a = lua_newuserdatauv(L, sizeof *a, 0);
	memset(a, 0, sizeof *a);
	a->element_mt_ref = LUA_NOREF;
	a->log_fd[0] = a->log_fd[1] = -1;
	/* ours from the start: a failure below must close the connection, not leave it
	 * (and a write lock) behind as if it were a parent's */
	a->pid = getpid();
	a->generation = fork_generation;
	luaL_setmetatable(L, ARCHIVE_MT);

	if(!lua_isnoneornil(L, 2)) {
		lua_getfield(L, 2, "element_mt");
		if(lua_istable(L, -1))
			a->element_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
		else
			lua_pop(L, 1);
	}

	stage = open_database(a, path, durable, busy_ms, &readonly);
	if(stage) {
		char msg[512];
		if(readonly)
			snprintf(msg, sizeof msg, "%s: the database file is read-only", path);
		else if(strcmp(stage, "wal") == 0)
			snprintf(msg, sizeof msg, "%s: cannot switch to WAL mode (is the directory writable?)", path);
		else if(strcmp(stage, "newer-schema") == 0)
			snprintf(msg, sizeof msg, "%s: written by a newer prosody-native (schema > %d)", path, SCHEMA_VERSION);
		else
			snprintf(msg, sizeof msg, "%s: %s", path, a->db ? sqlite3_errmsg(a->db) : "out of memory");
		archive_release(L, a);
		return pn_fail(L, msg, readonly ? "read-only" : stage);
	}
	/* appends a killed process left in its log come back before anything else */
	rc = log_open(a, path);
	if(rc < 0) {
		char msg[512];
		snprintf(msg, sizeof msg, "%s: cannot %s the append log: %s", path, rc == -1 ? "replay" : "read",
			rc == -1 ? sqlite3_errmsg(a->db) : strerror(errno));
		archive_release(L, a);
		return pn_fail(L, msg, "append-log");
	}
	a->batch_max = (int)batch;
	a->batch_delay = batch_delay;
	a->commit_per_row = 5e-6; /* until measured: what a 1,000,000-item archive showed */
	if(checkpointer_start(&a->ckpt, path, interval, a->log_fd) != 0) {
		archive_release(L, a);
		return pn_fail(L, "cannot start the checkpoint thread", "thread");
	}
	sqlite3_wal_hook(a->db, wal_grown, &a->ckpt);
	a->path = strdup(path);
	if(!a->path) {
		archive_release(L, a);
		return luaL_error(L, "out of memory");
	}
	a->pid = getpid();
	a->generation = fork_generation;
	a->durable = durable;
	a->busy_ms = busy_ms;
	a->interval = interval;
	return 1;
}

/* db:close() */
static int Larchive_close(lua_State *L) {
	archive_db *a = luaL_checkudata(L, 1, ARCHIVE_MT);
	archive_release(L, a);
	return 0;
}

static int Larchive_tostring(lua_State *L) {
	archive_db *a = luaL_checkudata(L, 1, ARCHIVE_MT);
	if(a->db)
		lua_pushfstring(L, "archive database (%s)", sqlite3_db_filename(a->db, "main"));
	else
		lua_pushliteral(L, "archive database (closed)");
	return 1;
}

/* ---------------------------------------------------------------- owners */

/* Owner id of (host, store, user) or 0 when it has never been written. */
static int owner_find(archive_db *a, const char *host, const char *store, const char *user, sqlite3_int64 *id, sqlite3_int64 *items) {
	int rc;
	sqlite3_stmt *st = stmt_get(a, "SELECT id, items FROM owners WHERE host = ?1 AND store = ?2 AND user = ?3");
	if(!st)
		return -1;
	sqlite3_bind_text(st, 1, host, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 2, store, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 3, user, -1, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	*id = 0;
	if(items)
		*items = 0;
	if(rc == SQLITE_ROW) {
		*id = sqlite3_column_int64(st, 0);
		if(items)
			*items = sqlite3_column_int64(st, 1);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

static int owner_create(archive_db *a, const char *host, const char *store, const char *user, sqlite3_int64 *id) {
	int rc;
	sqlite3_stmt *st = stmt_get(a, "INSERT INTO owners (host, store, user) VALUES (?1, ?2, ?3)");
	if(!st)
		return -1;
	sqlite3_bind_text(st, 1, host, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 2, store, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 3, user, -1, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	if(rc != SQLITE_DONE)
		return -1;
	*id = sqlite3_last_insert_rowid(a->db);
	return 0;
}

static int owner_adjust(archive_db *a, sqlite3_int64 id, sqlite3_int64 delta) {
	int rc;
	sqlite3_stmt *st;
	if(delta == 0)
		return 0;
	st = stmt_get(a, "UPDATE owners SET items = items + ?2 WHERE id = ?1");
	if(!st)
		return -1;
	sqlite3_bind_int64(st, 1, id);
	sqlite3_bind_int64(st, 2, delta);
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* Seq of an item by key, 0 when absent. */
static int seq_of_key(archive_db *a, sqlite3_int64 owner, const char *key, size_t key_len, sqlite3_int64 *seq) {
	int rc;
	sqlite3_stmt *st = stmt_get(a, "SELECT seq FROM items WHERE owner = ?1 AND key = ?2");
	if(!st)
		return -1;
	sqlite3_bind_int64(st, 1, owner);
	sqlite3_bind_text(st, 2, key, (int)key_len, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	*seq = 0;
	if(rc == SQLITE_ROW) {
		*seq = sqlite3_column_int64(st, 0);
		rc = SQLITE_DONE;
	}
	sqlite3_reset(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* Times come back as integers when they are whole, as callers stored them
 * (os.time()); fractions survive as floats. */
static void push_when(lua_State *L, double when) {
	if(when == floor(when) && fabs(when) < 9.0e15)
		lua_pushinteger(L, (lua_Integer)when);
	else
		lua_pushnumber(L, when);
}

/* ---------------------------------------------------------------- group commit */

/* One append, as the database and the append log both see it. host, store and user
 * are NUL-terminated; key, with and value carry their lengths. */
struct append_rec {
	uint64_t lsn;
	const char *host, *store, *user, *key, *with;
	size_t key_len, with_len;
	double when;
	const unsigned char *value;
	size_t value_len;
	int fresh_key;   /* generated just now: cannot exist yet */
};

/* Writes one append into the open transaction. An item with the same key is
 * replaced and the new one goes to the end; the owner's counter stays exact.
 * Returns 0, 1 for quota-limit (nothing written) or -1 on SQLite error. */
static int apply_append(archive_db *a, const struct append_rec *r, lua_Integer quota) {
	sqlite3_int64 owner, items, old_seq = 0;
	sqlite3_stmt *st;
	int rc;
	if(owner_find(a, r->host, r->store, r->user, &owner, &items) < 0)
		return -1;
	if(!owner && owner_create(a, r->host, r->store, r->user, &owner) < 0)
		return -1;
	if(!r->fresh_key && seq_of_key(a, owner, r->key, r->key_len, &old_seq) < 0)
		return -1;
	/* checked before anything changes, so a refusal needs no rollback (a batch has
	 * other appends in the same transaction) */
	if(quota >= 0 && items - (old_seq ? 1 : 0) >= quota)
		return 1;
	if(old_seq) {
		st = stmt_get(a, "DELETE FROM items WHERE seq = ?1");
		if(!st)
			return -1;
		sqlite3_bind_int64(st, 1, old_seq);
		rc = sqlite3_step(st);
		sqlite3_reset(st);
		if(rc != SQLITE_DONE)
			return -1;
	}
	st = stmt_get(a, "INSERT INTO items (owner, key, \"when\", \"with\", value) VALUES (?1, ?2, ?3, ?4, ?5)");
	if(!st)
		return -1;
	sqlite3_bind_int64(st, 1, owner);
	sqlite3_bind_text(st, 2, r->key, (int)r->key_len, SQLITE_STATIC);
	sqlite3_bind_double(st, 3, r->when);
	sqlite3_bind_text(st, 4, r->with, (int)r->with_len, SQLITE_STATIC);
	sqlite3_bind_blob(st, 5, r->value, (int)r->value_len, SQLITE_STATIC);
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if(rc != SQLITE_DONE)
		return -1;
	return owner_adjust(a, owner, old_seq ? 0 : 1);
}

/* CRC-32 (the zlib polynomial), eight bytes per step: a byte at a time it cost more
 * than the rest of the record's preparation. */
static uint32_t crc_table[8][256];

static void crc_init(void) {
	uint32_t i, j, c;
	for(i = 0; i < 256; i++) {
		c = i;
		for(j = 0; j < 8; j++)
			c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[0][i] = c;
	}
	for(i = 0; i < 256; i++)
		for(j = 1; j < 8; j++)
			crc_table[j][i] = (crc_table[j - 1][i] >> 8) ^ crc_table[0][crc_table[j - 1][i] & 0xff];
}

static uint32_t crc32_of(const unsigned char *p, size_t n) {
	uint32_t c = 0xffffffffu;
	while(n >= 8) {
		uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
		c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff]
			^ crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]]
			^ crc_table[0][p[7]];
		p += 8;
		n -= 8;
	}
	while(n--)
		c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}

/* Append log record: magic, payload length, CRC-32 of the payload; the payload is
 * lsn, when (IEEE bits), the six lengths, then host, store, user, key, with, value.
 * All integers little-endian. */
#define LOG_MAGIC 0x314c4e50u /* "PNL1" */
#define LOG_HEAD 12
#define LOG_FIXED (8 + 8 + 6 * 4)

static void put32(unsigned char *p, uint32_t v) {
	int i;
	for(i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void put64(unsigned char *p, uint64_t v) {
	int i;
	for(i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get32(const unsigned char *p) {
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p) {
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Writes r at the end of the log with one write(2): once it returns, the record
 * survives the process. A failed or short write is cut off again. */
static int log_write(archive_db *a, const struct append_rec *r) {
	size_t lens[6], total, at, i;
	const void *parts[6];
	uint64_t bits;
	unsigned char *p;
	ssize_t done;
	lens[0] = strlen(r->host); parts[0] = r->host;
	lens[1] = strlen(r->store); parts[1] = r->store;
	lens[2] = strlen(r->user); parts[2] = r->user;
	lens[3] = r->key_len; parts[3] = r->key;
	lens[4] = r->with_len; parts[4] = r->with;
	lens[5] = r->value_len; parts[5] = r->value;
	total = LOG_HEAD + LOG_FIXED;
	for(i = 0; i < 6; i++) {
		if(lens[i] > 0x7fffffff)
			return -1;
		total += lens[i];
	}
	if(total > a->rec_cap) {
		size_t cap = a->rec_cap ? a->rec_cap : 4096;
		while(cap < total)
			cap *= 2;
		p = realloc(a->rec, cap);
		if(!p)
			return -1;
		a->rec = p;
		a->rec_cap = cap;
	}
	p = a->rec;
	put64(p + LOG_HEAD, r->lsn);
	memcpy(&bits, &r->when, sizeof bits);
	put64(p + LOG_HEAD + 8, bits);
	at = LOG_HEAD + 16;
	for(i = 0; i < 6; i++, at += 4)
		put32(p + at, (uint32_t)lens[i]);
	for(i = 0; i < 6; i++) {
		if(lens[i])
			memcpy(p + at, parts[i], lens[i]);
		at += lens[i];
	}
	put32(p, LOG_MAGIC);
	put32(p + 4, (uint32_t)(total - LOG_HEAD));
	put32(p + 8, crc32_of(p + LOG_HEAD, total - LOG_HEAD));
	do
		done = pwrite(a->log_fd[a->log_cur], p, total, a->log_size[a->log_cur]);
	while(done < 0 && errno == EINTR);
	if(done != (ssize_t)total) {
		(void)!ftruncate(a->log_fd[a->log_cur], a->log_size[a->log_cur]);
		return -1;
	}
	a->log_size[a->log_cur] += (off_t)total;
	return 0;
}

/* Parses the record at p (n bytes left) into r; returns its length, or 0 for a torn
 * or foreign tail, where reading stops. */
static size_t log_parse(const unsigned char *p, size_t n, struct append_rec *r, char *names) {
	size_t len, lens[6], at, i, sum = 0;
	uint64_t bits;
	if(n < LOG_HEAD + LOG_FIXED || get32(p) != LOG_MAGIC)
		return 0;
	len = get32(p + 4);
	if(len < LOG_FIXED || len > n - LOG_HEAD || crc32_of(p + LOG_HEAD, len) != get32(p + 8))
		return 0;
	p += LOG_HEAD;
	for(i = 0; i < 6; i++) {
		lens[i] = get32(p + 16 + 4 * i);
		if(lens[i] > len)
			return 0; /* and the sum below cannot wrap, whatever size_t is */
		sum += lens[i];
	}
	if(sum != len - LOG_FIXED)
		return 0;
	r->lsn = get64(p);
	bits = get64(p + 8);
	memcpy(&r->when, &bits, sizeof bits);
	at = LOG_FIXED;
	/* owner names go to SQLite as C strings: copied into `names` (room for the
	 * record plus three NULs) */
	r->host = names;
	r->store = names + lens[0] + 1;
	r->user = r->store + lens[1] + 1;
	for(i = 0; i < 3; i++) {
		memcpy(names, p + at, lens[i]);
		names[lens[i]] = '\0';
		names += lens[i] + 1;
		at += lens[i];
	}
	r->key = (const char *)p + at;
	r->key_len = lens[3];
	at += lens[3];
	r->with = (const char *)p + at;
	r->with_len = lens[4];
	at += lens[4];
	r->value = p + at;
	r->value_len = lens[5];
	return LOG_HEAD + len;
}

static int applied_lsn(archive_db *a, uint64_t *lsn) {
	sqlite3_stmt *st = stmt_get(a, "SELECT value FROM meta WHERE name = 'applied_lsn'");
	int rc;
	if(!st)
		return -1;
	rc = sqlite3_step(st);
	*lsn = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
	sqlite3_reset(st);
	return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : -1;
}

static int set_applied_lsn(archive_db *a, uint64_t lsn) {
	sqlite3_stmt *st = stmt_get(a, "UPDATE meta SET value = ?1 WHERE name = 'applied_lsn'");
	int rc;
	if(!st)
		return -1;
	sqlite3_bind_int64(st, 1, (sqlite3_int64)lsn);
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* Reads a whole log into memory; *buf is NULL for an empty one. -1 with errno. */
static int log_read(int fd, unsigned char **buf, size_t *size) {
	struct stat sb;
	size_t got = 0;
	*buf = NULL;
	*size = 0;
	if(fstat(fd, &sb) != 0)
		return -1;
	if(sb.st_size == 0)
		return 0;
	*buf = malloc((size_t)sb.st_size);
	if(!*buf) {
		errno = ENOMEM;
		return -1;
	}
	while(got < (size_t)sb.st_size) {
		ssize_t n = pread(fd, *buf + got, (size_t)sb.st_size - got, (off_t)got);
		if(n < 0 && errno == EINTR)
			continue;
		if(n <= 0)
			break;
		got += (size_t)n;
	}
	*size = got;
	return 0;
}

struct log_entry {
	uint64_t lsn;
	const unsigned char *at;
	size_t left;
};

static int entry_order(const void *x, const void *y) {
	const struct log_entry *a = x, *b = y;
	return a->lsn < b->lsn ? -1 : a->lsn > b->lsn;
}

/* Applies every record of both logs the database does not have yet (lsn above the
 * applied one), in lsn order, in one transaction that also records the last lsn, then
 * empties the logs. Returns 0, -1 on SQLite error or -2 on a failure to read (errno). */
static int log_replay(archive_db *a) {
	unsigned char *buf[2] = { NULL, NULL };
	size_t size[2] = { 0, 0 }, n = 0, cap = 0, i, k, longest = 0;
	struct log_entry *list = NULL;
	char *names = NULL;
	uint64_t applied, last;
	int failed = 0, rc = -1;
	/* until this succeeds, nothing may empty the logs (a close, say) */
	a->log_dirty = 1;
	if(exec_sql(a, "BEGIN IMMEDIATE") != SQLITE_OK)
		return -1;
	if(applied_lsn(a, &applied) < 0)
		goto out;
	rc = -2;
	for(k = 0; k < 2; k++) {
		size_t at = 0;
		if(log_read(a->log_fd[k], &buf[k], &size[k]) < 0)
			goto out;
		while(at < size[k]) {
			struct append_rec r = { 0 };
			size_t len;
			if(!names || size[k] + 3 > longest) {
				char *grown = realloc(names, size[k] + 3);
				if(!grown)
					goto nomem;
				names = grown;
				longest = size[k] + 3;
			}
			len = log_parse(buf[k] + at, size[k] - at, &r, names);
			if(!len)
				break; /* a torn or foreign tail */
			if(r.lsn > applied) {
				if(n == cap) {
					struct log_entry *grown = realloc(list, (cap ? cap * 2 : 256) * sizeof *list);
					if(!grown)
						goto nomem;
					list = grown;
					cap = cap ? cap * 2 : 256;
				}
				list[n].lsn = r.lsn;
				list[n].at = buf[k] + at;
				list[n].left = size[k] - at;
				n++;
			}
			at += len;
		}
	}
	if(n > 1)
		qsort(list, n, sizeof *list, entry_order);
	last = applied;
	for(i = 0; i < n && !failed; i++) {
		struct append_rec r = { 0 };
		if(i > 0 && list[i].lsn == list[i - 1].lsn)
			continue; /* the same record in both logs cannot happen; never apply twice */
		log_parse(list[i].at, list[i].left, &r, names);
		if(apply_append(a, &r, -1) < 0)
			failed = 1;
		last = r.lsn;
	}
	rc = -1;
	if(failed || set_applied_lsn(a, last) < 0 || exec_sql(a, "COMMIT") != SQLITE_OK)
		goto out;
	if(last >= a->next_lsn)
		a->next_lsn = last + 1;
	/* the replayed appends must be on disk before the logs that held them are emptied */
	if(sync_wal(a->db) != 0) {
		rc = 0; /* applied: kept in the logs until a later replay or rotation */
		goto done;
	}
	a->log_dirty = 0;
	a->log_cur = 0;
	a->log_size[0] = a->log_size[1] = 0;
	a->log_ticket[0] = a->log_ticket[1] = 0;
	rc = ftruncate(a->log_fd[0], 0) != 0 || ftruncate(a->log_fd[1], 0) != 0 ? -2 : 0;
	goto done;
nomem:
	errno = ENOMEM;
out:
	/* after an SQLite error the caller reports it, then rolls back */
	if(rc == -2 && !sqlite3_get_autocommit(a->db))
		exec_sql(a, "ROLLBACK");
done:
	free(buf[0]);
	free(buf[1]);
	free(list);
	free(names);
	return rc;
}

/* Opens and locks the append logs next to the database. Another process that holds
 * them (Prosody, while prosodyctl runs) leaves this one committing each append. */
static int log_open(archive_db *a, const char *path) {
	char name[4096];
	uint64_t applied;
	int k;
	for(k = 0; k < 2; k++) {
		if(snprintf(name, sizeof name, k ? "%s-appendlog2" : "%s-appendlog", path) >= (int)sizeof name)
			return -2;
		a->log_fd[k] = open(name, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
		if(a->log_fd[k] < 0)
			return -2;
		if(k == 0 && flock(a->log_fd[0], LOCK_EX | LOCK_NB) != 0) {
			int busy = errno == EWOULDBLOCK;
			close(a->log_fd[0]);
			a->log_fd[0] = -1;
			return busy ? 0 : -2;
		}
		/* ours now: until a replay succeeds, nothing (a close after a failure
		 * below, say) may empty it */
		a->log_dirty = 1;
	}
	if(applied_lsn(a, &applied) < 0)
		return -1;
	a->next_lsn = applied + 1;
	/* empty after a clean shutdown: nothing to replay, so no need for the write lock */
	for(k = 0; k < 2; k++) {
		struct stat sb;
		if(fstat(a->log_fd[k], &sb) != 0)
			return -2;
		if(sb.st_size > 0)
			return log_replay(a);
	}
	a->log_dirty = 0;
	return 0;
}

static int batching(const archive_db *a) {
	return a->batch_max > 0 && a->log_fd[0] >= 0;
}

static unsigned long sync_request(struct checkpointer *c);
/* ticket_state(): 1 synced, 0 not yet, or one of these */
enum { TICKET_NO_THREAD = -1, TICKET_FSYNC_FAILED = -2 };
static int ticket_state(archive_db *a, lua_Integer ticket, int wait);

/* Past this, the next commit moves on to the other log. */
#define LOG_SWITCH_BYTES (1 << 20)

/* After a commit: once the current log is long, asks the sync thread to fsync the WAL
 * (which now holds all of that log's records) and writes the other log from its start
 * -- provided the fsync asked for when that one was left is done. If it is not (the
 * sync thread is held up, say by a long checkpoint), this log grows meanwhile: the
 * main loop never waits for it. */
static void log_rotate(archive_db *a) {
	int next = 1 - a->log_cur, state;
	if(a->log_size[a->log_cur] < LOG_SWITCH_BYTES || !a->ckpt.running)
		return;
	state = ticket_state(a, (lua_Integer)a->log_ticket[next], 0);
	if(state == TICKET_FSYNC_FAILED) {
		/* its records may not be on disk but in the log: asks again, meanwhile this
		 * log grows */
		a->log_ticket[next] = sync_request(&a->ckpt);
		return;
	}
	if(state != 1)
		return;
	a->log_ticket[a->log_cur] = sync_request(&a->ckpt);
	a->log_size[next] = 0;
	a->log_cur = next;
}

/* Commits the open batch; its records stay in the log until it is rotated. */
static int batch_commit(archive_db *a) {
	if(a->batch_count > 0 && set_applied_lsn(a, a->next_lsn - 1) < 0)
		return -1;
	if(exec_sql(a, "COMMIT") != SQLITE_OK)
		return -1;
	set_writing(a, 0);
	a->batch_open = 0;
	a->batch_count = 0;
	log_rotate(a);
	return 0;
}

/* The open batch was rolled back: what it held is in the log only. */
static void batch_lost(archive_db *a) {
	set_writing(a, 0);
	a->batch_open = 0;
	a->batch_count = 0;
	if(a->log_fd[0] >= 0 && a->log_size[a->log_cur] > 0)
		a->log_dirty = 1;
}

static int batch_due(const archive_db *a) {
	return a->batch_count >= a->batch_max || pn_monotonic() - a->batch_started >= a->batch_delay;
}

enum { GATE_READ, GATE_APPEND, GATE_ALONE };

/* Entry of every operation: leaves no statement or stray transaction from an
 * interrupted call, brings back appends a rollback took away, and commits the open
 * batch first when the operation must not run inside it (GATE_ALONE) or the batch is
 * full or old enough (GATE_APPEND). Returns 0, or the count of error values pushed. */
static int gate(lua_State *L, archive_db *a, int mode) {
	int rc;
	if(a->batch_open && sqlite3_get_autocommit(a->db))
		batch_lost(a); /* SQLite rolled it back on an error */
	if(a->writing && sqlite3_get_autocommit(a->db))
		set_writing(a, 0);
	if(!a->batch_open)
		recover(a);
	else {
		int i;
		for(i = 0; i < STMT_CACHE_SIZE; i++)
			if(a->cache[i].stmt)
				sqlite3_reset(a->cache[i].stmt);
	}
	if(a->batch_open && (mode == GATE_ALONE || (mode == GATE_APPEND && batch_due(a)))
			&& batch_commit(a) < 0)
		return db_error(L, a);
	if(a->log_dirty) {
		rc = log_replay(a);
		if(rc == -1)
			return db_error(L, a);
		if(rc == -2)
			return pn_fail(L, strerror(errno), "io-error");
	}
	return 0;
}

/* db:detach() -> true | nil, err, code
 * Commits, stops the checkpoint thread and closes the connection, keeping the append
 * logs (and their lock) and everything needed to open again at the next use. Before a
 * fork (prosody -D): SQLite holds per-process lock and WAL-index state for each open
 * file, which a child's new connection would share; nor may a thread be inside SQLite
 * when the process forks. */
static int Larchive_detach(lua_State *L) {
	archive_db *a = luaL_checkudata(L, 1, ARCHIVE_MT);
	int rc;
	if(a->detached) {
		lua_pushboolean(L, 1);
		return 1;
	}
	a = check_db(L);
	rc = gate(L, a, GATE_ALONE);
	if(rc)
		return rc;
	sqlite3_wal_hook(a->db, NULL, NULL);
	checkpointer_stop(&a->ckpt);
	if(sync_wal(a->db) == 0) {
		/* every commit is on disk: both logs may be written from their start again */
		a->log_ticket[0] = a->log_ticket[1] = 0;
		if(a->log_fd[0] >= 0 && !a->log_dirty) {
			a->log_cur = 0;
			a->log_size[0] = a->log_size[1] = 0;
			if(ftruncate(a->log_fd[0], 0) != 0 || ftruncate(a->log_fd[1], 0) != 0)
				a->log_dirty = 1; /* replayed (harmlessly, lsn-checked) at the next use */
		}
	}
	stmt_cache_clear(a);
	sqlite3_close_v2(a->db);
	a->db = NULL;
	a->detached = 1;
	lua_pushboolean(L, 1);
	return 1;
}

/* ---------------------------------------------------------------- queries */

struct query {
	const char *key, *with, *before, *after;
	size_t key_len, with_len, before_len, after_len;
	int has_start, has_end, has_limit, has_truncate, has_cursor, reverse, total;
	double start, end;
	lua_Integer limit, truncate, cursor;
	int ids;         /* stack index of the ids array, 0 if none */
	int n_ids;
	/* resolved while running */
	sqlite3_int64 after_seq, before_seq;
	char error[96];  /* why read_query refused the query */
};

/* Query fields come from clients, through mod_mam (RSM <max/>), mod_muc_mam (<history
 * maxstanzas/>) and the like: a bad one is an expected failure, never a Lua error. */
static int query_error(struct query *q, const char *field, const char *problem) {
	snprintf(q->error, sizeof q->error, "query field '%s' %s", field, problem);
	return -1;
}

static int opt_string_field(lua_State *L, int t, const char *field, struct query *q, const char **s, size_t *len) {
	*s = NULL;
	*len = 0;
	if(lua_getfield(L, t, field) != LUA_TNIL) {
		if(lua_type(L, -1) != LUA_TSTRING) {
			snprintf(q->error, sizeof q->error, "query field '%s' must be a string, not a %s", field,
				luaL_typename(L, -1));
			lua_pop(L, 1);
			return -1;
		}
		*s = lua_tolstring(L, -1, len);
	}
	/* The string stays reachable from the query table for the whole call. */
	lua_pop(L, 1);
	return 0;
}

/* 1 when present, 0 when absent, -1 when not a number. */
static int opt_number(lua_State *L, int t, const char *field, struct query *q, double *out) {
	int isnum;
	if(lua_getfield(L, t, field) == LUA_TNIL) {
		lua_pop(L, 1);
		return 0;
	}
	*out = lua_tonumberx(L, -1, &isnum);
	lua_pop(L, 1);
	if(!isnum || isnan(*out))
		return query_error(q, field, "must be a number");
	return 1;
}

static int opt_integer(lua_State *L, int t, const char *field, struct query *q, lua_Integer *out) {
	double d;
	int rc = opt_number(L, t, field, q, &d);
	if(rc <= 0)
		return rc;
	if(d != floor(d) || d < 0 || d > 9.0e15)
		return query_error(q, field, "must be a non-negative integer");
	*out = (lua_Integer)d;
	return 1;
}

/* Reads the query table at idx (or none) into q; -1 with q->error for a malformed
 * field. A limit is a maximum, so a fractional one means the integer below it (RSM
 * <max>2.5</max>: at most 2 items); a negative one is refused rather than read as "no
 * limit", which would send a whole room archive as MUC history. */
static int read_query(lua_State *L, int idx, struct query *q) {
	double limit;
	memset(q, 0, sizeof *q);
	if(lua_isnoneornil(L, idx))
		return 0;
	luaL_checktype(L, idx, LUA_TTABLE);
	if(opt_string_field(L, idx, "key", q, &q->key, &q->key_len) < 0
			|| opt_string_field(L, idx, "with", q, &q->with, &q->with_len) < 0
			|| opt_string_field(L, idx, "before", q, &q->before, &q->before_len) < 0
			|| opt_string_field(L, idx, "after", q, &q->after, &q->after_len) < 0
			|| (q->has_start = opt_number(L, idx, "start", q, &q->start)) < 0
			|| (q->has_end = opt_number(L, idx, "end", q, &q->end)) < 0
			|| (q->has_limit = opt_number(L, idx, "limit", q, &limit)) < 0
			|| (q->has_truncate = opt_integer(L, idx, "truncate", q, &q->truncate)) < 0
			|| (q->has_cursor = opt_integer(L, idx, "cursor", q, &q->cursor)) < 0)
		return -1;
	if(q->has_limit) {
		if(limit < 0)
			return query_error(q, "limit", "must not be negative");
		q->limit = limit > 9.0e15 ? (lua_Integer)9.0e15 : (lua_Integer)floor(limit);
	}
	lua_getfield(L, idx, "reverse");
	q->reverse = lua_toboolean(L, -1);
	lua_getfield(L, idx, "total");
	q->total = lua_toboolean(L, -1);
	lua_pop(L, 2);
	if(lua_getfield(L, idx, "ids") != LUA_TNIL) {
		lua_Integer i, n;
		if(!lua_istable(L, -1))
			return query_error(q, "ids", "must be an array of strings");
		n = (lua_Integer)lua_rawlen(L, -1);
		if(n > MAX_IDS) {
			snprintf(q->error, sizeof q->error, "query field 'ids' has more than %d ids", MAX_IDS);
			return -1;
		}
		for(i = 1; i <= n; i++) {
			int type = lua_rawgeti(L, -1, i);
			lua_pop(L, 1);
			if(type != LUA_TSTRING)
				return query_error(q, "ids", "must hold strings");
		}
		/* Left on the stack for binding. */
		q->ids = lua_gettop(L);
		q->n_ids = (int)n;
	} else {
		lua_pop(L, 1);
	}
	return 0;
}

/* A WHERE clause and its bound values, built once and used for SELECT, COUNT and
 * DELETE alike so the three can never disagree. */
enum { B_INT, B_REAL, B_TEXT, B_ID };
struct bind {
	int kind;
	sqlite3_int64 i;
	double d;
	const char *s;
	size_t len;
};
struct where {
	strbuf sql;
	struct bind *binds;
	int n;
};

static void where_add(struct where *w, const char *clause, struct bind b) {
	sb_add(&w->sql, " AND ");
	sb_add(&w->sql, clause);
	w->binds[w->n++] = b;
}

static void where_free(struct where *w) {
	free(w->sql.s);
	free(w->binds);
	memset(w, 0, sizeof *w);
}

/* owner = ? plus every filter of q; seq bounds only when `ranges` is set. */
static int where_build(struct where *w, const struct query *q, sqlite3_int64 owner, int ranges) {
	struct bind b;
	int i;
	memset(w, 0, sizeof *w);
	w->binds = malloc(sizeof(struct bind) * (size_t)(q->n_ids + 10));
	if(!w->binds)
		return -1;
	memset(&b, 0, sizeof b);
	b.kind = B_INT;
	b.i = owner;
	sb_add(&w->sql, "owner = ?");
	w->binds[w->n++] = b;
	if(q->key) {
		b.kind = B_TEXT; b.s = q->key; b.len = q->key_len;
		where_add(w, "key = ?", b);
	}
	if(q->with) {
		b.kind = B_TEXT; b.s = q->with; b.len = q->with_len;
		where_add(w, "\"with\" = ?", b);
	}
	if(q->has_start) {
		b.kind = B_REAL; b.d = q->start;
		where_add(w, "\"when\" >= ?", b);
	}
	if(q->has_end) {
		b.kind = B_REAL; b.d = q->end;
		where_add(w, "\"when\" <= ?", b);
	}
	if(ranges && q->after_seq) {
		b.kind = B_INT; b.i = q->after_seq;
		where_add(w, "seq > ?", b);
	}
	if(ranges && q->before_seq) {
		b.kind = B_INT; b.i = q->before_seq;
		where_add(w, "seq < ?", b);
	}
	if(q->ids) {
		sb_add(&w->sql, " AND key IN (");
		for(i = 0; i < q->n_ids; i++) {
			sb_add(&w->sql, i ? ",?" : "?");
			b.kind = B_ID; b.i = i + 1;
			w->binds[w->n++] = b;
		}
		sb_add(&w->sql, ")");
	}
	return w->sql.oom ? -1 : 0;
}

/* Binds w's values from index `first` on; ids come straight from the query's array. */
static void where_bind(lua_State *L, const struct query *q, const struct where *w, sqlite3_stmt *st, int first) {
	int i;
	for(i = 0; i < w->n; i++) {
		const struct bind *b = &w->binds[i];
		int at = first + i;
		switch(b->kind) {
		case B_INT:
			sqlite3_bind_int64(st, at, b->i);
			break;
		case B_REAL:
			sqlite3_bind_double(st, at, b->d);
			break;
		case B_TEXT:
			sqlite3_bind_text(st, at, b->s, (int)b->len, SQLITE_TRANSIENT);
			break;
		case B_ID: {
			size_t len;
			const char *s;
			lua_rawgeti(L, q->ids, b->i);
			s = lua_tolstring(L, -1, &len);
			sqlite3_bind_text(st, at, s, (int)len, SQLITE_TRANSIENT);
			lua_pop(L, 1);
			break;
		}
		}
	}
}

/* Prepares `head || where || tail` and binds it; NULL on SQLite error. The head's
 * SOURCE names the table to search: a few ids are found through their keys, which
 * SQLite without statistics would rather do by walking the whole archive. */
static sqlite3_stmt *prepare_where(lua_State *L, archive_db *a, const struct query *q, const struct where *w,
		const char *head, const char *tail) {
	strbuf sql = { NULL, 0, 0, 0 };
	sqlite3_stmt *st;
	const char *source = strstr(head, "SOURCE");
	if(source) {
		char before[128];
		size_t n = (size_t)(source - head);
		if(n >= sizeof before)
			return NULL;
		memcpy(before, head, n);
		before[n] = '\0';
		sb_add(&sql, before);
		sb_add(&sql, q->ids ? "items INDEXED BY items_key" : "items");
		head = source + strlen("SOURCE");
	}
	sb_add(&sql, head);
	sb_add(&sql, w->sql.s);
	sb_add(&sql, tail);
	if(sql.oom) {
		free(sql.s);
		return NULL;
	}
	st = stmt_get(a, sql.s);
	free(sql.s);
	if(st)
		where_bind(L, q, w, st, 1);
	return st;
}

/* Resolves before/after keys to sequence numbers; -1 when one is unknown. */
static int resolve_range(archive_db *a, sqlite3_int64 owner, struct query *q) {
	if(q->after) {
		if(seq_of_key(a, owner, q->after, q->after_len, &q->after_seq) < 0)
			return -2;
		if(!q->after_seq)
			return -1;
	}
	if(q->before) {
		if(seq_of_key(a, owner, q->before, q->before_len, &q->before_seq) < 0)
			return -2;
		if(!q->before_seq)
			return -1;
	}
	return 0;
}

/* Only the owner's counter answers a total that filters nothing. */
static int query_is_unfiltered(const struct query *q) {
	return !q->key && !q->with && !q->has_start && !q->has_end && !q->ids;
}

static int count_matching(lua_State *L, archive_db *a, const struct query *q, sqlite3_int64 owner, sqlite3_int64 *count) {
	struct where w;
	sqlite3_stmt *st;
	int rc;
	if(where_build(&w, q, owner, 0) < 0) {
		where_free(&w);
		return -1;
	}
	st = prepare_where(L, a, q, &w, "SELECT COUNT(*) FROM SOURCE WHERE ", "");
	where_free(&w);
	if(!st)
		return -1;
	rc = sqlite3_step(st);
	*count = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
	sqlite3_reset(st);
	return rc == SQLITE_ROW ? 0 : -1;
}

static void end_read(archive_db *a, int own) {
	if(own && !sqlite3_get_autocommit(a->db))
		exec_sql(a, "COMMIT");
}

/* db:find(host, store, user, query?) -> rows, n, total?, last_seq | nil, err, code
 * rows holds n items as 4 consecutive slots: key, value, when, with. A query field
 * `cursor` (a seq returned earlier) continues past the last item of a page. */
static int Larchive_find(lua_State *L) {
	archive_db *a = check_db(L);
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	const char *user = luaL_checkstring(L, 4);
	struct query q;
	struct where w;
	sqlite3_int64 owner, items, total = -1, last_seq = 0;
	sqlite3_stmt *st;
	int rows, n = 0, mt, rc, range, own;
	char tail[64];

	if(read_query(L, 5, &q) < 0)
		return pn_fail(L, q.error, "bad-request");
	if((rc = gate(L, a, GATE_READ)))
		return rc;
	/* inside an open batch the reads already share one snapshot */
	own = !a->batch_open;
	if(own && exec_sql(a, "BEGIN") != SQLITE_OK)
		return db_error(L, a);
	if(owner_find(a, host, store, user, &owner, &items) < 0)
		return db_error(L, a);
	if(!owner) {
		end_read(a, own);
		if(q.before || q.after)
			return pn_fail(L, "item-not-found", "item-not-found");
		lua_newtable(L);
		lua_pushinteger(L, 0);
		if(q.total)
			lua_pushinteger(L, 0);
		else
			lua_pushnil(L);
		lua_pushinteger(L, 0);
		return 4;
	}
	range = resolve_range(a, owner, &q);
	if(range == -2)
		return db_error(L, a);
	if(range == -1) {
		end_read(a, own);
		return pn_fail(L, "item-not-found", "item-not-found");
	}
	if(q.total) {
		if(query_is_unfiltered(&q))
			total = items;
		else if(count_matching(L, a, &q, owner, &total) < 0)
			return db_error(L, a);
	}
	if(q.has_cursor) {
		if(q.reverse && (!q.before_seq || q.cursor < q.before_seq))
			q.before_seq = q.cursor;
		else if(!q.reverse && q.cursor > q.after_seq)
			q.after_seq = q.cursor;
	}

	lua_newtable(L);
	rows = lua_gettop(L);
	if(q.has_limit && q.limit == 0)
		goto done;
	if(where_build(&w, &q, owner, 1) < 0) {
		where_free(&w);
		end_read(a, own);
		return luaL_error(L, "out of memory");
	}
	if(q.has_limit)
		snprintf(tail, sizeof tail, " ORDER BY seq %s LIMIT %lld", q.reverse ? "DESC" : "ASC", (long long)q.limit);
	else
		snprintf(tail, sizeof tail, " ORDER BY seq %s", q.reverse ? "DESC" : "ASC");
	st = prepare_where(L, a, &q, &w, "SELECT seq, key, value, \"when\", \"with\" FROM SOURCE WHERE ", tail);
	where_free(&w);
	if(!st)
		return db_error(L, a);
	mt = push_element_mt(L, a);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		last_seq = sqlite3_column_int64(st, 0);
		lua_pushlstring(L, (const char *)sqlite3_column_text(st, 1), (size_t)sqlite3_column_bytes(st, 1));
		lua_rawseti(L, rows, 4 * n + 1);
		decode(L, sqlite3_column_blob(st, 2), sqlite3_column_bytes(st, 2), mt);
		lua_rawseti(L, rows, 4 * n + 2);
		push_when(L, sqlite3_column_double(st, 3));
		lua_rawseti(L, rows, 4 * n + 3);
		lua_pushlstring(L, (const char *)sqlite3_column_text(st, 4), (size_t)sqlite3_column_bytes(st, 4));
		lua_rawseti(L, rows, 4 * n + 4);
		n++;
	}
	sqlite3_reset(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	if(mt)
		lua_pop(L, 1);
done:
	end_read(a, own);
	lua_pushinteger(L, n);
	if(total >= 0)
		lua_pushinteger(L, total);
	else
		lua_pushnil(L);
	lua_pushinteger(L, last_seq);
	return 4;
}

/* ---------------------------------------------------------------- writes */

static void generate_key(char out[37]) {
	unsigned char b[16];
	uint64_t ms = (uint64_t)(pn_realtime() * 1000.0);
	int i;
	static const char hex[] = "0123456789abcdef";
	if(random_left < 10) {
		/* The kernel CSPRNG does not fail on Linux >= 3.17 once seeded; there is no
		 * safe fallback for unpredictable ids, so stop rather than weaken them. */
		if(pn_random_bytes(random_pool, sizeof random_pool) != 0)
			abort();
		random_left = sizeof random_pool;
	}
	random_left -= 10;
	memcpy(b + 6, random_pool + random_left, 10);
	/* used bytes do not stay in memory */
	memset(random_pool + random_left, 0, 10);
	/* UUIDv7: 48-bit milliseconds, version 7, variant 10, 74 random bits. */
	for(i = 0; i < 6; i++)
		b[i] = (unsigned char)(ms >> (8 * (5 - i)));
	b[6] = (unsigned char)((b[6] & 0x0f) | 0x70);
	b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
	for(i = 0; i < 16; i++) {
		static const int dash_after[] = { 3, 5, 7, 9 };
		int j;
		*out++ = hex[b[i] >> 4];
		*out++ = hex[b[i] & 15];
		for(j = 0; j < 4; j++)
			if(i == dash_after[j])
				*out++ = '-';
	}
	*out = '\0';
}

/* db:append(host, store, user, key?, value, when, with, quota?, commit?) -> key, opened | nil, err, code
 * An existing key is replaced and its item moves to the end. At `quota` items the
 * append fails with "quota-limit". With batching on, `opened` is true when this append
 * began a new batch (someone should call db:flush() within the batch delay); with
 * `commit` true the append is committed before it returns, outside any batch (the open
 * batch is committed first), for a caller that waits for it to be on disk. */
static int Larchive_append(lua_State *L) {
	archive_db *a = check_db(L);
	size_t key_len = 0, with_len;
	const char *key = luaL_optlstring(L, 5, NULL, &key_len);
	lua_Integer quota = luaL_optinteger(L, 9, -1);
	int commit = lua_toboolean(L, 10);
	char generated[37];
	struct append_rec r;
	int rc, opened = 0;

	r.host = luaL_checkstring(L, 2);
	r.store = luaL_checkstring(L, 3);
	r.user = luaL_checkstring(L, 4);
	r.when = luaL_checknumber(L, 7);
	r.with = luaL_checklstring(L, 8, &with_len);
	r.with_len = with_len;
	luaL_checkany(L, 6);
	encode(L, a, 6);
	r.fresh_key = !key;
	if(!key) {
		generate_key(generated);
		key = generated;
		key_len = 36;
	}
	r.key = key;
	r.key_len = key_len;
	r.value = a->buf;
	r.value_len = a->buf_len;
	if((rc = gate(L, a, commit ? GATE_ALONE : GATE_APPEND)))
		return rc;
	if(!a->batch_open) {
		if(exec_sql(a, "BEGIN IMMEDIATE") != SQLITE_OK)
			return db_error(L, a);
		set_writing(a, 1);
		if(batching(a) && !commit) {
			a->batch_open = opened = 1;
			a->batch_count = 0;
			a->batch_started = pn_monotonic();
		}
	}
	rc = apply_append(a, &r, quota);
	if(rc < 0)
		return db_error(L, a);
	if(rc > 0) {
		/* nothing written: a transaction holding no append is not kept open */
		if(!a->batch_open || a->batch_count == 0) {
			exec_sql(a, "ROLLBACK");
			set_writing(a, 0);
			a->batch_open = 0;
		}
		return pn_fail(L, "quota-limit", "quota-limit");
	}
	if(a->batch_open) {
		r.lsn = a->next_lsn;
		if(log_write(a, &r) == 0) {
			a->next_lsn++;
			a->batch_count++;
		} else if(batch_commit(a) < 0) {
			/* neither in the log nor committed: this append fails, the batch's
			 * earlier appends come back from the log */
			return db_error(L, a);
		}
	} else if(exec_sql(a, "COMMIT") != SQLITE_OK) {
		return db_error(L, a);
	} else {
		set_writing(a, 0);
	}
	lua_pushlstring(L, key, key_len);
	lua_pushboolean(L, opened);
	return 2;
}

/* db:flush(age?) -> seconds_left, committed | nil, err, code
 * Commits the open batch of appends if it is at least `age` seconds old (default 0);
 * returns 0 when no batch is left open, else the seconds until it is that old, and
 * whether this call committed one. */
static int Larchive_flush(lua_State *L) {
	archive_db *a = check_db(L);
	double age = luaL_optnumber(L, 2, 0);
	double left;
	int rc, committed = 0;
	if((rc = gate(L, a, GATE_READ)))
		return rc;
	if(a->batch_open) {
		left = a->batch_started + age - pn_monotonic();
		if(left > 0) {
			lua_pushnumber(L, left);
			lua_pushboolean(L, 0);
			return 2;
		}
		if(batch_commit(a) < 0)
			return db_error(L, a);
		committed = 1;
	}
	lua_pushinteger(L, 0);
	lua_pushboolean(L, committed);
	return 2;
}

/* db:get(host, store, user, key) -> value, when, with | nil, "item-not-found" */
static int Larchive_get(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	const char *user = luaL_checkstring(L, 4);
	size_t key_len;
	const char *key = luaL_checklstring(L, 5, &key_len);
	sqlite3_int64 owner;
	sqlite3_stmt *st;
	int rc, mt;

	if((g = gate(L, a, GATE_READ)))
		return g;
	if(owner_find(a, host, store, user, &owner, NULL) < 0)
		return db_error(L, a);
	if(!owner)
		return pn_fail(L, "item-not-found", "item-not-found");
	st = stmt_get(a, "SELECT value, \"when\", \"with\" FROM items WHERE owner = ?1 AND key = ?2");
	if(!st)
		return db_error(L, a);
	sqlite3_bind_int64(st, 1, owner);
	sqlite3_bind_text(st, 2, key, (int)key_len, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	if(rc != SQLITE_ROW) {
		sqlite3_reset(st);
		if(rc == SQLITE_DONE)
			return pn_fail(L, "item-not-found", "item-not-found");
		return db_error(L, a);
	}
	mt = push_element_mt(L, a);
	decode(L, sqlite3_column_blob(st, 0), sqlite3_column_bytes(st, 0), mt);
	push_when(L, sqlite3_column_double(st, 1));
	lua_pushlstring(L, (const char *)sqlite3_column_text(st, 2), (size_t)sqlite3_column_bytes(st, 2));
	sqlite3_reset(st);
	return 3;
}

/* db:set(host, store, user, key, value, when?, with?) -> true | false (unknown key)
 * Replaces an item's value in place; its position in the archive stays. */
static int Larchive_set(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	const char *user = luaL_checkstring(L, 4);
	size_t key_len, with_len = 0;
	const char *key = luaL_checklstring(L, 5, &key_len);
	int has_when = !lua_isnoneornil(L, 7);
	double when = has_when ? luaL_checknumber(L, 7) : 0;
	const char *with = luaL_optlstring(L, 8, NULL, &with_len);
	sqlite3_int64 owner;
	sqlite3_stmt *st;
	int rc;

	luaL_checkany(L, 6);
	encode(L, a, 6);
	if((g = gate(L, a, GATE_ALONE)))
		return g;
	if(owner_find(a, host, store, user, &owner, NULL) < 0)
		return db_error(L, a);
	if(!owner) {
		lua_pushboolean(L, 0);
		return 1;
	}
	st = stmt_get(a, "UPDATE items SET value = ?3, \"when\" = coalesce(?4, \"when\"), \"with\" = coalesce(?5, \"with\")"
		" WHERE owner = ?1 AND key = ?2");
	if(!st)
		return db_error(L, a);
	sqlite3_bind_int64(st, 1, owner);
	sqlite3_bind_text(st, 2, key, (int)key_len, SQLITE_TRANSIENT);
	sqlite3_bind_blob(st, 3, a->buf, (int)a->buf_len, SQLITE_STATIC);
	if(has_when)
		sqlite3_bind_double(st, 4, when);
	if(with)
		sqlite3_bind_text(st, 5, with, (int)with_len, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	lua_pushboolean(L, sqlite3_changes(a->db) > 0);
	return 1;
}

/* Deletes up to `batch` rows of one owner matching q (seq bounds included);
 * returns the number deleted, or -1. */
static int delete_batch(lua_State *L, archive_db *a, const struct query *q, sqlite3_int64 owner, int batch) {
	struct where w;
	sqlite3_stmt *st;
	char tail[48];
	int rc, changed;
	if(where_build(&w, q, owner, 1) < 0) {
		where_free(&w);
		return -1;
	}
	snprintf(tail, sizeof tail, " LIMIT %d)", batch);
	st = prepare_where(L, a, q, &w, "DELETE FROM items WHERE seq IN (SELECT seq FROM SOURCE WHERE ", tail);
	where_free(&w);
	if(!st)
		return -1;
	rc = sqlite3_step(st);
	sqlite3_reset(st);
	if(rc != SQLITE_DONE)
		return -1;
	changed = sqlite3_changes(a->db);
	if(owner_adjust(a, owner, -changed) < 0)
		return -1;
	return changed;
}

/* For truncate: turns "keep the N newest (oldest if reverse) matching" into a seq
 * bound. Returns 1 when nothing is to be deleted, 0 when q now selects the rest. */
static int truncate_bound(lua_State *L, archive_db *a, struct query *q, sqlite3_int64 owner, int *err) {
	struct where w;
	sqlite3_stmt *st;
	char tail[80];
	int rc;
	sqlite3_int64 seq;
	*err = 0;
	if(q->truncate == 0)
		return 0;
	if(where_build(&w, q, owner, 1) < 0) {
		where_free(&w);
		*err = 1;
		return 1;
	}
	snprintf(tail, sizeof tail, " ORDER BY seq %s LIMIT 1 OFFSET %lld", q->reverse ? "ASC" : "DESC", (long long)(q->truncate - 1));
	st = prepare_where(L, a, q, &w, "SELECT seq FROM SOURCE WHERE ", tail);
	where_free(&w);
	if(!st) {
		*err = 1;
		return 1;
	}
	rc = sqlite3_step(st);
	seq = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
	sqlite3_reset(st);
	if(rc != SQLITE_ROW) {
		*err = rc != SQLITE_DONE;
		return 1;
	}
	if(q->reverse)
		q->after_seq = seq > q->after_seq ? seq : q->after_seq;
	else
		q->before_seq = (!q->before_seq || seq < q->before_seq) ? seq : q->before_seq;
	return 0;
}

/* Deletes matching items of one owner until done or out of time. Returns -1 on
 * SQLite error, else whether rows may remain.
 * A slice's commit writes every page its batches dirtied, so each batch is sized for
 * the time left from what a row costs to delete (the slowest batch of this slice) plus
 * what it costs to commit (learned from earlier slices). Sizing from the last batch
 * alone, ignoring the commit, overshot a 5 ms slice to 17-21 ms at 1,000,000 items:
 * 12 ms of batches (a batch of up to 2048 rows on pages not yet read) and up to 10 ms
 * of commit. A batch also at most doubles the last one. */
static int delete_owner(lua_State *L, archive_db *a, struct query q, sqlite3_int64 owner,
		double deadline, lua_Integer *deleted, int *unknown_id) {
	int batch = 32, got, err;
	double started, now, fits, per_row, slowest = 0;
	int range = resolve_range(a, owner, &q);
	if(range == -2)
		return -1;
	if(range == -1) {
		*unknown_id = 1;
		return 0;
	}
	if(q.has_truncate) {
		if(truncate_bound(L, a, &q, owner, &err))
			return err ? -1 : 0;
	}
	for(;;) {
		started = pn_monotonic();
		got = delete_batch(L, a, &q, owner, batch);
		if(got < 0)
			return -1;
		*deleted += got;
		if(got < batch)
			return 0;
		now = pn_monotonic();
		if(now >= deadline)
			return 1;
		/* the COMMIT writes every page the batches dirtied, those of the rows already
		 * deleted in this slice included: leave it its share of what is left */
		per_row = (now - started) / got;
		if(per_row > slowest)
			slowest = per_row;
		fits = (deadline - now - (double)*deleted * a->commit_per_row) / (slowest + a->commit_per_row + 1e-9);
		if(fits < 8)
			return 1;
		if(fits > 2.0 * batch)
			fits = 2.0 * batch;
		batch = fits > 2048 ? 2048 : (int)fits;
	}
}

/* Owners of a wildcard delete are listed this many at a time. */
#define OWNER_CHUNK 256

/* Pushes the ids and the users (two arrays) of up to OWNER_CHUNK owners of (host,
 * store) holding items, in user order, after the user at stack index `from` (from the
 * first when it is nil). Returns how many, or -1. */
static int owners_after(lua_State *L, archive_db *a, const char *host, const char *store, int from) {
	sqlite3_stmt *st;
	int n = 0, rc;
	st = stmt_get(a, lua_isnil(L, from)
		? "SELECT id, user FROM owners WHERE host = ?1 AND store = ?2 AND items > 0 ORDER BY user LIMIT ?3"
		: "SELECT id, user FROM owners WHERE host = ?1 AND store = ?2 AND user > ?4 AND items > 0"
		  " ORDER BY user LIMIT ?3");
	if(!st)
		return -1;
	sqlite3_bind_text(st, 1, host, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 2, store, -1, SQLITE_TRANSIENT);
	sqlite3_bind_int(st, 3, OWNER_CHUNK);
	if(!lua_isnil(L, from)) {
		size_t len;
		const char *user = lua_tolstring(L, from, &len);
		sqlite3_bind_text(st, 4, user, (int)len, SQLITE_TRANSIENT);
	}
	lua_createtable(L, OWNER_CHUNK, 0);
	lua_createtable(L, OWNER_CHUNK, 0);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		n++;
		lua_pushinteger(L, sqlite3_column_int64(st, 0));
		lua_rawseti(L, -3, n);
		lua_pushlstring(L, (const char *)sqlite3_column_text(st, 1), (size_t)sqlite3_column_bytes(st, 1));
		lua_rawseti(L, -2, n);
	}
	sqlite3_reset(st);
	return rc == SQLITE_DONE ? n : -1;
}

/* db:delete(host, store, user | true, query?, budget?, from?) -> deleted, more, resume | nil, err, code
 * user == true deletes from every owner of (host, store). Works for at most `budget`
 * seconds (default: no limit) in one transaction; `more` says whether to call again.
 * For user == true, `resume` says where this call stopped: the next call takes it as
 * `from` and goes on from there. */
static int Larchive_delete(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	int wildcard = lua_isboolean(L, 4) && lua_toboolean(L, 4);
	const char *user = wildcard ? NULL : luaL_checkstring(L, 4);
	double budget = luaL_optnumber(L, 6, -1);
	double deadline = budget < 0 ? HUGE_VAL : pn_monotonic() + budget;
	struct query q;
	lua_Integer deleted = 0;
	int more = 0, unknown_id = 0, resume = 0;
	sqlite3_int64 owner;
	double started;

	luaL_argexpected(L, lua_isnoneornil(L, 7) || lua_type(L, 7) == LUA_TSTRING, 7, "string or nil");
	/* what read_query leaves on the stack goes above every argument */
	lua_settop(L, 7);
	if(read_query(L, 5, &q) < 0)
		return pn_fail(L, q.error, "bad-request");
	if((g = gate(L, a, GATE_ALONE)))
		return g;
	if(exec_sql(a, "BEGIN IMMEDIATE") != SQLITE_OK)
		return db_error(L, a);
	set_writing(a, 1);
	if(!wildcard) {
		if(owner_find(a, host, store, user, &owner, NULL) < 0)
			return db_error(L, a);
		if(owner) {
			more = delete_owner(L, a, q, owner, deadline, &deleted, &unknown_id);
			if(more < 0)
				return db_error(L, a);
		} else if(q.before || q.after) {
			unknown_id = 1;
		}
	} else {
		/* Owners are taken in user order from where the last call stopped. Started from
		 * the first owner every time, each slice probed again every owner already done
		 * (its newer items kept): with a few thousand of them that took the whole slice,
		 * and deleting never ended. Listed a chunk at a time, so no read stays open while
		 * deleting. `resume` is the last owner done: one cut short by the deadline is
		 * taken again by the next call, which finds its rows deleted so far gone. */
		lua_pushvalue(L, 7);
		resume = lua_gettop(L);
		for(;;) {
			int n = owners_after(L, a, host, store, resume), i, users = lua_gettop(L);
			if(n < 0)
				return db_error(L, a);
			for(i = 1; i <= n; i++) {
				int unknown_here = 0;
				lua_rawgeti(L, users - 1, i);
				owner = lua_tointeger(L, -1);
				lua_pop(L, 1);
				more = delete_owner(L, a, q, owner, deadline, &deleted, &unknown_here);
				if(more < 0)
					return db_error(L, a);
				if(more)
					break;
				lua_rawgeti(L, users, i);
				lua_replace(L, resume);
				if(pn_monotonic() >= deadline) {
					more = i < n || n == OWNER_CHUNK;
					break;
				}
			}
			lua_settop(L, resume);
			if(more || n < OWNER_CHUNK)
				break;
		}
	}
	started = pn_monotonic();
	if(exec_sql(a, "COMMIT") != SQLITE_OK)
		return db_error(L, a);
	set_writing(a, 0);
	if(deleted >= 32) {
		double per_row = (pn_monotonic() - started) / (double)deleted;
		a->commit_per_row = 0.7 * a->commit_per_row + 0.3 * per_row;
	}
	if(unknown_id)
		return pn_fail(L, "item-not-found", "item-not-found");
	lua_pushinteger(L, deleted);
	lua_pushboolean(L, more);
	if(resume && more)
		lua_pushvalue(L, resume);
	else
		lua_pushnil(L);
	return 3;
}

/* ---------------------------------------------------------------- listings */

/* db:summary(host, store, user, query?) -> counts, earliest, latest | nil, err, code */
static int Larchive_summary(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	const char *user = luaL_checkstring(L, 4);
	struct query q;
	struct where w;
	sqlite3_int64 owner;
	sqlite3_stmt *st;
	int rc, range;

	if(read_query(L, 5, &q) < 0)
		return pn_fail(L, q.error, "bad-request");
	if((g = gate(L, a, GATE_READ)))
		return g;
	lua_newtable(L);
	lua_newtable(L);
	lua_newtable(L);
	if(owner_find(a, host, store, user, &owner, NULL) < 0)
		return db_error(L, a);
	if(!owner)
		return 3;
	range = resolve_range(a, owner, &q);
	if(range == -2)
		return db_error(L, a);
	if(range == -1)
		return pn_fail(L, "item-not-found", "item-not-found");
	if(where_build(&w, &q, owner, 1) < 0) {
		where_free(&w);
		return luaL_error(L, "out of memory");
	}
	st = prepare_where(L, a, &q, &w, "SELECT \"with\", COUNT(*), MIN(\"when\"), MAX(\"when\") FROM SOURCE WHERE ",
		" GROUP BY \"with\"");
	where_free(&w);
	if(!st)
		return db_error(L, a);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *with = (const char *)sqlite3_column_text(st, 0);
		lua_pushinteger(L, sqlite3_column_int64(st, 1));
		lua_setfield(L, -4, with);
		push_when(L, sqlite3_column_double(st, 2));
		lua_setfield(L, -3, with);
		push_when(L, sqlite3_column_double(st, 3));
		lua_setfield(L, -2, with);
	}
	sqlite3_reset(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	return 3;
}

/* Pushes an array of the first column of every row; the statement is bound. */
static int push_column_list(lua_State *L, archive_db *a, sqlite3_stmt *st) {
	int rc, n = 0;
	lua_newtable(L);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		lua_pushlstring(L, (const char *)sqlite3_column_text(st, 0), (size_t)sqlite3_column_bytes(st, 0));
		lua_rawseti(L, -2, ++n);
	}
	sqlite3_reset(st);
	if(rc != SQLITE_DONE) {
		lua_pop(L, 1);
		return db_error(L, a);
	}
	return 1;
}

/* db:users(host, store) -> { user, ... } (owners holding at least one item) */
static int Larchive_users(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	sqlite3_stmt *st;
	if((g = gate(L, a, GATE_READ)))
		return g;
	st = stmt_get(a, "SELECT user FROM owners WHERE host = ?1 AND store = ?2 AND items > 0 ORDER BY user");
	if(!st)
		return db_error(L, a);
	sqlite3_bind_text(st, 1, host, -1, SQLITE_TRANSIENT);
	sqlite3_bind_text(st, 2, store, -1, SQLITE_TRANSIENT);
	return push_column_list(L, a, st);
}

/* db:stores(host, user?) -> { store, ... } (stores with items, for that user if given) */
static int Larchive_stores(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *user = luaL_optstring(L, 3, NULL);
	sqlite3_stmt *st;
	if((g = gate(L, a, GATE_READ)))
		return g;
	st = stmt_get(a, user
		? "SELECT DISTINCT store FROM owners WHERE host = ?1 AND user = ?2 AND items > 0 ORDER BY store"
		: "SELECT DISTINCT store FROM owners WHERE host = ?1 AND items > 0 ORDER BY store");
	if(!st)
		return db_error(L, a);
	sqlite3_bind_text(st, 1, host, -1, SQLITE_TRANSIENT);
	if(user)
		sqlite3_bind_text(st, 2, user, -1, SQLITE_TRANSIENT);
	return push_column_list(L, a, st);
}

/* db:dates(host, store, user) -> { "YYYY-MM-DD", ... } (UTC days with items, ascending)
 * One index seek per day with items, never a scan of the archive. */
static int Larchive_dates(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *host = luaL_checkstring(L, 2);
	const char *store = luaL_checkstring(L, 3);
	const char *user = luaL_checkstring(L, 4);
	sqlite3_int64 owner;
	sqlite3_stmt *st;
	double from = -HUGE_VAL;
	int n = 0, rc;

	if((g = gate(L, a, GATE_READ)))
		return g;
	if(owner_find(a, host, store, user, &owner, NULL) < 0)
		return db_error(L, a);
	lua_newtable(L);
	if(!owner)
		return 1;
	st = stmt_get(a, "SELECT \"when\" FROM items WHERE owner = ?1 AND \"when\" >= ?2 ORDER BY \"when\" LIMIT 1");
	if(!st)
		return db_error(L, a);
	for(;;) {
		double when, day;
		time_t t;
		struct tm tm;
		char date[16];
		sqlite3_bind_int64(st, 1, owner);
		sqlite3_bind_double(st, 2, from);
		rc = sqlite3_step(st);
		if(rc != SQLITE_ROW)
			break;
		when = sqlite3_column_double(st, 0);
		sqlite3_reset(st);
		day = floor(when / 86400.0) * 86400.0;
		t = (time_t)day;
		if(!gmtime_r(&t, &tm))
			break;
		strftime(date, sizeof date, "%Y-%m-%d", &tm);
		lua_pushstring(L, date);
		lua_rawseti(L, -2, ++n);
		from = day + 86400.0;
	}
	sqlite3_reset(st);
	if(rc != SQLITE_ROW && rc != SQLITE_DONE)
		return db_error(L, a);
	return 1;
}

/* ---------------------------------------------------------------- maintenance */

static int free_pages(archive_db *a, sqlite3_int64 *left) {
	sqlite3_stmt *st = stmt_get(a, "PRAGMA freelist_count");
	int rc;
	if(!st)
		return -1;
	rc = sqlite3_step(st);
	*left = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
	sqlite3_reset(st);
	return rc == SQLITE_ROW ? 0 : -1;
}

/* db:vacuum_step(budget?) -> free pages left, pages returned | nil, err, code
 * Returns free pages to the file system (incremental vacuum) for about `budget`
 * seconds (default 0.01), a few pages per transaction; stops early when a step returns
 * none. Fails with code "not-incremental" when the file is not in incremental
 * auto-vacuum mode: there a step returns nothing, ever, and "free pages left" never
 * falls, so a caller looping until it is 0 would loop for good. */
static int Larchive_vacuum_step(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	double budget = luaL_optnumber(L, 2, 0.01);
	double deadline = pn_monotonic() + budget;
	sqlite3_int64 left = 0, first, before;
	if(a->auto_vacuum != 2) {
		char msg[128];
		snprintf(msg, sizeof msg, "the database is not in incremental auto-vacuum mode (auto_vacuum = %d)",
			a->auto_vacuum);
		return pn_fail(L, msg, "not-incremental");
	}
	if((g = gate(L, a, GATE_ALONE)))
		return g;
	if(free_pages(a, &left) < 0)
		return db_error(L, a);
	first = left;
	while(left > 0) {
		before = left;
		if(exec_sql(a, "PRAGMA incremental_vacuum(16)") != SQLITE_OK)
			return db_error(L, a);
		if(free_pages(a, &left) < 0)
			return db_error(L, a);
		if(left >= before || pn_monotonic() >= deadline)
			break;
	}
	lua_pushinteger(L, left);
	lua_pushinteger(L, first - left);
	return 2;
}

/* db:backup(path) -> true | nil, err, code
 * A consistent copy of the whole database, taken while others keep writing. */
static int Larchive_backup(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	const char *path = luaL_checkstring(L, 2);
	sqlite3_stmt *st;
	int rc;
	if((g = gate(L, a, GATE_ALONE)))
		return g;
	if(sqlite3_prepare_v2(a->db, "VACUUM INTO ?1", -1, &st, NULL) != SQLITE_OK)
		return db_error(L, a);
	sqlite3_bind_text(st, 1, path, -1, SQLITE_TRANSIENT);
	rc = sqlite3_step(st);
	sqlite3_finalize(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	lua_pushboolean(L, 1);
	return 1;
}

/* db:check() -> true | false, { problem, ... }
 * SQLite's integrity check plus the per-owner counters against real counts. */
static int Larchive_check(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	sqlite3_stmt *st;
	int rc, n = 0;
	if((g = gate(L, a, GATE_ALONE)))
		return g;
	lua_newtable(L);
	if(sqlite3_prepare_v2(a->db, "PRAGMA integrity_check", -1, &st, NULL) != SQLITE_OK)
		return db_error(L, a);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *line = (const char *)sqlite3_column_text(st, 0);
		if(strcmp(line, "ok") != 0) {
			lua_pushstring(L, line);
			lua_rawseti(L, -2, ++n);
		}
	}
	sqlite3_finalize(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	if(sqlite3_prepare_v2(a->db, "SELECT o.host, o.store, o.user, o.items, (SELECT COUNT(*) FROM items i WHERE i.owner = o.id)"
			" FROM owners o WHERE o.items != (SELECT COUNT(*) FROM items i WHERE i.owner = o.id)", -1, &st, NULL) != SQLITE_OK)
		return db_error(L, a);
	while((rc = sqlite3_step(st)) == SQLITE_ROW) {
		lua_pushfstring(L, "counter of %s/%s/%s says %d items, it has %d",
			(const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1),
			(const char *)sqlite3_column_text(st, 2), sqlite3_column_int(st, 3), sqlite3_column_int(st, 4));
		lua_rawseti(L, -2, ++n);
	}
	sqlite3_finalize(st);
	if(rc != SQLITE_DONE)
		return db_error(L, a);
	lua_pushboolean(L, n == 0);
	lua_insert(L, -2);
	return 2;
}

/* db:stats() -> { items, owners, pages, free_pages, page_size, wal_bytes, path, auto_vacuum,
 * batching, pending } */
static int Larchive_stats(lua_State *L) {
	archive_db *a = check_db(L);
	int g;
	static const struct { const char *name, *sql; } probes[] = {
		{ "items", "SELECT coalesce(sum(items), 0) FROM owners" },
		{ "owners", "SELECT count(*) FROM owners WHERE items > 0" },
		{ "pages", "PRAGMA page_count" },
		{ "free_pages", "PRAGMA freelist_count" },
		{ "page_size", "PRAGMA page_size" },
	};
	size_t i;
	const char *file;
	if((g = gate(L, a, GATE_READ)))
		return g;
	lua_newtable(L);
	for(i = 0; i < sizeof probes / sizeof probes[0]; i++) {
		sqlite3_stmt *st = stmt_get(a, probes[i].sql);
		if(!st)
			return db_error(L, a);
		if(sqlite3_step(st) == SQLITE_ROW) {
			lua_pushinteger(L, sqlite3_column_int64(st, 0));
			lua_setfield(L, -2, probes[i].name);
		}
		sqlite3_reset(st);
	}
	file = sqlite3_db_filename(a->db, "main");
	if(file && *file) {
		char wal[4096];
		FILE *f;
		snprintf(wal, sizeof wal, "%s-wal", file);
		f = fopen(wal, "rb");
		if(f) {
			if(fseek(f, 0, SEEK_END) == 0) {
				lua_pushinteger(L, ftell(f));
				lua_setfield(L, -2, "wal_bytes");
			}
			fclose(f);
		}
		lua_pushstring(L, file);
		lua_setfield(L, -2, "path");
	}
	lua_pushstring(L, a->auto_vacuum == 2 ? "incremental" : a->auto_vacuum == 1 ? "full" : "none");
	lua_setfield(L, -2, "auto_vacuum");
	lua_pushboolean(L, batching(a));
	lua_setfield(L, -2, "batching");
	lua_pushinteger(L, a->batch_count);
	lua_setfield(L, -2, "pending");
	return 1;
}

/* db:sync_ticket() -> ticket
 * Asks for everything committed so far to be made durable (one fsync, shared by every
 * ticket taken meanwhile); check with db:synced(ticket) or db:wait_synced(ticket). */
static unsigned long sync_request(struct checkpointer *c) {
	unsigned long ticket;
	pthread_mutex_lock(&c->lock);
	ticket = ++c->requested;
	pthread_cond_signal(&c->wake);
	pthread_mutex_unlock(&c->lock);
	return ticket;
}

static int Larchive_sync_ticket(lua_State *L) {
	archive_db *a = check_db(L);
	lua_pushinteger(L, (lua_Integer)sync_request(&a->ckpt));
	return 1;
}

static int ticket_state(archive_db *a, lua_Integer ticket, int wait) {
	struct checkpointer *c = &a->ckpt;
	int state;
	pthread_mutex_lock(&c->lock);
	while(wait && !c->failed && c->synced < (unsigned long)ticket)
		pthread_cond_wait(&c->synced_cond, &c->lock);
	if(c->failed)
		state = TICKET_NO_THREAD;
	else if(c->synced < (unsigned long)ticket)
		state = 0;
	else if((unsigned long)ticket > c->failed_from && (unsigned long)ticket <= c->failed_to)
		state = TICKET_FSYNC_FAILED;
	else
		state = 1;
	pthread_mutex_unlock(&c->lock);
	return state;
}

static int ticket_failed(lua_State *L, int state) {
	if(state == TICKET_NO_THREAD)
		return pn_fail(L, "the sync thread could not open the database", "sync-failed");
	return pn_fail(L, "the archive database could not be synced to disk (fsync failed)", "io-error");
}

/* db:synced(ticket) -> boolean | nil, err, code */
static int Larchive_synced(lua_State *L) {
	archive_db *a = check_db(L);
	int state = ticket_state(a, luaL_checkinteger(L, 2), 0);
	if(state < 0)
		return ticket_failed(L, state);
	lua_pushboolean(L, state);
	return 1;
}

/* db:wait_synced(ticket) -> true | nil, err, code  (blocks the calling thread) */
static int Larchive_wait_synced(lua_State *L) {
	archive_db *a = check_db(L);
	int state = ticket_state(a, luaL_checkinteger(L, 2), 1);
	if(state < 0)
		return ticket_failed(L, state);
	lua_pushboolean(L, 1);
	return 1;
}

/* db:configure{ batch?, batch_delay?, sync_interval? } -> true | nil, err, code
 * Changes what archive.open() was given, for a connection that stays open while the
 * configuration changes. A batch that may no longer be open is committed. */
static int Larchive_configure(lua_State *L) {
	archive_db *a = check_db(L);
	lua_Integer batch;
	double batch_delay, interval;
	int rc;
	luaL_checktype(L, 2, LUA_TTABLE);
	batch = pn_opt_integer_field(L, 2, "batch", a->batch_max);
	batch_delay = pn_opt_number_field(L, 2, "batch_delay", a->batch_delay);
	interval = pn_opt_number_field(L, 2, "sync_interval", a->interval);
	luaL_argcheck(L, interval > 0 && interval <= 3600, 2, "sync_interval must be in (0, 3600] seconds");
	luaL_argcheck(L, batch >= 0 && batch <= 1000000, 2, "batch must be 0 to 1000000 appends");
	luaL_argcheck(L, batch_delay > 0 && batch_delay <= 60, 2, "batch_delay must be in (0, 60] seconds");
	if(a->batch_open && (batch == 0 || a->batch_count >= batch)) {
		if((rc = gate(L, a, GATE_ALONE)))
			return rc;
	}
	a->batch_max = (int)batch;
	a->batch_delay = batch_delay;
	if(interval != a->interval) {
		a->interval = interval;
		if(a->ckpt.running) {
			pthread_mutex_lock(&a->ckpt.lock);
			a->ckpt.interval = interval;
			a->ckpt.interval_changed = 1;
			pthread_cond_signal(&a->ckpt.wake);
			pthread_mutex_unlock(&a->ckpt.lock);
		}
	}
	lua_pushboolean(L, 1);
	return 1;
}

/* db:busy_timeout(ms) -- how long a write waits for another process's lock */
static int Larchive_busy_timeout(lua_State *L) {
	archive_db *a = check_db(L);
	lua_Integer ms = luaL_checkinteger(L, 2);
	luaL_argcheck(L, ms >= 0 && ms <= 3600000, 2, "must be 0 to 3600000 ms");
	sqlite3_busy_timeout(a->db, (int)ms);
	a->busy_ms = (int)ms;
	return 0;
}

/* archive._encode(value, element_mt?) -> string; archive._decode(string, element_mt?) -> value
 * The value codec alone, for tests and the fuzzer. */
static int Larchive_encode(lua_State *L) {
	/* A closed database object owns the scratch buffer, so its __gc frees it even
	 * when encoding raises. */
	archive_db *tmp;
	luaL_checkany(L, 1);
	tmp = lua_newuserdatauv(L, sizeof *tmp, 0);
	memset(tmp, 0, sizeof *tmp);
	tmp->element_mt_ref = LUA_NOREF;
	tmp->log_fd[0] = tmp->log_fd[1] = -1;
	luaL_setmetatable(L, ARCHIVE_MT);
	if(lua_istable(L, 2)) {
		lua_pushvalue(L, 2);
		tmp->element_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
	}
	encode(L, tmp, 1);
	lua_pushlstring(L, (const char *)tmp->buf, tmp->buf_len);
	archive_release(L, tmp);
	return 1;
}

static int Larchive_decode(lua_State *L) {
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	int mt = lua_istable(L, 2) ? 2 : 0;
	luaL_argcheck(L, len < 0x7fffffff, 1, "too long");
	decode(L, s, (int)len, mt);
	return 1;
}

/* archive.sqlite_version() -> string */
static int Larchive_sqlite_version(lua_State *L) {
	lua_pushstring(L, sqlite3_libversion());
	return 1;
}

static const luaL_Reg archive_meta[] = {
	{ "__gc", Larchive_close },
	{ "__close", Larchive_close },
	{ "__tostring", Larchive_tostring },
	{ NULL, NULL }
};

static const luaL_Reg archive_methods[] = {
	{ "close", Larchive_close },
	{ "detach", Larchive_detach },
	{ "append", Larchive_append },
	{ "flush", Larchive_flush },
	{ "find", Larchive_find },
	{ "get", Larchive_get },
	{ "set", Larchive_set },
	{ "delete", Larchive_delete },
	{ "summary", Larchive_summary },
	{ "users", Larchive_users },
	{ "stores", Larchive_stores },
	{ "dates", Larchive_dates },
	{ "vacuum_step", Larchive_vacuum_step },
	{ "backup", Larchive_backup },
	{ "check", Larchive_check },
	{ "stats", Larchive_stats },
	{ "busy_timeout", Larchive_busy_timeout },
	{ "configure", Larchive_configure },
	{ "sync_ticket", Larchive_sync_ticket },
	{ "synced", Larchive_synced },
	{ "wait_synced", Larchive_wait_synced },
	{ NULL, NULL }
};

static const luaL_Reg archive_functions[] = {
	{ "open", Larchive_open },
	{ "sqlite_version", Larchive_sqlite_version },
	{ "_encode", Larchive_encode },
	{ "_decode", Larchive_decode },
	{ NULL, NULL }
};

int luaopen_prosody_native_archive(lua_State *L);
int luaopen_prosody_native_archive(lua_State *L) {
	luaL_checkversion(L);
	crc_init();
	{
		/* glibc drops the handler when this library is unloaded (__cxa_finalize) */
		static int atfork_done;
		if(!atfork_done) {
			if(pthread_atfork(NULL, NULL, forked_child) != 0)
				return luaL_error(L, "cannot register the fork handler");
			atfork_done = 1;
		}
	}
	pn_new_class(L, ARCHIVE_MT, archive_meta, archive_methods);
	luaL_newlib(L, archive_functions);
	lua_pushinteger(L, PN_ABI);
	lua_setfield(L, -2, "_ABI");
	return 1;
}
