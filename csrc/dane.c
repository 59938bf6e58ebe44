/* prosody-native: dane engine -- TLSA records x peer certificate chain -> verdict,
 * on OpenSSL's DANE engine, offline (after the handshake, whatever the transport).
 * Copyright (c) prosody-native contributors. MIT licence.
 *
 * A verifier owns one DANE-enabled SSL_CTX (its certificate store serves the PKIX
 * usages 0/1 and the plain PKIX verdict when no record is usable). Each verification
 * builds a throwaway SSL only to carry OpenSSL's DANE state (records, reference names,
 * flags), then runs X509_verify_cert on the given chain with that state attached
 * (X509_STORE_CTX_set0_dane). All matching rules -- usages 0-3, selectors 0/1,
 * matching types 0/1/2, digest agility (RFC 7671 section 9), DANE-EE ignoring expiry
 * and (by default) names, DANE-TA name checks -- are OpenSSL's.
 *
 * The engine knows nothing about DNS, DNSSEC or Prosody: which records are secure,
 * and what a verdict means for a connection, is the shim's business.
 */

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "pn_common.h"

#define VERIFIER_MT "prosody_native.dane"
#define JOB_MT "prosody_native.dane.job"
#define MAX_CHAIN 32             /* certificates in one peer chain */
#define MAX_CERT_BYTES (1 << 20) /* one encoded certificate (or PEM bundle) */
#define MAX_RECORDS 256          /* TLSA records in one verification */
#define MAX_NAMES 16             /* reference identifiers */
#define MAX_DATA 65535           /* TLSA rdata is at most 65535 bytes on the wire */

#define MAX_CACHE 4096           /* parsed-certificate cache entries per verifier */

/* OpenSSL 3 spends about 0.3 ms decoding one EC certificate (d2i_X509); peers present
 * the same chain connection after connection, so a verifier keeps the parsed
 * certificates of recently seen encodings, keyed by their SHA-256. */
struct cert_entry {
	unsigned char key[32];
	STACK_OF(X509) *certs;       /* NULL: free slot */
	unsigned long used;
};

typedef struct {
	SSL_CTX *ctx;                /* NULL once closed */
	int ee_namechecks;
	struct cert_entry *cache;
	int cache_size;
	unsigned long clock, hits, misses;
} dane_verifier;

/* Everything a verification allocates, so that a Lua error at any point (a bad
 * argument, out of memory while pushing results) frees it through __gc. */
typedef struct {
	STACK_OF(X509) *chain;
	SSL *ssl;
	X509_STORE_CTX *sctx;
} dane_job;

/* A parsed TLSA record: rdata = usage, selector, matching type, association data. */
struct tlsa {
	int usage, selector, mtype;
	const unsigned char *data;
	size_t len;
};

/* ---------------------------------------------------------------- errors */

/* Drains OpenSSL's error queue into buf ("reason; reason"), or writes fallback. */
static const char *ssl_errors(char *buf, size_t size, const char *fallback) {
	unsigned long e;
	size_t used = 0;
	buf[0] = '\0';
	while((e = ERR_get_error()) != 0) {
		const char *r = ERR_reason_error_string(e);
		char tmp[128];
		if(!r) {
			snprintf(tmp, sizeof tmp, "error %lx", e);
			r = tmp;
		}
		if(used + strlen(r) + 3 < size) {
			used += (size_t)snprintf(buf + used, size - used, "%s%s", used ? "; " : "", r);
		}
	}
	if(!buf[0])
		snprintf(buf, size, "%s", fallback);
	return buf;
}

/* ---------------------------------------------------------------- parsers */

/* Wire-format TLSA rdata. Returns 0 and fills t (pointing into rdata), or -1 when
 * fewer than the three fixed octets are present. */
static int tlsa_parse_rdata(const unsigned char *rdata, size_t len, struct tlsa *t) {
	if(len < 3)
		return -1;
	t->usage = rdata[0];
	t->selector = rdata[1];
	t->mtype = rdata[2];
	t->data = rdata + 3;
	t->len = len - 3;
	return 0;
}

static int hexval(int c) {
	if(c >= '0' && c <= '9') return c - '0';
	if(c >= 'a' && c <= 'f') return c - 'a' + 10;
	if(c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

static int is_space(int c) {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Reads a decimal field 0-255 at *p; -1 if absent, malformed or out of range. */
static int text_octet(const char **p, const char *end) {
	int v = 0, digits = 0;
	while(*p < end && is_space((unsigned char)**p))
		(*p)++;
	while(*p < end && **p >= '0' && **p <= '9') {
		v = v * 10 + (**p - '0');
		if(v > 255 || ++digits > 3)
			return -1;
		(*p)++;
	}
	if(!digits || (*p < end && !is_space((unsigned char)**p)))
		return -1;
	return v;
}

/* Presentation format "usage selector mtype hex..." (RFC 6698 section 2.2; the hex
 * may be split by white space). Writes the data into out (capacity cap); returns 0,
 * or -1 with *why set. */
static int tlsa_parse_text(const char *s, size_t len, struct tlsa *t, unsigned char *out, size_t cap, const char **why) {
	const char *p = s, *end = s + len;
	size_t n = 0;
	int hi = -1;
	if((t->usage = text_octet(&p, end)) < 0
	|| (t->selector = text_octet(&p, end)) < 0
	|| (t->mtype = text_octet(&p, end)) < 0) {
		*why = "expected three numbers from 0 to 255 (usage, selector, matching type)";
		return -1;
	}
	for(; p < end; p++) {
		int v;
		if(is_space((unsigned char)*p))
			continue;
		v = hexval((unsigned char)*p);
		if(v < 0) {
			*why = "association data is not hexadecimal";
			return -1;
		}
		if(hi < 0) {
			hi = v;
			continue;
		}
		if(n >= cap) {
			*why = "association data is too long";
			return -1;
		}
		out[n++] = (unsigned char)(hi << 4 | v);
		hi = -1;
	}
	if(hi >= 0) {
		*why = "association data has an odd number of hex digits";
		return -1;
	}
	if(n == 0) {
		*why = "association data is missing";
		return -1;
	}
	t->data = out;
	t->len = n;
	return 0;
}

/* Appends the certificates in one string (a PEM bundle, or exactly one DER
 * certificate) to chain. Returns the number added, or -1 with a message in err. */
static int chain_add_string(STACK_OF(X509) *chain, const char *s, size_t len, char *err, size_t errsize) {
	int added = 0;
	if(len > MAX_CERT_BYTES) {
		snprintf(err, errsize, "longer than %d bytes", MAX_CERT_BYTES);
		return -1;
	}
	if(len > 0 && memmem(s, len, "-----BEGIN", 10)) {
		BIO *bio = BIO_new_mem_buf(s, (int)len);
		X509 *x;
		if(!bio) {
			ssl_errors(err, errsize, "out of memory");
			return -1;
		}
		while((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
			if(sk_X509_num(chain) >= MAX_CHAIN || !sk_X509_push(chain, x)) {
				X509_free(x);
				BIO_free(bio);
				snprintf(err, errsize, "more than %d certificates", MAX_CHAIN);
				return -1;
			}
			added++;
		}
		BIO_free(bio);
		/* The loop ends with "no start line" at the end of the data; anything else
		 * (a truncated or corrupt block) is an error. */
		{
			unsigned long e = ERR_peek_last_error();
			if(e && !(ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE)) {
				ssl_errors(err, errsize, "bad PEM");
				return -1;
			}
		}
		ERR_clear_error();
		if(!added) {
			snprintf(err, errsize, "no certificate in PEM data");
			return -1;
		}
		return added;
	} else {
		const unsigned char *p = (const unsigned char *)s;
		X509 *x = d2i_X509(NULL, &p, (long)len);
		if(!x) {
			ssl_errors(err, errsize, "not a DER or PEM certificate");
			return -1;
		}
		if(p != (const unsigned char *)s + len) {
			X509_free(x);
			snprintf(err, errsize, "trailing bytes after a DER certificate");
			return -1;
		}
		if(sk_X509_num(chain) >= MAX_CHAIN || !sk_X509_push(chain, x)) {
			X509_free(x);
			snprintf(err, errsize, "more than %d certificates", MAX_CHAIN);
			return -1;
		}
		return 1;
	}
}

/* chain_add_string through the verifier's cache (v may be NULL: no cache). */
static int cached_add_string(dane_verifier *v, STACK_OF(X509) *chain, const char *s, size_t len, char *err, size_t errsize) {
	unsigned char key[32];
	unsigned int klen = 0;
	struct cert_entry *e, *victim;
	STACK_OF(X509) *parsed;
	int i, n;
	if(!v || v->cache_size == 0 || len > MAX_CERT_BYTES
	|| !EVP_Digest(s, len, key, &klen, EVP_sha256(), NULL) || klen != sizeof key)
		return chain_add_string(chain, s, len, err, errsize);
	victim = &v->cache[0];
	for(i = 0; i < v->cache_size; i++) {
		e = &v->cache[i];
		if(e->certs && memcmp(e->key, key, sizeof key) == 0)
			break;
		if(!e->certs || (victim->certs && e->used < victim->used))
			victim = e;
	}
	if(i < v->cache_size) {
		v->hits++;
		parsed = e->certs;
		e->used = ++v->clock;
	} else {
		v->misses++;
		parsed = sk_X509_new_null();
		if(!parsed) {
			snprintf(err, errsize, "out of memory");
			return -1;
		}
		if(chain_add_string(parsed, s, len, err, errsize) < 0) {
			sk_X509_pop_free(parsed, X509_free);
			return -1;
		}
		if(victim->certs)
			sk_X509_pop_free(victim->certs, X509_free);
		memcpy(victim->key, key, sizeof key);
		victim->certs = parsed;
		victim->used = ++v->clock;
	}
	n = sk_X509_num(parsed);
	for(i = 0; i < n; i++) {
		X509 *x = sk_X509_value(parsed, i);
		if(sk_X509_num(chain) >= MAX_CHAIN) {
			snprintf(err, errsize, "more than %d certificates", MAX_CHAIN);
			return -1;
		}
		if(!X509_up_ref(x) || !sk_X509_push(chain, x)) {
			X509_free(x);
			snprintf(err, errsize, "out of memory");
			return -1;
		}
	}
	return n;
}

static void cache_clear(dane_verifier *v) {
	int i;
	for(i = 0; v->cache && i < v->cache_size; i++) {
		if(v->cache[i].certs)
			sk_X509_pop_free(v->cache[i].certs, X509_free);
		v->cache[i].certs = NULL;
	}
}

/* ---------------------------------------------------------------- jobs */

static int job_gc(lua_State *L) {
	dane_job *j = luaL_checkudata(L, 1, JOB_MT);
	if(j->sctx)
		X509_STORE_CTX_free(j->sctx);
	if(j->ssl)
		SSL_free(j->ssl);
	if(j->chain)
		sk_X509_pop_free(j->chain, X509_free);
	j->sctx = NULL;
	j->ssl = NULL;
	j->chain = NULL;
	return 0;
}

static dane_job *job_new(lua_State *L) {
	dane_job *j = lua_newuserdatauv(L, sizeof *j, 0);
	memset(j, 0, sizeof *j);
	luaL_setmetatable(L, JOB_MT);
	return j;
}

/* Reads the chain argument at idx (string, or array of strings) into j->chain.
 * Returns 0, or pushes nil, err, code and returns 3. */
static int read_chain(lua_State *L, int idx, dane_job *j, dane_verifier *v) {
	char err[256];
	ERR_clear_error();
	j->chain = sk_X509_new_null();
	if(!j->chain)
		return luaL_error(L, "out of memory");
	if(lua_type(L, idx) == LUA_TSTRING) {
		size_t len;
		const char *s = lua_tolstring(L, idx, &len);
		if(cached_add_string(v, j->chain, s, len, err, sizeof err) < 0) {
			lua_pushfstring(L, "bad certificate chain: %s", err);
			return pn_fail(L, lua_tostring(L, -1), "bad-chain");
		}
	} else if(lua_type(L, idx) == LUA_TTABLE) {
		lua_Integer n = luaL_len(L, idx), i;
		if(n > MAX_CHAIN)
			return pn_fail(L, "bad certificate chain: more than 32 certificates", "bad-chain");
		for(i = 1; i <= n; i++) {
			size_t len;
			const char *s;
			if(lua_geti(L, idx, i) != LUA_TSTRING)
				return luaL_error(L, "certificate %d of the chain is a %s, not a string", (int)i, luaL_typename(L, -1));
			s = lua_tolstring(L, -1, &len);
			if(cached_add_string(v, j->chain, s, len, err, sizeof err) < 0) {
				lua_pushfstring(L, "bad certificate chain: certificate %d: %s", (int)i, err);
				return pn_fail(L, lua_tostring(L, -1), "bad-chain");
			}
			lua_pop(L, 1);
		}
	} else {
		return luaL_typeerror(L, idx, "string or array of strings");
	}
	if(sk_X509_num(j->chain) == 0)
		return pn_fail(L, "bad certificate chain: no certificate", "bad-chain");
	return 0;
}

/* Reads one record at the top of the stack: a table { usage, selector, mtype, data }
 * (util.dns's { use, select, match, data } too) or a wire-format rdata string.
 * Returns 0, or -1 if the rdata is shorter than its three fixed octets. */
static int read_record(lua_State *L, int i, struct tlsa *t) {
	int top = lua_gettop(L);
	if(lua_type(L, top) == LUA_TSTRING) {
		size_t len;
		const char *s = lua_tolstring(L, top, &len);
		return tlsa_parse_rdata((const unsigned char *)s, len, t);
	}
	if(!lua_istable(L, top))
		luaL_error(L, "TLSA record %d is a %s, not a table or rdata string", i, luaL_typename(L, top));
	{
		static const char *const fields[3][2] = { { "usage", "use" }, { "selector", "select" }, { "mtype", "match" } };
		int *dest[3];
		int k;
		dest[0] = &t->usage;
		dest[1] = &t->selector;
		dest[2] = &t->mtype;
		for(k = 0; k < 3; k++) {
			lua_Integer v;
			int isnum;
			if(lua_getfield(L, top, fields[k][0]) == LUA_TNIL) {
				lua_pop(L, 1);
				lua_getfield(L, top, fields[k][1]);
			}
			v = lua_tointegerx(L, -1, &isnum);
			if(!isnum || v < 0 || v > 255)
				luaL_error(L, "TLSA record %d: field '%s' must be an integer from 0 to 255", i, fields[k][0]);
			*dest[k] = (int)v;
			lua_pop(L, 1);
		}
		/* Raw: the string kept must be the one stored in the record table, which the caller
		 * keeps (an __index could hand out a fresh string, collected once popped). */
		lua_pushliteral(L, "data");
		if(lua_rawget(L, top) != LUA_TSTRING)
			luaL_error(L, "TLSA record %d: field 'data' must be a string", i);
		t->data = (const unsigned char *)lua_tolstring(L, -1, &t->len);
		lua_pop(L, 1);
	}
	return 0;
}

/* ---------------------------------------------------------------- verifier */

static dane_verifier *check_verifier(lua_State *L) {
	dane_verifier *v = luaL_checkudata(L, 1, VERIFIER_MT);
	if(!v->ctx)
		luaL_argerror(L, 1, "DANE verifier is closed");
	return v;
}

/* verifier:close() -- idempotent; also __gc and __close */
static int Ldane_close(lua_State *L) {
	dane_verifier *v = luaL_checkudata(L, 1, VERIFIER_MT);
	if(v->ctx)
		SSL_CTX_free(v->ctx);
	v->ctx = NULL;
	cache_clear(v);
	free(v->cache);
	v->cache = NULL;
	v->cache_size = 0;
	return 0;
}

/* verifier:stats() -> { cache_size, cached, cache_hits, cache_misses } */
static int Ldane_stats(lua_State *L) {
	dane_verifier *v = check_verifier(L);
	int i, cached = 0;
	for(i = 0; i < v->cache_size; i++)
		cached += v->cache[i].certs != NULL;
	lua_createtable(L, 0, 4);
	lua_pushinteger(L, v->cache_size);
	lua_setfield(L, -2, "cache_size");
	lua_pushinteger(L, cached);
	lua_setfield(L, -2, "cached");
	lua_pushinteger(L, (lua_Integer)v->hits);
	lua_setfield(L, -2, "cache_hits");
	lua_pushinteger(L, (lua_Integer)v->misses);
	lua_setfield(L, -2, "cache_misses");
	return 1;
}

static int Ldane_tostring(lua_State *L) {
	dane_verifier *v = luaL_checkudata(L, 1, VERIFIER_MT);
	lua_pushfstring(L, "DANE verifier (%s)", v->ctx ? "open" : "closed");
	return 1;
}

/* dane.new(options?) -> verifier | nil, err, code
 * options: cafile, capath (trust store for usages 0/1 and plain PKIX; default none),
 * ee_namechecks (default false: DANE-EE ignores names, RFC 7671 5.1 / RFC 7673 4.2),
 * cache_size (parsed certificate encodings kept, default 64, 0 to 4096). */
static int Ldane_new(lua_State *L) {
	dane_verifier *v;
	const char *cafile = NULL, *capath = NULL;
	int ee_namechecks = 0;
	lua_Integer cache_size = 64;
	char err[512];
	if(!lua_isnoneornil(L, 1)) {
		luaL_checktype(L, 1, LUA_TTABLE);
		if(lua_getfield(L, 1, "cafile") != LUA_TNIL && !(cafile = lua_tostring(L, -1)))
			return luaL_error(L, "option 'cafile' must be a string");
		if(lua_getfield(L, 1, "capath") != LUA_TNIL && !(capath = lua_tostring(L, -1)))
			return luaL_error(L, "option 'capath' must be a string");
		if(lua_getfield(L, 1, "ee_namechecks") != LUA_TNIL) {
			if(!lua_isboolean(L, -1))
				return luaL_error(L, "option 'ee_namechecks' must be a boolean");
			ee_namechecks = lua_toboolean(L, -1);
		}
		cache_size = pn_opt_integer_field(L, 1, "cache_size", cache_size);
		if(cache_size < 0 || cache_size > MAX_CACHE)
			return luaL_error(L, "option 'cache_size' must be from 0 to %d", MAX_CACHE);
		/* cafile/capath strings stay on the stack until we return */
	}
	v = lua_newuserdatauv(L, sizeof *v, 0);
	memset(v, 0, sizeof *v);
	v->ee_namechecks = ee_namechecks;
	luaL_setmetatable(L, VERIFIER_MT);
	if(cache_size > 0) {
		v->cache = calloc((size_t)cache_size, sizeof *v->cache);
		if(!v->cache)
			return luaL_error(L, "out of memory");
		v->cache_size = (int)cache_size;
	}

	ERR_clear_error();
	v->ctx = SSL_CTX_new(TLS_client_method());
	if(!v->ctx || SSL_CTX_dane_enable(v->ctx) <= 0) {
		ssl_errors(err, sizeof err, "cannot create an SSL context");
		return pn_fail(L, err, "openssl");
	}
	if(cafile && SSL_CTX_load_verify_file(v->ctx, cafile) != 1) {
		char msg[700];
		snprintf(msg, sizeof msg, "cannot load cafile %s: %s", cafile, ssl_errors(err, sizeof err, "failed"));
		return pn_fail(L, msg, "bad-cafile");
	}
	if(capath && SSL_CTX_load_verify_dir(v->ctx, capath) != 1) {
		char msg[700];
		snprintf(msg, sizeof msg, "cannot use capath %s: %s", capath, ssl_errors(err, sizeof err, "failed"));
		return pn_fail(L, msg, "bad-capath");
	}
	return 1;
}

/* Why SSL_dane_tlsa_add refused a record, in words (OpenSSL's queue is drained). */
static const char *unusable_reason(const struct tlsa *t, char *buf, size_t size) {
	if(t->usage > 3)
		snprintf(buf, size, "unknown certificate usage %d", t->usage);
	else if(t->selector > 1)
		snprintf(buf, size, "unknown selector %d", t->selector);
	else if(t->mtype > 2)
		snprintf(buf, size, "unknown matching type %d", t->mtype);
	else if(t->mtype == 1 && t->len != 32)
		snprintf(buf, size, "SHA2-256 data is %u bytes, not 32", (unsigned)t->len);
	else if(t->mtype == 2 && t->len != 64)
		snprintf(buf, size, "SHA2-512 data is %u bytes, not 64", (unsigned)t->len);
	else
		return ssl_errors(buf, size, "unusable record");
	ERR_clear_error();
	return buf;
}

/* Adds one record to ssl's DANE state: 1 usable, 0 unusable (why says so), -1 an
 * OpenSSL failure (why says which). */
static int tlsa_add(SSL *ssl, const struct tlsa *t, char *why, size_t size) {
	int r;
	if(t->len > MAX_DATA) {
		snprintf(why, size, "association data longer than 65535 bytes");
		return 0;
	}
	if(t->len == 0) {
		/* OpenSSL 3.0 reports an empty one as a malloc failure */
		snprintf(why, size, "association data is empty");
		return 0;
	}
	ERR_clear_error();
	r = SSL_dane_tlsa_add(ssl, (uint8_t)t->usage, (uint8_t)t->selector, (uint8_t)t->mtype, t->data, t->len);
	if(r > 0)
		return 1;
	if(r < 0) {
		ssl_errors(why, size, "cannot add a TLSA record");
		return -1;
	}
	unusable_reason(t, why, size);
	return 0;
}

static void set_int(lua_State *L, int t, const char *k, lua_Integer v) {
	lua_pushinteger(L, v);
	lua_setfield(L, t, k);
}

static void set_str(lua_State *L, int t, const char *k, const char *v) {
	lua_pushstring(L, v);
	lua_setfield(L, t, k);
}

/* verifier:verify(chain, records, options) -> result | nil, err, code
 * chain: PEM bundle, DER certificate, or array of those, leaf first (as sent).
 * records: array of { usage, selector, mtype, data } or wire-format rdata strings.
 * options: base (TLSA base domain, e.g. the SRV target), names (more reference
 * identifiers, e.g. the XMPP domain), time (verification time, epoch seconds).
 * result: verdict ("verified" | "mismatch" | "unusable-only" | "no-records"), usable,
 * unusable ({ [index] = reason }), and for "verified": depth, matched (index into
 * records), peername; for "mismatch": error, x509_error; for "unusable-only" and
 * "no-records": pkix (boolean, plain PKIX against the trust store, DNS-ID names),
 * pkix_error. */
static int Ldane_verify(lua_State *L) {
	dane_verifier *v = check_verifier(L);
	dane_job *j;
	const char *base = NULL;
	int has_time = 0, usable = 0, nrec, i, ok, x509_err, nnames = 0, ret, res, reasons;
	lua_Integer nrec_l;
	time_t when = 0;
	char err[512];
	X509 *leaf;
	struct tlsa *recs = NULL;

	luaL_checktype(L, 3, LUA_TTABLE);
	luaL_checktype(L, 4, LUA_TTABLE);
	lua_settop(L, 4);
	if(lua_getfield(L, 4, "base") != LUA_TNIL && !(base = lua_tostring(L, -1)))
		return luaL_error(L, "option 'base' must be a string");
	if(lua_getfield(L, 4, "names") != LUA_TNIL && !lua_istable(L, -1))
		return luaL_error(L, "option 'names' must be an array of strings");
	if(lua_getfield(L, 4, "time") != LUA_TNIL) {
		int isnum;
		lua_Integer t = lua_tointegerx(L, -1, &isnum);
		if(!isnum)
			return luaL_error(L, "option 'time' must be an integer (seconds since the epoch)");
		when = (time_t)t;
		has_time = 1;
	}
	/* stack: 5 base, 6 names, 7 time */
	if(lua_istable(L, 6)) {
		nnames = (int)luaL_len(L, 6);
		if(nnames > MAX_NAMES)
			return luaL_error(L, "option 'names': at most %d names", MAX_NAMES);
	}
	if(!base && nnames == 0)
		return luaL_error(L, "options need a 'base' name or 'names' (reference identifiers)");

	nrec_l = (lua_Integer)lua_rawlen(L, 3);
	if(nrec_l > MAX_RECORDS)
		return pn_fail(L, "too many TLSA records (at most 256)", "bad-records");
	nrec = nrec_l < 0 ? 0 : (int)nrec_l;

	j = job_new(L); /* index 8 */
	ret = read_chain(L, 2, j, v);
	if(ret)
		return ret;
	leaf = sk_X509_value(j->chain, 0);

	ERR_clear_error();
	j->ssl = SSL_new(v->ctx);
	if(!j->ssl)
		return pn_fail(L, ssl_errors(err, sizeof err, "out of memory"), "openssl");
	if(!base) {
		lua_geti(L, 6, 1);
		base = lua_tostring(L, -1);
		if(!base)
			return luaL_error(L, "option 'names': name 1 is not a string");
	}
	if(SSL_dane_enable(j->ssl, base) <= 0)
		return pn_fail(L, ssl_errors(err, sizeof err, "cannot enable DANE"), "openssl");
	for(i = 1; i <= nnames; i++) {
		const char *name;
		lua_geti(L, 6, i);
		name = lua_tostring(L, -1);
		if(!name)
			return luaL_error(L, "option 'names': name %d is not a string", i);
		if(SSL_add1_host(j->ssl, name) != 1)
			return pn_fail(L, ssl_errors(err, sizeof err, "bad reference name"), "bad-name");
		lua_pop(L, 1);
	}
	/* RFC 9525 6.3: a wildcard is a whole left-most label, and only DNS names count */
	SSL_set_hostflags(j->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
	if(!v->ee_namechecks)
		SSL_dane_set_flags(j->ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);

	/* result table, reasons for unusable records, parsed records */
	lua_createtable(L, 0, 12);
	res = lua_gettop(L);
	lua_newtable(L);
	reasons = lua_gettop(L);
	recs = nrec > 0 ? lua_newuserdatauv(L, sizeof *recs * (size_t)nrec, 0) : NULL;
	lua_settop(L, reasons + 1); /* recs (or nil) stays anchored until we return */
	for(i = 1; i <= nrec; i++) {
		struct tlsa *t = &recs[i - 1];
		const char *why = NULL;
		char buf[256];
		int r;
		lua_rawgeti(L, 3, i); /* raw: what the records table itself holds, and so keeps alive */
		r = read_record(L, i, t);
		lua_pop(L, 1); /* data strings stay referenced by the records table */
		if(r < 0) {
			why = "truncated rdata (fewer than 3 octets)";
		} else {
			r = tlsa_add(j->ssl, t, buf, sizeof buf);
			if(r > 0) {
				usable++;
				continue;
			}
			if(r < 0)
				return pn_fail(L, buf, "openssl");
			why = buf;
		}
		t->usage = -1; /* never reported as the match */
		lua_pushstring(L, why);
		lua_rawseti(L, reasons, i);
	}

	ERR_clear_error();
	j->sctx = X509_STORE_CTX_new();
	/* the leaf in the untrusted set too is harmless: OpenSSL skips it */
	if(!j->sctx || !X509_STORE_CTX_init(j->sctx, SSL_CTX_get_cert_store(v->ctx), leaf, j->chain))
		return pn_fail(L, ssl_errors(err, sizeof err, "cannot set up verification"), "openssl");
	/* as ssl_verify_cert_chain does for a client */
	X509_STORE_CTX_set_default(j->sctx, "ssl_server");
	X509_VERIFY_PARAM_set_auth_level(X509_STORE_CTX_get0_param(j->sctx), SSL_get_security_level(j->ssl));
	X509_VERIFY_PARAM_set1(X509_STORE_CTX_get0_param(j->sctx), SSL_get0_param(j->ssl));
	if(has_time)
		X509_VERIFY_PARAM_set_time(X509_STORE_CTX_get0_param(j->sctx), when);
	X509_STORE_CTX_set0_dane(j->sctx, SSL_get0_dane(j->ssl));
	ok = X509_verify_cert(j->sctx);
	x509_err = X509_STORE_CTX_get_error(j->sctx);
	ERR_clear_error();

	lua_pushvalue(L, reasons);
	lua_setfield(L, res, "unusable");
	set_int(L, res, "usable", usable);
	if(usable > 0 && ok > 0) {
		uint8_t mu, ms, mm;
		const unsigned char *mdata;
		size_t mlen;
		int depth;
		const char *peer = X509_VERIFY_PARAM_get0_peername(X509_STORE_CTX_get0_param(j->sctx));
		SSL_set_verify_result(j->ssl, X509_V_OK);
		depth = SSL_get0_dane_tlsa(j->ssl, &mu, &ms, &mm, &mdata, &mlen);
		set_str(L, res, "verdict", "verified");
		set_int(L, res, "depth", depth);
		if(depth >= 0) {
			for(i = 0; i < nrec; i++) {
				struct tlsa *t = &recs[i];
				if(t->usage == mu && t->selector == ms && t->mtype == mm && t->len == mlen
				&& (mlen == 0 || memcmp(t->data, mdata, mlen) == 0)) {
					set_int(L, res, "matched", i + 1);
					break;
				}
			}
			set_int(L, res, "usage", mu);
			set_int(L, res, "selector", ms);
			set_int(L, res, "mtype", mm);
		}
		if(peer)
			set_str(L, res, "peername", peer);
	} else if(usable > 0) {
		set_str(L, res, "verdict", "mismatch");
		set_str(L, res, "error", X509_verify_cert_error_string(x509_err));
		set_int(L, res, "x509_error", x509_err);
	} else {
		set_str(L, res, "verdict", nrec > 0 ? "unusable-only" : "no-records");
		lua_pushboolean(L, ok > 0);
		lua_setfield(L, res, "pkix");
		if(ok <= 0) {
			set_str(L, res, "pkix_error", X509_verify_cert_error_string(x509_err));
			set_int(L, res, "x509_error", x509_err);
		}
	}
	lua_settop(L, res);
	return 1;
}

/* ---------------------------------------------------------------- helpers */

/* Reads one certificate (DER or the first PEM block) at idx into a new X509. */
static X509 *check_cert(lua_State *L, int idx, dane_job *j) {
	size_t len;
	const char *s = luaL_checklstring(L, idx, &len);
	char err[256];
	ERR_clear_error();
	j->chain = sk_X509_new_null();
	if(!j->chain)
		luaL_error(L, "out of memory");
	if(chain_add_string(j->chain, s, len, err, sizeof err) < 0)
		return NULL;
	return sk_X509_value(j->chain, 0);
}

/* dane.digest(cert, selector, mtype) -> association data | nil, err, code
 * The data of a TLSA record with this selector and matching type for cert (DER or
 * PEM): what to publish, or to compare. */
static int Ldane_digest(lua_State *L) {
	dane_job *j;
	X509 *x;
	lua_Integer sel = luaL_checkinteger(L, 2), mt = luaL_checkinteger(L, 3);
	unsigned char *der = NULL, md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	int len;
	char err[256];
	luaL_argcheck(L, sel == 0 || sel == 1, 2, "selector must be 0 (Cert) or 1 (SPKI)");
	luaL_argcheck(L, mt >= 0 && mt <= 2, 3, "matching type must be 0 (Full), 1 (SHA2-256) or 2 (SHA2-512)");
	lua_settop(L, 3);
	j = job_new(L);
	x = check_cert(L, 1, j);
	if(!x)
		return pn_fail(L, "not a DER or PEM certificate", "bad-chain");
	ERR_clear_error();
	len = sel == 0 ? i2d_X509(x, &der) : i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
	if(len <= 0)
		return pn_fail(L, ssl_errors(err, sizeof err, "cannot encode"), "openssl");
	if(mt == 0) {
		lua_pushlstring(L, (const char *)der, (size_t)len);
		OPENSSL_free(der);
		return 1;
	}
	if(!EVP_Digest(der, (size_t)len, md, &mdlen, mt == 1 ? EVP_sha256() : EVP_sha512(), NULL)) {
		OPENSSL_free(der);
		return pn_fail(L, ssl_errors(err, sizeof err, "digest failed"), "openssl");
	}
	OPENSSL_free(der);
	lua_pushlstring(L, (const char *)md, mdlen);
	return 1;
}

static lua_Integer asn1_time_epoch(const ASN1_TIME *t) {
	struct tm tm;
	memset(&tm, 0, sizeof tm);
	if(!t || ASN1_TIME_to_tm(t, &tm) != 1)
		return 0;
	return (lua_Integer)timegm(&tm);
}

/* dane.certinfo(cert) -> { subject, issuer, not_before, not_after, ca, self_issued } | nil, err, code */
static int Ldane_certinfo(lua_State *L) {
	dane_job *j;
	X509 *x;
	char buf[512];
	lua_settop(L, 1);
	j = job_new(L);
	x = check_cert(L, 1, j);
	if(!x)
		return pn_fail(L, "not a DER or PEM certificate", "bad-chain");
	lua_createtable(L, 0, 6);
	X509_NAME_oneline(X509_get_subject_name(x), buf, sizeof buf);
	set_str(L, -2, "subject", buf);
	X509_NAME_oneline(X509_get_issuer_name(x), buf, sizeof buf);
	set_str(L, -2, "issuer", buf);
	set_int(L, -2, "not_before", asn1_time_epoch(X509_get0_notBefore(x)));
	set_int(L, -2, "not_after", asn1_time_epoch(X509_get0_notAfter(x)));
	lua_pushboolean(L, X509_check_ca(x) > 0);
	lua_setfield(L, -2, "ca");
	lua_pushboolean(L, X509_check_issued(x, x) == X509_V_OK);
	lua_setfield(L, -2, "self_issued");
	ERR_clear_error();
	return 1;
}

/* dane.parse_rdata(rdata) -> usage, selector, mtype, data | nil, err, code */
static int Ldane_parse_rdata(lua_State *L) {
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	struct tlsa t;
	if(tlsa_parse_rdata((const unsigned char *)s, len, &t) < 0)
		return pn_fail(L, "truncated TLSA rdata (fewer than 3 octets)", "bad-record");
	lua_pushinteger(L, t.usage);
	lua_pushinteger(L, t.selector);
	lua_pushinteger(L, t.mtype);
	lua_pushlstring(L, (const char *)t.data, t.len);
	return 4;
}

/* dane.parse_text("3 1 1 <hex>") -> usage, selector, mtype, data | nil, err, code */
static int Ldane_parse_text(lua_State *L) {
	size_t len;
	const char *s = luaL_checklstring(L, 1, &len);
	struct tlsa t;
	const char *why = NULL;
	luaL_Buffer b;
	unsigned char *out;
	size_t cap = len / 2 + 1;
	if(cap > MAX_DATA)
		cap = MAX_DATA;
	out = (unsigned char *)luaL_buffinitsize(L, &b, cap);
	if(tlsa_parse_text(s, len, &t, out, cap, &why) < 0) {
		lua_pushfstring(L, "bad TLSA record: %s", why);
		return pn_fail(L, lua_tostring(L, -1), "bad-record");
	}
	luaL_pushresultsize(&b, t.len);
	lua_pushinteger(L, t.usage);
	lua_pushinteger(L, t.selector);
	lua_pushinteger(L, t.mtype);
	lua_rotate(L, -4, -1);
	return 4;
}

/* dane.openssl_version() -> string */
static int Ldane_openssl_version(lua_State *L) {
	lua_pushstring(L, OpenSSL_version(OPENSSL_VERSION));
	return 1;
}

static const luaL_Reg verifier_meta[] = {
	{ "__gc", Ldane_close },
	{ "__close", Ldane_close },
	{ "__tostring", Ldane_tostring },
	{ NULL, NULL }
};

static const luaL_Reg verifier_methods[] = {
	{ "verify", Ldane_verify },
	{ "stats", Ldane_stats },
	{ "close", Ldane_close },
	{ NULL, NULL }
};

static const luaL_Reg job_meta[] = {
	{ "__gc", job_gc },
	{ "__close", job_gc },
	{ NULL, NULL }
};

static const luaL_Reg dane_functions[] = {
	{ "new", Ldane_new },
	{ "digest", Ldane_digest },
	{ "certinfo", Ldane_certinfo },
	{ "parse_rdata", Ldane_parse_rdata },
	{ "parse_text", Ldane_parse_text },
	{ "openssl_version", Ldane_openssl_version },
	{ NULL, NULL }
};

int luaopen_prosody_native_dane(lua_State *L);
int luaopen_prosody_native_dane(lua_State *L) {
	static const luaL_Reg none[] = { { NULL, NULL } };
	luaL_checkversion(L);
	pn_new_class(L, VERIFIER_MT, verifier_meta, verifier_methods);
	pn_new_class(L, JOB_MT, job_meta, none);
	luaL_newlib(L, dane_functions);
	lua_pushinteger(L, PN_ABI);
	lua_setfield(L, -2, "_ABI");
	return 1;
}
