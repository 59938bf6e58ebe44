/* prosody-native: smqueue engine -- the outgoing queue of a XEP-0198 stream.
 * Copyright (c) prosody-native contributors. MIT licence.
 *
 * A queue holds the stanzas sent on a stream and not yet acknowledged, each as
 * its serialized bytes plus a small fixed record: a kind (0-255) and flags (a
 * 32-bit mask), both meaningful only to the caller, and the time it was queued.
 * Counters are XEP-0198 `h` values: unsigned 32-bit, wrapping 2^32-1 -> 0, and
 * compared as serial numbers (RFC 1982), so a stream may run past 2^32 stanzas.
 *
 * Push is O(1); acknowledging k stanzas is O(k). The ring grows on demand up to
 * its capacity. A push into a full queue evicts the oldest item and hands it
 * back to the caller, who decides its fate (the shim runs its expiry policy):
 * nothing is lost silently, and the counters stay exact, so the stream can still
 * be resumed (the evicted stanzas count as acknowledged by the server's side).
 * The engine knows nothing about XMPP beyond the counters and, for push_stanza,
 * which top-level elements XEP-0198 counts (message, presence, iq).
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pn_common.h"

#define SMQUEUE_MT "prosody_native.smqueue"
#define MAX_CAPACITY 1000000
#define MIN_RING 8

/* kinds push_stanza gives the stanzas it recognises */
#define SMQ_MESSAGE 1
#define SMQ_PRESENCE 2
#define SMQ_IQ 3

typedef struct {
	double stamp;        /* seconds since the epoch when queued */
	uint32_t flags;
	uint8_t kind;
	size_t len;
	char data[];         /* the stanza's bytes, not NUL-terminated */
} sm_item;

typedef struct {
	sm_item **ring;      /* NULL once closed */
	size_t ring_cap;     /* allocated slots (grows up to capacity) */
	size_t capacity;     /* most items held at once */
	size_t first;        /* index of the oldest item */
	size_t count;        /* items held */
	uint32_t head;       /* h of the last stanza pushed */
	uint32_t acked;      /* last h the peer acknowledged */
	uint32_t evicted;    /* stanzas evicted and not yet acknowledged by the peer */
	size_t bytes;        /* payload bytes held */
	int open;
} smqueue;

/* Memory held by every live queue of this Lua state's process (payloads, records, rings). */
static size_t total_memory = 0;

static size_t item_size(size_t len) {
	return sizeof(sm_item) + len;
}

static size_t queue_memory(const smqueue *q) {
	return q->bytes + q->count * sizeof(sm_item) + q->ring_cap * sizeof(sm_item *);
}

static smqueue *check_queue(lua_State *L) {
	smqueue *q = luaL_checkudata(L, 1, SMQUEUE_MT);
	if(!q->open)
		luaL_argerror(L, 1, "queue is closed");
	return q;
}

static sm_item *item_at(const smqueue *q, size_t i) {
	return q->ring[(q->first + i) % q->ring_cap];
}

static void item_free(smqueue *q, sm_item *it) {
	q->bytes -= it->len;
	total_memory -= item_size(it->len);
	free(it);
}

/* Removes and frees the oldest item. */
static void pop_oldest(smqueue *q) {
	sm_item *it = q->ring[q->first];
	q->ring[q->first] = NULL;
	q->first = (q->first + 1) % q->ring_cap;
	q->count--;
	item_free(q, it);
}

static void queue_release(smqueue *q) {
	if(!q->open)
		return;
	while(q->count > 0)
		pop_oldest(q);
	total_memory -= q->ring_cap * sizeof(sm_item *);
	free(q->ring);
	q->ring = NULL;
	q->ring_cap = 0;
	q->open = 0;
}

/* Reads an h argument: an integer from 0 to 2^32-1. */
static uint32_t check_h(lua_State *L, int arg) {
	lua_Integer h = luaL_checkinteger(L, arg);
	luaL_argcheck(L, h >= 0 && h <= (lua_Integer)4294967295LL, arg, "h must be from 0 to 4294967295");
	return (uint32_t)h;
}

static void push_item(lua_State *L, const sm_item *it) {
	lua_pushlstring(L, it->data, it->len);
	lua_pushinteger(L, it->kind);
	lua_pushinteger(L, (lua_Integer)it->flags);
	lua_pushnumber(L, it->stamp);
}

/* Doubles the ring (up to capacity), keeping order; 0 on success. */
static int ring_grow(smqueue *q) {
	size_t ncap = q->ring_cap ? q->ring_cap * 2 : MIN_RING;
	sm_item **nring;
	size_t i;
	if(ncap > q->capacity)
		ncap = q->capacity;
	nring = malloc(ncap * sizeof *nring);
	if(!nring)
		return -1;
	for(i = 0; i < q->count; i++)
		nring[i] = item_at(q, i);
	for(; i < ncap; i++)
		nring[i] = NULL;
	total_memory += (ncap - q->ring_cap) * sizeof *nring;
	free(q->ring);
	q->ring = nring;
	q->ring_cap = ncap;
	q->first = 0;
	return 0;
}

/* ---------------------------------------------------------------- Lua API */

/* smqueue.new(capacity [, h]) -> queue
 * Both counters start at h (default 0): a test hook for wrap-around. */
static int Lsm_new(lua_State *L) {
	lua_Integer capacity = luaL_checkinteger(L, 1);
	uint32_t h0 = lua_isnoneornil(L, 2) ? 0 : check_h(L, 2);
	smqueue *q;
	luaL_argcheck(L, capacity >= 1 && capacity <= MAX_CAPACITY, 1, "capacity must be from 1 to 1000000");
	q = lua_newuserdatauv(L, sizeof *q, 0);
	memset(q, 0, sizeof *q);
	luaL_setmetatable(L, SMQUEUE_MT);
	q->capacity = (size_t)capacity;
	q->head = q->acked = h0;
	q->open = 1;
	return 1;
}

/* Queues a copy of data; returns the number of Lua results pushed: h, and the
 * evicted oldest item's bytes, kind, flags and stamp if the queue was full.
 * Whatever may raise (out of memory) comes before the queue changes, so an error
 * leaves it as it was and leaks nothing. */
static int queue_push(lua_State *L, smqueue *q, const char *data, size_t len, int kind, uint32_t flags) {
	sm_item *it;
	int full;
	if(q->count == q->ring_cap && q->ring_cap < q->capacity && ring_grow(q) != 0)
		return luaL_error(L, "out of memory");
	luaL_checkstack(L, 5, NULL);
	full = q->count >= q->capacity;
	if(full)
		push_item(L, q->ring[q->first]); /* copied out while it is still held */
	it = malloc(item_size(len));
	if(!it)
		return luaL_error(L, "out of memory");
	it->stamp = pn_realtime();
	it->flags = flags;
	it->kind = (uint8_t)kind;
	it->len = len;
	memcpy(it->data, data, len);
	if(full) {
		/* the oldest stays counted as unacked (evicted) until the peer acknowledges past it */
		pop_oldest(q);
		q->evicted++;
	}
	q->ring[(q->first + q->count) % q->ring_cap] = it;
	q->count++;
	q->bytes += len;
	total_memory += item_size(len);
	q->head++; /* wraps at 2^32 by unsigned arithmetic */
	lua_pushinteger(L, (lua_Integer)q->head);
	if(!full)
		return 1;
	lua_insert(L, -5); /* h first, then the evicted item */
	return 5;
}

/* queue:push(bytes [, kind [, flags]]) -> h [, evicted_bytes, kind, flags, stamp]
 * When the queue is full the oldest item is evicted and returned after h. */
static int Lsm_push(lua_State *L) {
	smqueue *q = check_queue(L);
	size_t len;
	const char *data = luaL_checklstring(L, 2, &len);
	lua_Integer kind = luaL_optinteger(L, 3, 0);
	lua_Integer flags = luaL_optinteger(L, 4, 0);
	luaL_argcheck(L, kind >= 0 && kind <= 255, 3, "kind must be from 0 to 255");
	luaL_argcheck(L, flags >= 0 && flags <= (lua_Integer)0xffffffffLL, 4, "flags must be from 0 to 4294967295");
	return queue_push(L, q, data, len, (int)kind, (uint32_t)flags);
}

static int is_space(char c) {
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Reads the attributes of a start tag, from just after its name, for an xmlns
 * attribute: 1 (and *value, *vlen set) if there is one, 0 if there is none, -1 if
 * the start tag is malformed or does not end within len bytes. */
static int start_tag_xmlns(const char *p, size_t len, const char **value, size_t *vlen) {
	size_t i = 0;
	int found = 0;
	for(;;) {
		size_t name, name_len;
		const char *end;
		char quote;
		while(i < len && is_space(p[i]))
			i++;
		if(i >= len)
			return -1;
		if(p[i] == '>' || p[i] == '/')
			return found;
		name = i;
		while(i < len && p[i] != '=' && !is_space(p[i]) && p[i] != '>' && p[i] != '/')
			i++;
		name_len = i - name;
		while(i < len && is_space(p[i]))
			i++;
		if(name_len == 0 || i >= len || p[i] != '=')
			return -1;
		i++;
		while(i < len && is_space(p[i]))
			i++;
		if(i >= len || (p[i] != '\'' && p[i] != '"'))
			return -1;
		quote = p[i++];
		end = memchr(p + i, quote, len - i);
		if(!end)
			return -1;
		if(name_len == 5 && memcmp(p + name, "xmlns", 5) == 0) {
			*value = p + i;
			*vlen = (size_t)(end - (p + i));
			found = 1;
		}
		i = (size_t)(end - p) + 1;
	}
}

/* The stanza kind XEP-0198 counts that `data` starts with (SMQ_MESSAGE, SMQ_PRESENCE,
 * SMQ_IQ), or 0: other elements, text, a start tag cut short. A start tag naming a
 * namespace counts only if it is `ns` (the stream's own, written out). */
static int smq_stanza_kind(const char *data, size_t len, const char *ns, size_t nslen) {
	static const struct { const char *name; size_t len; int kind; } names[] = {
		{ "message", 7, SMQ_MESSAGE }, { "presence", 8, SMQ_PRESENCE }, { "iq", 2, SMQ_IQ },
	};
	size_t i;
	if(len < 4 || data[0] != '<')
		return 0;
	for(i = 0; i < sizeof names / sizeof names[0]; i++) {
		size_t n = names[i].len;
		const char *value = NULL;
		size_t vlen = 0;
		int has_ns;
		if(len < n + 2 || memcmp(data + 1, names[i].name, n) != 0)
			continue;
		if(!is_space(data[n + 1]) && data[n + 1] != '>' && data[n + 1] != '/')
			return 0;
		has_ns = start_tag_xmlns(data + n + 1, len - n - 1, &value, &vlen);
		if(has_ns < 0)
			return 0;
		if(has_ns && !(ns && vlen == nslen && memcmp(value, ns, nslen) == 0))
			return 0;
		return names[i].kind;
	}
	return 0;
}

/* queue:push_stanza(bytes [, xmlns]) -> h [, evicted...] | nothing
 * Queues bytes written on the stream if they start with a message, presence or iq
 * (in no namespace or in xmlns), with that kind; anything else, including a value
 * that is not a string, is left alone and nothing is returned. */
static int Lsm_push_stanza(lua_State *L) {
	smqueue *q = check_queue(L);
	size_t len, nslen = 0;
	const char *data, *ns = luaL_optlstring(L, 3, NULL, &nslen);
	int kind;
	if(lua_type(L, 2) != LUA_TSTRING)
		return 0;
	data = lua_tolstring(L, 2, &len);
	kind = smq_stanza_kind(data, len, ns, nslen);
	if(!kind)
		return 0;
	return queue_push(L, q, data, len, kind, 0);
}

/* queue:ack(h) -> number acknowledged | nil, err, "head"|"tail"
 * h is the peer's count of handled stanzas (serial-number arithmetic mod 2^32).
 * "head": more than was sent; "tail": less than already acknowledged. */
static int Lsm_ack(lua_State *L) {
	smqueue *q = check_queue(L);
	uint32_t h = check_h(L, 2);
	uint32_t d = h - q->acked;           /* stanzas newly acknowledged, mod 2^32 */
	uint32_t unacked = q->head - q->acked;
	uint32_t n;
	if(d > unacked) {
		if(d < 0x80000000u)
			return pn_fail(L, "acknowledged more stanzas than were sent", "head");
		return pn_fail(L, "acknowledged fewer stanzas than already acknowledged", "tail");
	}
	n = d;
	if(n <= q->evicted) {
		q->evicted -= n;
	} else {
		n -= q->evicted;
		q->evicted = 0;
		while(n-- > 0)
			pop_oldest(q);
	}
	q->acked = h;
	lua_pushinteger(L, (lua_Integer)d);
	return 1;
}

/* queue:unacked() -> number of stanzas sent and not acknowledged (held + evicted) */
static int Lsm_unacked(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)(uint32_t)(q->head - q->acked));
	return 1;
}

/* queue:acked() -> h last acknowledged by the peer */
static int Lsm_acked(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)q->acked);
	return 1;
}

/* queue:sent() -> h of the last stanza pushed */
static int Lsm_sent(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)q->head);
	return 1;
}

/* queue:count() -> items held (unacked minus evicted) */
static int Lsm_count(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)q->count);
	return 1;
}

/* queue:evicted() -> stanzas evicted by overflow and not yet acknowledged */
static int Lsm_evicted(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)q->evicted);
	return 1;
}

/* queue:capacity() -> most items held at once */
static int Lsm_capacity(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)q->capacity);
	return 1;
}

/* queue:set_capacity(n) -- the most items held from now on; the caller shift()s out
 * any excess first (an error otherwise), so that nothing is evicted behind its back */
static int Lsm_set_capacity(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_Integer n = luaL_checkinteger(L, 2);
	luaL_argcheck(L, n >= 1 && n <= MAX_CAPACITY, 2, "capacity must be from 1 to 1000000");
	luaL_argcheck(L, (size_t)n >= q->count, 2, "capacity below the items held (shift them out first)");
	q->capacity = (size_t)n;
	return 0;
}

/* queue:memory() -> bytes held (payloads, records, ring) */
static int Lsm_memory(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_pushinteger(L, (lua_Integer)queue_memory(q));
	return 1;
}

/* queue:get(i) -> bytes, kind, flags, stamp, h | nil   (i from 1 = oldest held) */
static int Lsm_get(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_Integer i = luaL_checkinteger(L, 2);
	const sm_item *it;
	if(i < 1 || (size_t)i > q->count) {
		lua_pushnil(L);
		return 1;
	}
	it = item_at(q, (size_t)i - 1);
	push_item(L, it);
	/* h of item i: head - (count - i) */
	lua_pushinteger(L, (lua_Integer)(uint32_t)(q->head - (uint32_t)(q->count - (size_t)i)));
	return 5;
}

/* queue:mark(i, flags) -> new flags | nil   (ORs flags into item i) */
static int Lsm_mark(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_Integer i = luaL_checkinteger(L, 2);
	lua_Integer flags = luaL_checkinteger(L, 3);
	sm_item *it;
	luaL_argcheck(L, flags >= 0 && flags <= (lua_Integer)0xffffffffLL, 3, "flags must be from 0 to 4294967295");
	if(i < 1 || (size_t)i > q->count) {
		lua_pushnil(L);
		return 1;
	}
	it = item_at(q, (size_t)i - 1);
	it->flags |= (uint32_t)flags;
	lua_pushinteger(L, (lua_Integer)it->flags);
	return 1;
}

static int items_next(lua_State *L) {
	smqueue *q = check_queue(L);
	lua_Integer i = luaL_checkinteger(L, 2) + 1;
	if(i < 1 || (size_t)i > q->count)
		return 0;
	lua_pushinteger(L, i);
	push_item(L, item_at(q, (size_t)i - 1));
	return 5;
}

/* queue:items() -> iterator of i, bytes, kind, flags, stamp (oldest first, not destructive) */
static int Lsm_items(lua_State *L) {
	check_queue(L);
	lua_pushcfunction(L, items_next);
	lua_pushvalue(L, 1);
	lua_pushinteger(L, 0);
	return 3;
}

/* queue:shift() -> bytes, kind, flags, stamp | nil
 * Removes the oldest item without acknowledging it (for discarding a queue). */
static int Lsm_shift(lua_State *L) {
	smqueue *q = check_queue(L);
	if(q->count == 0)
		return 0;
	push_item(L, q->ring[q->first]);
	pop_oldest(q);
	q->evicted++;
	return 4;
}

/* queue:close() -- frees every item; further use raises an error */
static int Lsm_close(lua_State *L) {
	smqueue *q = luaL_checkudata(L, 1, SMQUEUE_MT);
	queue_release(q);
	return 0;
}

static int Lsm_tostring(lua_State *L) {
	smqueue *q = luaL_checkudata(L, 1, SMQUEUE_MT);
	if(q->open)
		lua_pushfstring(L, "smqueue (%d held, sent %I, acked %I)", (int)q->count,
			(lua_Integer)q->head, (lua_Integer)q->acked);
	else
		lua_pushliteral(L, "smqueue (closed)");
	return 1;
}

/* smqueue.parse_h(string) -> integer | nil
 * Strict xs:unsignedInt: 1 to 10 ASCII digits, at most 4294967295. */
static int Lsm_parse_h(lua_State *L) {
	size_t len, i;
	const char *s;
	uint64_t v = 0;
	if(lua_type(L, 1) != LUA_TSTRING) {
		lua_pushnil(L);
		return 1;
	}
	s = lua_tolstring(L, 1, &len);
	if(len == 0 || len > 10) {
		lua_pushnil(L);
		return 1;
	}
	for(i = 0; i < len; i++) {
		if(s[i] < '0' || s[i] > '9') {
			lua_pushnil(L);
			return 1;
		}
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	if(v > 4294967295ULL) {
		lua_pushnil(L);
		return 1;
	}
	lua_pushinteger(L, (lua_Integer)v);
	return 1;
}

/* smqueue.memory() -> bytes held by every live queue */
static int Lsm_total_memory(lua_State *L) {
	lua_pushinteger(L, (lua_Integer)total_memory);
	return 1;
}

/* smqueue.item_overhead() -> bytes of bookkeeping per queued item (record + ring slot) */
static int Lsm_item_overhead(lua_State *L) {
	lua_pushinteger(L, (lua_Integer)(sizeof(sm_item) + sizeof(sm_item *)));
	return 1;
}

static const luaL_Reg smqueue_meta[] = {
	{ "__gc", Lsm_close },
	{ "__close", Lsm_close },
	{ "__tostring", Lsm_tostring },
	{ NULL, NULL }
};

static const luaL_Reg smqueue_methods[] = {
	{ "push", Lsm_push },
	{ "push_stanza", Lsm_push_stanza },
	{ "ack", Lsm_ack },
	{ "unacked", Lsm_unacked },
	{ "acked", Lsm_acked },
	{ "sent", Lsm_sent },
	{ "count", Lsm_count },
	{ "evicted", Lsm_evicted },
	{ "capacity", Lsm_capacity },
	{ "set_capacity", Lsm_set_capacity },
	{ "memory", Lsm_memory },
	{ "get", Lsm_get },
	{ "mark", Lsm_mark },
	{ "items", Lsm_items },
	{ "shift", Lsm_shift },
	{ "close", Lsm_close },
	{ NULL, NULL }
};

static const luaL_Reg smqueue_functions[] = {
	{ "new", Lsm_new },
	{ "parse_h", Lsm_parse_h },
	{ "memory", Lsm_total_memory },
	{ "item_overhead", Lsm_item_overhead },
	{ NULL, NULL }
};

int luaopen_prosody_native_smqueue(lua_State *L);
int luaopen_prosody_native_smqueue(lua_State *L) {
	luaL_checkversion(L);
	pn_new_class(L, SMQUEUE_MT, smqueue_meta, smqueue_methods);
	luaL_newlib(L, smqueue_functions);
	lua_pushinteger(L, PN_ABI);
	lua_setfield(L, -2, "_ABI");
	lua_pushinteger(L, SMQ_MESSAGE);
	lua_setfield(L, -2, "MESSAGE");
	lua_pushinteger(L, SMQ_PRESENCE);
	lua_setfield(L, -2, "PRESENCE");
	lua_pushinteger(L, SMQ_IQ);
	lua_setfield(L, -2, "IQ");
	return 1;
}
