/* prosody-native: limiter engine -- a fixed-capacity rate and ban table keyed by
 * network address and prefix.
 * Copyright (c) prosody-native contributors. MIT licence.
 *
 * Addresses are 16-byte keys in network order; IPv4 (and IPv4-mapped IPv6) is
 * held as ::ffff:a.b.c.d, so a prefix length is always in IPv6 bits (an IPv4 /24
 * is 120). Two tables, both allocated once at creation and never grown:
 *
 *  - the rate table: GCRA state (theoretical arrival time) per (rule, prefix),
 *    32 bytes per entry in 4-way sets. A key may live in either of two sets, both
 *    chosen by one keyed multiply-mix hash; a new key goes to the emptier one, so
 *    keys rarely compete for a set before the table is well filled (with one set,
 *    a table a third full already evicted live state). A miss takes an empty way,
 *    else an idle one (bucket full again: nothing to remember), else the stalest,
 *    longest prefix first -- so per-address state fails open under a flood while
 *    the prefix and global entries, touched on every check, stay.
 *  - the offender table: strikes, ban level and ban expiry per prefix, 8-way sets.
 *    Active bans are never evicted; otherwise the least offending, then the least
 *    recent entry goes.
 *
 * A check allocates nothing. Time comes from CLOCK_MONOTONIC_COARSE (plus a skew
 * that tests and operators may advance), or from a manual clock. The engine knows
 * nothing about Prosody: policy (which rule, which prefix, what to do when refused)
 * belongs to the shim.
 */

#include <arpa/inet.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pn_common.h"

#define LIMITER_MT "prosody_native.limiter"
#define BUCKET_MT "prosody_native.limiter.bucket"
#define MAX_RULES 64
#define MAX_LEVELS 8
#define RULE_NAME 32
#define RATE_WAYS 4
#define OFF_WAYS 8
#define US 1000000.0
#define MAX_TEXT 64
#define PREFIX_TEXT 80 /* INET6_ADDRSTRLEN + "/" + any int */

/* ---------------------------------------------------------------- addresses */

/* Parses an IPv4 or IPv6 address (optionally in brackets, IPv6 zone id ignored)
 * into a 16-byte key; IPv4 and IPv4-mapped IPv6 become ::ffff:a.b.c.d.
 * Returns 4 or 6 (the family), 0 when the text is not an address. */
static int lim_parse_address(const char *s, size_t len, unsigned char out[16]) {
	char buf[MAX_TEXT];
	size_t n = len;
	const char *p = s;
	unsigned char v4[4];
	if(n >= 2 && p[0] == '[' && p[n - 1] == ']') {
		p++;
		n -= 2;
	}
	if(n == 0 || n >= MAX_TEXT || memchr(p, '\0', n))
		return 0;
	memcpy(buf, p, n);
	buf[n] = '\0';
	if(strchr(buf, ':')) {
		char *zone = strchr(buf, '%');
		if(zone) {
			if(zone[1] == '\0')
				return 0;
			*zone = '\0';
		}
		if(inet_pton(AF_INET6, buf, out) != 1)
			return 0;
		{
			static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
			return memcmp(out, mapped, 12) == 0 ? 4 : 6;
		}
	}
	if(inet_pton(AF_INET, buf, v4) != 1)
		return 0;
	memset(out, 0, 10);
	out[10] = out[11] = 0xff;
	memcpy(out + 12, v4, 4);
	return 4;
}

static int key_is_v4(const unsigned char k[16]) {
	static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	return memcmp(k, mapped, 12) == 0;
}

/* Clears every bit after the first plen bits (plen in IPv6 bits, 0..128). */
static void mask_key(unsigned char k[16], int plen) {
	int i;
	for(i = 0; i < 16; i++) {
		int keep = plen - i * 8;
		if(keep >= 8)
			continue;
		k[i] &= keep <= 0 ? 0 : (unsigned char)(0xff << (8 - keep));
	}
}

/* Parses "address" or "address/length" (IPv4 length 0..32, IPv6 0..128) into a
 * masked key and a prefix length in IPv6 bits. Returns 0 on success, -1 otherwise. */
static int lim_parse_prefix(const char *s, size_t len, unsigned char out[16], int *plen) {
	const char *slash = memchr(s, '/', len);
	int fam, bits = -1;
	if(slash) {
		const char *d = slash + 1, *end = s + len;
		if(d == end || end - d > 3)
			return -1;
		bits = 0;
		for(; d < end; d++) {
			if(*d < '0' || *d > '9')
				return -1;
			bits = bits * 10 + (*d - '0');
		}
		if(end - slash > 2 && slash[1] == '0')
			return -1; /* no leading zeros */
		len = (size_t)(slash - s);
	}
	fam = lim_parse_address(s, len, out);
	if(!fam)
		return -1;
	if(bits < 0)
		bits = fam == 4 ? 32 : 128;
	if(fam == 4) {
		if(bits > 32)
			return -1;
		bits += 96;
	} else if(bits > 128)
		return -1;
	mask_key(out, bits);
	*plen = bits;
	return 0;
}

/* Writes the text form of a key and prefix length ("192.0.2.0/24", "2001:db8::/48",
 * "192.0.2.1" for a whole address) into buf. */
static void lim_format_prefix(const unsigned char k[16], int plen, char *buf, size_t size) {
	char addr[INET6_ADDRSTRLEN];
	if(key_is_v4(k) && plen >= 96) {
		inet_ntop(AF_INET, k + 12, addr, sizeof addr);
		if(plen == 128)
			snprintf(buf, size, "%s", addr);
		else
			snprintf(buf, size, "%s/%d", addr, plen - 96);
		return;
	}
	inet_ntop(AF_INET6, k, addr, sizeof addr);
	if(plen == 128)
		snprintf(buf, size, "%s", addr);
	else
		snprintf(buf, size, "%s/%d", addr, plen);
}

/* ---------------------------------------------------------------- rates */

static int match_word(const char **p, const char *end, const char *const *words) {
	size_t n = 0;
	while(*p + n < end && ((*p)[n] >= 'a' && (*p)[n] <= 'z'))
		n++;
	for(; *words; words++) {
		if(strlen(*words) == n && memcmp(*words, *p, n) == 0) {
			*p += n;
			return 1;
		}
	}
	return 0;
}

static void skip_space(const char **p, const char *end) {
	while(*p < end && (**p == ' ' || **p == '\t'))
		(*p)++;
}

/* Reads a non-negative decimal number (digits with an optional fraction). */
static int read_number(const char **p, const char *end, double *v) {
	double x = 0, scale = 0.1;
	int digits = 0;
	while(*p < end && **p >= '0' && **p <= '9') {
		x = x * 10 + (**p - '0');
		(*p)++;
		if(++digits > 12)
			return 0;
	}
	if(*p < end && **p == '.') {
		(*p)++;
		while(*p < end && **p >= '0' && **p <= '9') {
			x += (**p - '0') * scale;
			scale /= 10;
			(*p)++;
			if(++digits > 18)
				return 0;
		}
	}
	*v = x;
	return digits > 0;
}

/* Parses "<count>/<period>[ burst <n>]": count a decimal, period an optional number
 * and a unit (s, sec, second(s), m, min, minute(s), h, hour(s), d, day(s)), e.g.
 * "10/min", "3/s burst 10", "2/10min". Burst defaults to the count (at least 1).
 * Returns 0 with the rate in events per second and the burst, -1 otherwise. */
static int lim_parse_rate(const char *s, size_t len, double *rate, double *burst) {
	static const char *const secs[] = { "s", "sec", "secs", "second", "seconds", NULL };
	static const char *const mins[] = { "m", "min", "mins", "minute", "minutes", NULL };
	static const char *const hours[] = { "h", "hour", "hours", NULL };
	static const char *const days[] = { "d", "day", "days", NULL };
	static const char *const burst_word[] = { "burst", NULL };
	const char *p = s, *end = s + len;
	double count, period = 1, unit, b;
	skip_space(&p, end);
	if(!read_number(&p, end, &count) || count <= 0)
		return -1;
	skip_space(&p, end);
	if(p >= end || *p != '/')
		return -1;
	p++;
	skip_space(&p, end);
	if(p < end && ((*p >= '0' && *p <= '9') || *p == '.')) {
		if(!read_number(&p, end, &period) || period <= 0)
			return -1;
		skip_space(&p, end);
	}
	if(match_word(&p, end, secs))
		unit = 1;
	else if(match_word(&p, end, mins))
		unit = 60;
	else if(match_word(&p, end, hours))
		unit = 3600;
	else if(match_word(&p, end, days))
		unit = 86400;
	else
		return -1;
	b = floor(count) >= 1 ? floor(count) : 1;
	skip_space(&p, end);
	if(p < end) {
		const char *q = p;
		if(!match_word(&p, end, burst_word) || p == q)
			return -1;
		skip_space(&p, end);
		if(!read_number(&p, end, &b) || b < 1 || b != floor(b) || b > 1e6)
			return -1;
		skip_space(&p, end);
		if(p != end)
			return -1;
	}
	*rate = count / (period * unit);
	if(!(*rate > 1e-9 && *rate <= 1e9) || b > 1e6)
		return -1;
	*burst = b;
	return 0;
}

/* ---------------------------------------------------------------- hashing */

/* A keyed 64-bit mix (two folded 64x64->128 multiplications, as wyhash does) of the
 * masked address and the (prefix, rule) word. Attackers choose IPv6 low bits, so
 * the set an address lands in must depend on a secret: the seeds are random per
 * table unless a test fixes them. */
__extension__ typedef unsigned __int128 pn_u128;

static uint64_t mum(uint64_t a, uint64_t b) {
	pn_u128 r = (pn_u128)a * b;
	return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static uint64_t keyed_hash(uint64_t k0, uint64_t k1, uint64_t a, uint64_t b, uint64_t c) {
	uint64_t h = mum(a ^ k0 ^ 0xa0761d6478bd642fULL, b ^ k1 ^ 0xe7037ed1a0b428dbULL);
	return mum(h ^ c ^ 0x8ebc6af09c88c6e3ULL, k0 ^ k1 ^ 0x589965cc75374cc3ULL);
}

/* The key as two big-endian 64-bit words, so prefixes are masks of high bits. */
static void key_words(const unsigned char k[16], uint64_t *hi, uint64_t *lo) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	memcpy(hi, k, 8);
	memcpy(lo, k + 8, 8);
	*hi = __builtin_bswap64(*hi);
	*lo = __builtin_bswap64(*lo);
#else
	int i;
	*hi = *lo = 0;
	for(i = 0; i < 8; i++) {
		*hi = (*hi << 8) | k[i];
		*lo = (*lo << 8) | k[i + 8];
	}
#endif
}

static void words_key(uint64_t hi, uint64_t lo, unsigned char k[16]) {
	int i;
	for(i = 7; i >= 0; i--) {
		k[i] = (unsigned char)(hi & 0xff);
		k[i + 8] = (unsigned char)(lo & 0xff);
		hi >>= 8;
		lo >>= 8;
	}
}

static void mask_words(uint64_t *hi, uint64_t *lo, int plen) {
	if(plen <= 64) {
		*hi &= plen == 0 ? 0 : ~(uint64_t)0 << (64 - plen);
		*lo = 0;
	} else if(plen < 128) {
		*lo &= ~(uint64_t)0 << (128 - plen);
	}
}

/* ---------------------------------------------------------------- tables */

typedef struct {
	uint64_t hi, lo;  /* masked address */
	int64_t tat;      /* GCRA theoretical arrival time, µs on the table clock */
	uint32_t last;    /* time of the last charge, in units of 2^20 µs (about 1 s) */
	uint8_t plen, rule, used, pad;
} rate_entry;

typedef struct {
	uint64_t hi, lo;
	int64_t ban_until;  /* µs; <= now: not banned */
	int64_t last;       /* µs; strikes are forgiven one per period from here */
	int64_t level_at;   /* µs; the ban level decays from here (or ban end) */
	double strikes;
	uint32_t refused;   /* strikes ever reported against this prefix */
	uint16_t bans;      /* bans ever given */
	uint8_t plen, level, used, pad[3];
} offender;

typedef struct {
	uint8_t family;     /* 0 any, 4, 6 */
	uint8_t plen;       /* in IPv6 bits */
	int64_t interval;   /* µs per event */
	int64_t capacity;   /* burst × interval */
	double rate, burst;
} level_def;

typedef struct {
	char name[RULE_NAME];
	int nlevels;
	level_def levels[MAX_LEVELS];
} rule_def;

typedef struct {
	rate_entry *rate;       /* NULL once closed */
	size_t rate_sets;       /* power of two */
	offender *off;
	size_t off_sets;
	uint64_t seed0, seed1;
	int manual;
	int64_t base_ns, skew, manual_now;
	/* bans: `strikes` strikes leak away over `window`; a ban lasts
	 * initial × factor^level, at most max; the level drops by one per `forgive`
	 * after a ban ends */
	double strike_limit;
	int64_t window, ban_initial, ban_max, forgive;
	double factor;
	int nrules;
	rule_def rules[MAX_RULES];
	uint64_t ban_plens[3];  /* prefix lengths that have ever been banned */
	size_t tracked, offenders;
	uint64_t evict_idle, evict_busy, off_evict, off_full, checks, refusals;
} limiter;

typedef struct {
	int64_t tat, interval, capacity;
	double rate, burst;
	limiter *l; /* kept alive by the bucket's user value; saves a lookup per take */
} bucket;

/* One rule checked for one address, for as long as a session lives: the key is
 * split once, and each level remembers where its entry was, so a repeat check
 * needs no hashing as long as the entry still holds that key. */
typedef struct {
	limiter *l;
	uint64_t hi, lo;
	int rule, fam;
	int64_t max_wait;          /* µs, when a call passes none */
	uint32_t hint[MAX_LEVELS]; /* rate-table index + 1 of each level's entry; 0: unknown */
} handle;

/* Nanoseconds on the clock the table runs on (the coarse one costs a third). */
static int64_t clock_ns(void) {
	struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
	clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* µs since the table was created (never negative: 0 means "never" in entries). */
static int64_t now_us(limiter *l) {
	if(l->manual)
		return l->manual_now;
	return (clock_ns() - l->base_ns) / 1000 + l->skew;
}

/* The two sets a key may live in (they may be the same set). */
static void rate_sets_of(limiter *l, uint64_t hi, uint64_t lo, int plen, int rule, rate_entry *sets[2]) {
	uint64_t h = keyed_hash(l->seed0, l->seed1, hi, lo, (uint64_t)plen | (uint64_t)rule << 8);
	sets[0] = l->rate + (size_t)(h & (l->rate_sets - 1)) * RATE_WAYS;
	sets[1] = l->rate + (size_t)((h >> 32) & (l->rate_sets - 1)) * RATE_WAYS;
}

static size_t off_set(limiter *l, uint64_t hi, uint64_t lo, int plen) {
	return (size_t)keyed_hash(l->seed1, l->seed0, hi, lo, (uint64_t)plen | (uint64_t)0xff << 8) & (l->off_sets - 1);
}

/* The key's entry or NULL; `sets` (if not NULL) gets the key's two sets for rate_insert. */
static rate_entry *rate_find(limiter *l, uint64_t hi, uint64_t lo, int plen, int rule, rate_entry *sets_out[2]) {
	rate_entry *own[2], **sets = sets_out ? sets_out : own;
	int s, i;
	rate_sets_of(l, hi, lo, plen, rule, sets);
	for(s = 0; s < 2; s++) {
		for(i = 0; i < RATE_WAYS; i++) {
			rate_entry *e = &sets[s][i];
			if(e->used && e->hi == hi && e->lo == lo && e->plen == plen && e->rule == rule)
				return e;
		}
	}
	return NULL;
}

static int rate_set_free(const rate_entry *set) {
	int i, n = 0;
	for(i = 0; i < RATE_WAYS; i++)
		n += !set[i].used;
	return n;
}

/* Takes a way in `sets` (the key's two, from rate_find) for a new key: empty (in
 * the emptier set), else idle, else the stalest (longest prefix on a tie); never
 * one of `avoid` (entries the current check still holds). */
static rate_entry *rate_insert(limiter *l, rate_entry *sets[2], uint64_t hi, uint64_t lo, int plen, int rule,
		int64_t now, rate_entry *const *avoid, int navoid) {
	rate_entry *victim = NULL;
	int s, i, j, idle = 0;
	if(rate_set_free(sets[1]) > rate_set_free(sets[0])) {
		rate_entry *t = sets[0];
		sets[0] = sets[1];
		sets[1] = t;
	}
	for(s = 0; s < 2 && idle != -1; s++) {
		for(i = 0; i < RATE_WAYS; i++) {
			rate_entry *e = &sets[s][i];
			int held = 0;
			for(j = 0; j < navoid; j++)
				held |= avoid[j] == e;
			if(held)
				continue;
			if(!e->used) {
				victim = e;
				idle = -1;
				break;
			}
			if(e->tat <= now) {
				if(!idle || e->last < victim->last) {
					victim = e;
					idle = 1;
				}
			} else if(!idle && (!victim || e->last < victim->last
					|| (e->last == victim->last && e->plen > victim->plen))) {
				victim = e;
			}
		}
	}
	if(!victim)
		return NULL; /* every way held by this very check: fail open */
	if(idle == -1)
		l->tracked++;
	else if(idle)
		l->evict_idle++;
	else
		l->evict_busy++;
	victim->hi = hi;
	victim->lo = lo;
	victim->plen = (uint8_t)plen;
	victim->rule = (uint8_t)rule;
	victim->used = 1;
	victim->tat = now;
	return victim;
}

/* Brings strikes and ban level up to date. Strikes are forgiven one at a time, one
 * per window / ban_strikes since the last one was (so ban_strikes strikes within
 * that period always ban, however they are spaced). */
static void off_decay(limiter *l, offender *o, int64_t now) {
	int64_t from, period = (int64_t)((double)l->window / l->strike_limit);
	if(period < 1)
		period = 1;
	if(o->strikes <= 0) {
		o->strikes = 0;
		o->last = now;
	} else if(now - o->last >= period) {
		int64_t steps = (now - o->last) / period;
		if((double)steps >= o->strikes) {
			o->strikes = 0;
			o->last = now;
		} else {
			o->strikes -= (double)steps;
			o->last += steps * period;
		}
	}
	from = o->level_at > o->ban_until ? o->level_at : o->ban_until;
	if(o->level > 0 && now - from >= l->forgive) {
		int64_t steps = (now - from) / l->forgive;
		if(steps >= o->level) {
			o->level = 0;
			o->level_at = now;
		} else {
			o->level = (uint8_t)(o->level - steps);
			o->level_at = from + steps * l->forgive;
		}
	}
}

static offender *off_find(limiter *l, uint64_t hi, uint64_t lo, int plen) {
	offender *set = l->off + off_set(l, hi, lo, plen) * OFF_WAYS;
	int i;
	for(i = 0; i < OFF_WAYS; i++)
		if(set[i].used && set[i].hi == hi && set[i].lo == lo && set[i].plen == plen)
			return &set[i];
	return NULL;
}

/* Takes a way for a new offender: empty, else the least offending, least recent
 * entry that is not banned; NULL when every way holds an active ban. */
static offender *off_insert(limiter *l, uint64_t hi, uint64_t lo, int plen, int64_t now) {
	offender *set = l->off + off_set(l, hi, lo, plen) * OFF_WAYS;
	offender *victim = NULL;
	double vscore = 0;
	int i;
	for(i = 0; i < OFF_WAYS; i++) {
		offender *e = &set[i];
		double score;
		if(!e->used) {
			victim = e;
			l->offenders++;
			goto take;
		}
		if(e->ban_until > now)
			continue;
		off_decay(l, e, now);
		score = e->level * 1000.0 + e->strikes;
		if(!victim || score < vscore || (score == vscore && e->last < victim->last)) {
			victim = e;
			vscore = score;
		}
	}
	if(!victim) {
		l->off_full++;
		return NULL;
	}
	l->off_evict++;
take:
	memset(victim, 0, sizeof *victim);
	victim->hi = hi;
	victim->lo = lo;
	victim->plen = (uint8_t)plen;
	victim->used = 1;
	victim->last = now;
	victim->level_at = now;
	return victim;
}

static int64_t ban_duration(limiter *l, int level) {
	double d = (double)l->ban_initial * pow(l->factor, level);
	return d >= (double)l->ban_max ? l->ban_max : (int64_t)d;
}

static void mark_plen(limiter *l, int plen) {
	l->ban_plens[plen / 64] |= (uint64_t)1 << (plen % 64);
}

/* rate_find, first trying the entry a handle remembered (and remembering the answer).
 * `sets` is filled only when the remembered entry is not the key's. */
static rate_entry *rate_find_hinted(limiter *l, uint64_t hi, uint64_t lo, int plen, int rule, uint32_t *hint,
		rate_entry *sets[2]) {
	rate_entry *e;
	if(hint && *hint) {
		e = &l->rate[*hint - 1];
		if(e->used && e->hi == hi && e->lo == lo && e->plen == plen && e->rule == rule)
			return e;
	}
	e = rate_find(l, hi, lo, plen, rule, sets);
	if(hint)
		*hint = e ? (uint32_t)(e - l->rate) + 1 : 0;
	return e;
}

/* ---------------------------------------------------------------- GCRA */

/* Checks one rule against every level that applies to the key's family; charges all
 * of them when the worst wait is within max_wait. Returns 1 (allowed) or 0, the
 * wait in µs and the index of the limiting level (-1 if none). `hints` (one per
 * level, or NULL) are a handle's remembered entries. */
static int check_words(limiter *l, int rule, uint64_t hi, uint64_t lo, int fam, double cost, int64_t max_wait,
		uint32_t *hints, int64_t *wait_out, int *level_out) {
	const rule_def *r = &l->rules[rule - 1];
	rate_entry *held[MAX_LEVELS];
	rate_entry *sets[MAX_LEVELS][2]; /* a missing key's two sets, from the lookup to the insert */
	int64_t newtat[MAX_LEVELS];
	int64_t now = now_us(l), worst = 0;
	int i, lvl = -1;
	l->checks++;
	for(i = 0; i < r->nlevels; i++) {
		const level_def *d = &r->levels[i];
		uint64_t h = hi, w = lo;
		int64_t tat, excess;
		held[i] = NULL;
		if(d->family && d->family != fam) {
			newtat[i] = -1;
			continue;
		}
		mask_words(&h, &w, d->plen);
		held[i] = rate_find_hinted(l, h, w, d->plen, rule, hints ? &hints[i] : NULL, sets[i]);
		tat = held[i] && held[i]->tat > now ? held[i]->tat : now;
		newtat[i] = tat + (cost == 1 ? d->interval : (int64_t)(cost * (double)d->interval));
		excess = newtat[i] - now - d->capacity;
		if(excess > worst) {
			worst = excess;
			lvl = i;
		}
	}
	*wait_out = worst;
	*level_out = lvl;
	if(worst > max_wait) {
		l->refusals++;
		return 0;
	}
	for(i = 0; i < r->nlevels; i++) {
		const level_def *d = &r->levels[i];
		if(newtat[i] < 0)
			continue;
		if(!held[i]) {
			uint64_t h = hi, w = lo;
			mask_words(&h, &w, d->plen);
			held[i] = rate_insert(l, sets[i], h, w, d->plen, rule, now, held, r->nlevels);
			if(!held[i])
				continue;
			if(hints)
				hints[i] = (uint32_t)(held[i] - l->rate) + 1;
		}
		held[i]->tat = newtat[i];
		held[i]->last = (uint32_t)(now >> 20);
	}
	return 1;
}

static int do_check(limiter *l, int rule, const unsigned char key[16], double cost, int64_t max_wait,
		int64_t *wait_out, int *level_out) {
	uint64_t hi, lo;
	key_words(key, &hi, &lo);
	return check_words(l, rule, hi, lo, key_is_v4(key) ? 4 : 6, cost, max_wait, NULL, wait_out, level_out);
}

/* ---------------------------------------------------------------- Lua helpers */

static limiter *check_open(lua_State *L, int idx) {
	limiter *l = luaL_checkudata(L, idx, LIMITER_MT);
	if(!l->rate)
		luaL_error(L, "attempt to use a closed limiter");
	return l;
}

static const unsigned char *check_key(lua_State *L, int idx) {
	size_t n;
	const char *k = luaL_checklstring(L, idx, &n);
	luaL_argcheck(L, n == 16, idx, "expected a 16-byte address key (from limiter.address)");
	return (const unsigned char *)k;
}

/* An optional prefix length argument; defaults to the whole address. */
static int opt_plen(lua_State *L, int idx) {
	lua_Integer p = luaL_optinteger(L, idx, 128);
	luaL_argcheck(L, p >= 0 && p <= 128, idx, "prefix length must be 0..128 (IPv6 bits)");
	return (int)p;
}

static int check_rule(lua_State *L, limiter *l, int idx) {
	lua_Integer r = luaL_checkinteger(L, idx);
	luaL_argcheck(L, r >= 1 && r <= l->nrules, idx, "unknown rule");
	return (int)r;
}

static void push_prefix(lua_State *L, uint64_t hi, uint64_t lo, int plen) {
	unsigned char k[16];
	char buf[PREFIX_TEXT];
	words_key(hi, lo, k);
	lim_format_prefix(k, plen, buf, sizeof buf);
	lua_pushstring(L, buf);
}

static int64_t seconds_arg(lua_State *L, int idx, const char *what, double min, double max) {
	lua_Number v = luaL_checknumber(L, idx);
	if(!(v >= min && v <= max))
		luaL_error(L, "%s must be from %f to %f seconds", what, min, max);
	return (int64_t)(v * US);
}

/* ---------------------------------------------------------------- module functions */

/* limiter.address(text) -> key16, "ipv4"|"ipv6" | nil, err, "invalid-address" */
static int Laddress(lua_State *L) {
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	unsigned char k[16];
	int fam = lim_parse_address(s, n, k);
	if(!fam)
		return pn_fail(L, "not an IP address", "invalid-address");
	lua_pushlstring(L, (const char *)k, 16);
	lua_pushstring(L, fam == 4 ? "ipv4" : "ipv6");
	return 2;
}

/* limiter.prefix(text) -> key16, prefix_length | nil, err, "invalid-prefix"
 * The length is in IPv6 bits: "192.0.2.0/24" gives 120. */
static int Lprefix(lua_State *L) {
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	unsigned char k[16];
	int plen;
	if(lim_parse_prefix(s, n, k, &plen) != 0)
		return pn_fail(L, "not an IP address or CIDR prefix", "invalid-prefix");
	lua_pushlstring(L, (const char *)k, 16);
	lua_pushinteger(L, plen);
	return 2;
}

/* limiter.format(key16, prefix_length?) -> text */
static int Lformat(lua_State *L) {
	unsigned char k[16];
	char buf[PREFIX_TEXT];
	int plen;
	memcpy(k, check_key(L, 1), 16);
	plen = opt_plen(L, 2);
	mask_key(k, plen);
	lim_format_prefix(k, plen, buf, sizeof buf);
	lua_pushstring(L, buf);
	return 1;
}

/* limiter.parse_rate(text) -> per_second, burst | nil, err, "invalid-rate" */
static int Lparse_rate(lua_State *L) {
	size_t n;
	const char *s = luaL_checklstring(L, 1, &n);
	double rate, burst;
	if(lim_parse_rate(s, n, &rate, &burst) != 0)
		return pn_fail(L, "not a rate like \"10/min\" or \"3/s burst 10\"", "invalid-rate");
	lua_pushnumber(L, rate);
	lua_pushinteger(L, (lua_Integer)burst);
	return 2;
}

static lua_Number opt_field(lua_State *L, int t, const char *field, lua_Number def, lua_Number min, lua_Number max) {
	lua_Number v = pn_opt_number_field(L, t, field, def);
	if(!(v >= min && v <= max))
		luaL_error(L, "option '%s' must be from %f to %f", field, min, max);
	return v;
}

/* limiter.new(options?) -> limiter
 * options: capacity (65536), offenders (4096), clock ("monotonic" | "manual"),
 * seed (16+ byte string; random otherwise), ban_strikes (3; one is forgiven every
 * ban_window / ban_strikes), ban_window (600 s),
 * ban_initial (300 s), ban_factor (2), ban_max (86400 s), ban_forgive (3600 s). */
static int Lnew(lua_State *L) {
	limiter *l;
	lua_Integer cap = 65536, offcap = 4096;
	size_t rate_sets = 1, off_sets = 1;
	const char *clock = "monotonic";
	unsigned char seed[16];
	int have_seed = 0;
	double strikes = 3, window = 600, initial = 300, factor = 2, bmax = 86400, forgive = 3600;
	if(!lua_isnoneornil(L, 1)) {
		luaL_checktype(L, 1, LUA_TTABLE);
		cap = pn_opt_integer_field(L, 1, "capacity", cap);
		offcap = pn_opt_integer_field(L, 1, "offenders", offcap);
		if(lua_getfield(L, 1, "clock") != LUA_TNIL)
			clock = luaL_checkstring(L, -1);
		lua_pop(L, 1);
		if(lua_getfield(L, 1, "seed") != LUA_TNIL) {
			size_t n;
			const char *s = lua_tolstring(L, -1, &n);
			if(!s || n < 16)
				luaL_error(L, "option 'seed' must be a string of at least 16 bytes");
			memcpy(seed, s, 16);
			have_seed = 1;
		}
		lua_pop(L, 1);
		strikes = opt_field(L, 1, "ban_strikes", strikes, 1, 1000);
		window = opt_field(L, 1, "ban_window", window, 1, 86400 * 30);
		initial = opt_field(L, 1, "ban_initial", initial, 1, 86400 * 365);
		factor = opt_field(L, 1, "ban_factor", factor, 1, 100);
		bmax = opt_field(L, 1, "ban_max", bmax, 1, 86400 * 365);
		forgive = opt_field(L, 1, "ban_forgive", forgive, 1, 86400 * 365);
	}
	if(cap < 64 || cap > (1 << 26))
		luaL_error(L, "option 'capacity' must be from 64 to %d", 1 << 26);
	if(offcap < 64 || offcap > (1 << 22))
		luaL_error(L, "option 'offenders' must be from 64 to %d", 1 << 22);
	if(strcmp(clock, "monotonic") != 0 && strcmp(clock, "manual") != 0)
		luaL_error(L, "option 'clock' must be \"monotonic\" or \"manual\", not \"%s\"", clock);
	if(bmax < initial)
		luaL_error(L, "option 'ban_max' must not be less than 'ban_initial'");
	while(rate_sets * RATE_WAYS < (size_t)cap)
		rate_sets <<= 1;
	while(off_sets * OFF_WAYS < (size_t)offcap)
		off_sets <<= 1;
	if(!have_seed && pn_random_bytes(seed, sizeof seed) != 0)
		return pn_fail(L, "cannot read random bytes for the hash seed", "random");

	/* Born closed: a failed allocation below leaves a consistent object for __gc. */
	l = lua_newuserdatauv(L, sizeof *l, 0);
	memset(l, 0, sizeof *l);
	luaL_setmetatable(L, LIMITER_MT);
	l->rate = calloc(rate_sets * RATE_WAYS, sizeof *l->rate);
	l->off = calloc(off_sets * OFF_WAYS, sizeof *l->off);
	if(!l->rate || !l->off) {
		free(l->rate);
		free(l->off);
		l->rate = NULL;
		l->off = NULL;
		return pn_fail(L, "out of memory for the limiter tables", "memory");
	}
	l->rate_sets = rate_sets;
	l->off_sets = off_sets;
	memcpy(&l->seed0, seed, 8);
	memcpy(&l->seed1, seed + 8, 8);
	l->manual = clock[1] == 'a';
	l->base_ns = clock_ns();
	l->strike_limit = strikes;
	l->window = (int64_t)(window * US);
	l->ban_initial = (int64_t)(initial * US);
	l->factor = factor;
	l->ban_max = (int64_t)(bmax * US);
	l->forgive = (int64_t)(forgive * US);
	return 1;
}

/* ---------------------------------------------------------------- methods */

/* lim:close() */
static int Lclose(lua_State *L) {
	limiter *l = luaL_checkudata(L, 1, LIMITER_MT);
	free(l->rate);
	free(l->off);
	l->rate = NULL;
	l->off = NULL;
	return 0;
}

static int Ltostring(lua_State *L) {
	limiter *l = luaL_checkudata(L, 1, LIMITER_MT);
	if(l->rate)
		lua_pushfstring(L, "limiter (%d entries, %d offenders)", (int)(l->rate_sets * RATE_WAYS), (int)(l->off_sets * OFF_WAYS));
	else
		lua_pushliteral(L, "limiter (closed)");
	return 1;
}

/* Reads one level {family=, bits=, rate=, burst=} at the top of the stack. */
static void read_level(lua_State *L, level_def *d) {
	const char *fam;
	lua_Integer bits;
	int t = lua_gettop(L);
	luaL_checktype(L, t, LUA_TTABLE);
	lua_getfield(L, t, "family");
	fam = luaL_optstring(L, -1, "any");
	lua_pop(L, 1);
	bits = pn_opt_integer_field(L, t, "bits", -1);
	d->rate = pn_opt_number_field(L, t, "rate", 0);
	d->burst = pn_opt_number_field(L, t, "burst", 1);
	if(strcmp(fam, "ipv4") == 0) {
		d->family = 4;
		if(bits < 0)
			bits = 32;
		if(bits > 32)
			luaL_error(L, "an IPv4 level must have bits 0..32");
		bits += 96;
	} else if(strcmp(fam, "ipv6") == 0) {
		d->family = 6;
		if(bits < 0)
			bits = 128;
		if(bits > 128)
			luaL_error(L, "an IPv6 level must have bits 0..128");
	} else if(strcmp(fam, "any") == 0) {
		d->family = 0;
		if(bits > 0)
			luaL_error(L, "a level for any family is global: bits must be 0");
		bits = 0;
	} else {
		luaL_error(L, "level family must be \"ipv4\", \"ipv6\" or \"any\", not \"%s\"", fam);
	}
	if(!(d->rate > 1e-9 && d->rate <= 1e9))
		luaL_error(L, "level rate must be a positive number of events per second");
	if(!(d->burst >= 1 && d->burst <= 1e6))
		luaL_error(L, "level burst must be from 1 to 1000000");
	d->plen = (uint8_t)bits;
	d->interval = (int64_t)(US / d->rate);
	if(d->interval < 1)
		d->interval = 1;
	d->capacity = (int64_t)(d->burst * (double)d->interval);
}

/* lim:rule(name, levels) -> id
 * levels: array of { family = "ipv4"|"ipv6"|"any", bits = n, rate = per_second, burst = n }.
 * Defining an existing name again replaces its levels and keeps its id and state. */
static int Lrule(lua_State *L) {
	limiter *l = check_open(L, 1);
	size_t n;
	const char *name = luaL_checklstring(L, 2, &n);
	rule_def r;
	lua_Integer i, count;
	int id;
	luaL_argcheck(L, n > 0 && n < RULE_NAME, 2, "rule name must be 1..31 bytes");
	luaL_checktype(L, 3, LUA_TTABLE);
	count = (lua_Integer)lua_rawlen(L, 3);
	luaL_argcheck(L, count <= MAX_LEVELS, 3, "at most 8 levels per rule");
	memset(&r, 0, sizeof r);
	memcpy(r.name, name, n);
	for(i = 1; i <= count; i++) {
		lua_rawgeti(L, 3, i);
		read_level(L, &r.levels[i - 1]);
		lua_pop(L, 1);
	}
	r.nlevels = (int)count;
	for(id = 0; id < l->nrules; id++)
		if(strcmp(l->rules[id].name, r.name) == 0)
			break;
	if(id == l->nrules) {
		if(l->nrules == MAX_RULES)
			return luaL_error(L, "at most %d rules per limiter", MAX_RULES);
		l->nrules++;
	}
	l->rules[id] = r;
	lua_pushinteger(L, id + 1);
	return 1;
}

/* lim:check(rule, key16, cost?, max_wait?) -> allowed, wait_seconds, limiting_level?
 * Allowed when every level conforms within max_wait seconds (default 0); then all
 * of them are charged. The limiting level is the 1-based index of the worst one. */
static int Lcheck(lua_State *L) {
	limiter *l = check_open(L, 1);
	int rule = check_rule(L, l, 2), lvl;
	const unsigned char *key = check_key(L, 3);
	double cost = luaL_optnumber(L, 4, 1);
	double max_wait = luaL_optnumber(L, 5, 0);
	int64_t wait;
	int ok;
	luaL_argcheck(L, cost >= 0 && cost <= 1e6, 4, "cost must be from 0 to 1000000");
	ok = do_check(l, rule, key, cost, (int64_t)(max_wait * US), &wait, &lvl);
	lua_pushboolean(L, ok);
	lua_pushnumber(L, (double)wait / US);
	if(lvl < 0)
		lua_pushnil(L);
	else
		lua_pushinteger(L, lvl + 1);
	return 3;
}

/* checker(key16, cost?, max_wait?) -> allowed, wait_seconds, limiting_level? */
static int Lchecker_call(lua_State *L) {
	limiter *l = lua_touserdata(L, lua_upvalueindex(1));
	int rule = (int)lua_tointeger(L, lua_upvalueindex(2)), lvl;
	size_t n;
	const char *key = lua_tolstring(L, 1, &n);
	double cost = luaL_optnumber(L, 2, 1);
	double max_wait = luaL_optnumber(L, 3, 0);
	int64_t wait;
	int ok;
	if(!l->rate)
		return luaL_error(L, "attempt to use a closed limiter");
	luaL_argcheck(L, key && n == 16, 1, "expected a 16-byte address key (from limiter.address)");
	luaL_argcheck(L, cost >= 0 && cost <= 1e6, 2, "cost must be from 0 to 1000000");
	ok = do_check(l, rule, (const unsigned char *)key, cost, (int64_t)(max_wait * US), &wait, &lvl);
	lua_pushboolean(L, ok);
	lua_pushnumber(L, (double)wait / US);
	if(lvl < 0)
		lua_pushnil(L);
	else
		lua_pushinteger(L, lvl + 1);
	return 3;
}

/* lim:checker(rule) -> function(key16, cost?, max_wait?) -> allowed, wait_seconds, level?
 * The same check as lim:check bound to one rule, for hot paths. */
static int Lchecker(lua_State *L) {
	limiter *l = check_open(L, 1);
	check_rule(L, l, 2);
	lua_settop(L, 2);
	lua_pushcclosure(L, Lchecker_call, 2);
	return 1;
}

/* handle(cost?, max_wait?) -> allowed, wait_seconds
 * The shim calls it with no arguments once per stanza: that call reads no Lua
 * value at all, since two optional-number reads were a fifth of its cost. */
static int Lhandle_call(lua_State *L) {
	handle *h = lua_touserdata(L, lua_upvalueindex(1));
	limiter *l = h->l;
	double cost = 1;
	int64_t wait, max_wait = h->max_wait;
	int ok, lvl;
	if(!l->rate)
		return luaL_error(L, "attempt to use a closed limiter");
	if(lua_gettop(L) > 0) {
		cost = luaL_optnumber(L, 1, 1);
		luaL_argcheck(L, cost >= 0 && cost <= 1e6, 1, "cost must be from 0 to 1000000");
		if(!lua_isnoneornil(L, 2))
			max_wait = (int64_t)(luaL_checknumber(L, 2) * US);
	}
	if(h->rule > l->nrules)
		return luaL_error(L, "unknown rule");
	ok = check_words(l, h->rule, h->hi, h->lo, h->fam, cost, max_wait, h->hint, &wait, &lvl);
	lua_pushboolean(L, ok);
	lua_pushnumber(L, (double)wait / US);
	return 2;
}

/* lim:handle(rule, key16, max_wait?) -> function(cost?, max_wait?) -> allowed, wait_seconds
 * lim:check(rule, key16, ...) for one session's address, made once per session:
 * repeat checks skip parsing and, while its entries stay, hashing. A call without
 * max_wait accepts the handle's (0 unless given here). */
static int Lhandle(lua_State *L) {
	limiter *l = check_open(L, 1);
	int rule = check_rule(L, l, 2);
	const unsigned char *key = check_key(L, 3);
	int64_t max_wait = lua_isnoneornil(L, 4) ? 0 : seconds_arg(L, 4, "max_wait", 0, 86400);
	handle *h = lua_newuserdatauv(L, sizeof *h, 1);
	memset(h, 0, sizeof *h);
	h->l = l;
	h->rule = rule;
	h->fam = key_is_v4(key) ? 4 : 6;
	h->max_wait = max_wait;
	key_words(key, &h->hi, &h->lo);
	lua_pushvalue(L, 1); /* the handle keeps its limiter alive */
	lua_setiuservalue(L, -2, 1);
	lua_pushcclosure(L, Lhandle_call, 1);
	return 1;
}

/* lim:strike(key16, prefix_length?, weight?) -> ban_seconds | nil, strikes, level, started
 * Counts an offence against the prefix; reaching ban_strikes bans it for
 * ban_initial × ban_factor^level (at most ban_max) and raises its level. While a
 * ban runs, strikes only count: ban_seconds is then what is left of it, and
 * `started` (true only for the strike that began a ban) tells the two apart.
 * nil, "offender table full" when every way of the prefix's set holds an active
 * ban (the caller may strike a shorter prefix). */
static int Lstrike(lua_State *L) {
	limiter *l = check_open(L, 1);
	const unsigned char *key = check_key(L, 2);
	int plen = opt_plen(L, 3);
	double weight = luaL_optnumber(L, 4, 1);
	int64_t now = now_us(l);
	uint64_t hi, lo;
	offender *o;
	luaL_argcheck(L, weight >= 0 && weight <= 1000, 4, "weight must be from 0 to 1000");
	key_words(key, &hi, &lo);
	mask_words(&hi, &lo, plen);
	o = off_find(l, hi, lo, plen);
	if(!o && !(o = off_insert(l, hi, lo, plen, now)))
		return pn_fail(L, "offender table full", "full");
	off_decay(l, o, now);
	o->refused++;
	if(o->ban_until > now) {
		lua_pushnumber(L, (double)(o->ban_until - now) / US);
		lua_pushnumber(L, o->strikes);
		lua_pushinteger(L, o->level);
		lua_pushboolean(L, 0);
		return 4;
	}
	o->strikes += weight;
	if(o->strikes + 1e-9 >= l->strike_limit) {
		int64_t d = ban_duration(l, o->level);
		o->ban_until = now + d;
		o->level_at = now;
		if(o->level < 255)
			o->level++;
		if(o->bans < UINT16_MAX)
			o->bans++;
		o->strikes = 0;
		mark_plen(l, plen);
		lua_pushnumber(L, (double)d / US);
	} else {
		lua_pushnil(L);
	}
	lua_pushnumber(L, o->strikes);
	lua_pushinteger(L, o->level);
	lua_pushboolean(L, !lua_isnil(L, -3));
	return 4;
}

/* lim:banned(key16) -> seconds_left, prefix_length, level | nil
 * The longest-running ban on the address or any banned prefix containing it. */
static int Lbanned(lua_State *L) {
	limiter *l = check_open(L, 1);
	const unsigned char *key = check_key(L, 2);
	int64_t now = now_us(l), best = 0;
	uint64_t hi, lo;
	int w, plen = -1, level = 0;
	key_words(key, &hi, &lo);
	for(w = 0; w < 3; w++) {
		uint64_t bits = l->ban_plens[w];
		while(bits) {
			int b = __builtin_ctzll(bits), p = w * 64 + b;
			uint64_t h = hi, x = lo;
			offender *o;
			bits &= bits - 1;
			mask_words(&h, &x, p);
			o = off_find(l, h, x, p);
			if(o && o->ban_until - now > best) {
				best = o->ban_until - now;
				plen = p;
				level = o->level;
			}
		}
	}
	if(plen < 0) {
		lua_pushnil(L);
		return 1;
	}
	lua_pushnumber(L, (double)best / US);
	lua_pushinteger(L, plen);
	lua_pushinteger(L, level);
	return 3;
}

/* lim:ban(key16, prefix_length?, seconds?) -> seconds | nil, err, "full"
 * Bans the prefix now: for `seconds`, or for the escalating duration (which raises
 * its level, as a strike-out would). */
static int Lban(lua_State *L) {
	limiter *l = check_open(L, 1);
	const unsigned char *key = check_key(L, 2);
	int plen = opt_plen(L, 3);
	int64_t now = now_us(l), d;
	uint64_t hi, lo;
	offender *o;
	key_words(key, &hi, &lo);
	mask_words(&hi, &lo, plen);
	o = off_find(l, hi, lo, plen);
	if(!o && !(o = off_insert(l, hi, lo, plen, now)))
		return pn_fail(L, "offender table full", "full");
	off_decay(l, o, now);
	if(lua_isnoneornil(L, 4)) {
		d = ban_duration(l, o->level);
		if(o->level < 255)
			o->level++;
	} else {
		d = seconds_arg(L, 4, "ban duration", 0.001, 86400.0 * 3650);
	}
	o->ban_until = now + d;
	o->level_at = now;
	o->strikes = 0;
	if(o->bans < UINT16_MAX)
		o->bans++;
	mark_plen(l, plen);
	lua_pushnumber(L, (double)d / US);
	return 1;
}

static int within(uint64_t hi, uint64_t lo, int plen, uint64_t phi, uint64_t plo, int pplen) {
	if(plen < pplen)
		return 0;
	mask_words(&hi, &lo, pplen);
	return hi == phi && lo == plo;
}

/* lim:unban(key16, prefix_length?) -> count
 * Forgets every offender (bans, strikes, levels) inside the prefix. */
static int Lunban(lua_State *L) {
	limiter *l = check_open(L, 1);
	const unsigned char *key = check_key(L, 2);
	int plen = opt_plen(L, 3);
	uint64_t hi, lo;
	size_t i, count = 0;
	key_words(key, &hi, &lo);
	mask_words(&hi, &lo, plen);
	for(i = 0; i < l->off_sets * OFF_WAYS; i++) {
		offender *o = &l->off[i];
		if(o->used && within(o->hi, o->lo, o->plen, hi, lo, plen)) {
			memset(o, 0, sizeof *o);
			l->offenders--;
			count++;
		}
	}
	lua_pushinteger(L, (lua_Integer)count);
	return 1;
}

/* The rule of `to` named as rule `rule` of `from`, or 0. */
static int rule_by_name(const limiter *to, const limiter *from, int rule) {
	int r;
	for(r = 1; r <= to->nrules; r++)
		if(strcmp(to->rules[r - 1].name, from->rules[rule - 1].name) == 0)
			return r;
	return 0;
}

/* Copies the old table's offenders into this one (times moved onto this clock);
 * -> copied, dropped (its sets full of bans). */
static void absorb_offenders(limiter *l, const limiter *old, int64_t delta, lua_Integer *copied, lua_Integer *dropped) {
	size_t j;
	int64_t now = now_us(l);
	for(j = 0; j < old->off_sets * OFF_WAYS; j++) {
		const offender *from = &old->off[j];
		offender *to;
		if(!from->used)
			continue;
		to = off_find(l, from->hi, from->lo, from->plen);
		if(!to && !(to = off_insert(l, from->hi, from->lo, from->plen, now))) {
			(*dropped)++;
			continue;
		}
		*to = *from;
		to->ban_until += delta;
		to->last += delta;
		to->level_at += delta;
		(*copied)++;
	}
	l->ban_plens[0] |= old->ban_plens[0];
	l->ban_plens[1] |= old->ban_plens[1];
	l->ban_plens[2] |= old->ban_plens[2];
}

/* Copies the old table's rate entries of the rules this one also has (by name). */
static void absorb_rates(limiter *l, const limiter *old, int64_t delta, lua_Integer *copied, lua_Integer *dropped) {
	size_t j;
	int64_t now = now_us(l);
	for(j = 0; j < old->rate_sets * RATE_WAYS; j++) {
		const rate_entry *from = &old->rate[j];
		rate_entry *sets[2], *to;
		int rule;
		if(!from->used)
			continue;
		rule = rule_by_name(l, old, from->rule);
		if(!rule || from->tat <= now - delta) { /* no such rule here, or idle: nothing to keep */
			(*dropped)++;
			continue;
		}
		to = rate_find(l, from->hi, from->lo, from->plen, rule, sets);
		if(!to && !(to = rate_insert(l, sets, from->hi, from->lo, from->plen, rule, now, NULL, 0))) {
			(*dropped)++;
			continue;
		}
		to->tat = from->tat + delta;
		to->last = (uint32_t)((((int64_t)from->last << 20) + delta) >> 20);
		(*copied)++;
	}
}

/* lim:absorb(old) -> rate_entries, offenders, dropped
 * Takes over another limiter's state (a larger or smaller table, other ban
 * options): its offenders and bans, and the busy rate entries of the rules both
 * define (matched by name). What does not fit is dropped, idle entries first.
 * The old limiter is left as it was. */
static int Labsorb(lua_State *L) {
	limiter *l = check_open(L, 1);
	limiter *old = check_open(L, 2);
	lua_Integer rates = 0, offenders = 0, dropped = 0;
	int64_t delta;
	uint64_t evicted = l->evict_idle + l->evict_busy;
	luaL_argcheck(L, l != old, 2, "a limiter cannot absorb itself");
	delta = now_us(l) - now_us(old);
	absorb_offenders(l, old, delta, &offenders, &dropped);
	absorb_rates(l, old, delta, &rates, &dropped);
	/* a smaller table makes room by evicting what it took a moment ago */
	evicted = l->evict_idle + l->evict_busy - evicted;
	rates -= (lua_Integer)evicted;
	dropped += (lua_Integer)evicted;
	lua_pushinteger(L, rates);
	lua_pushinteger(L, offenders);
	lua_pushinteger(L, dropped);
	return 3;
}

/* lim:reset(key16?, prefix_length?) -> count
 * Forgets rate state and offenders inside the prefix, or everything. */
static int Lreset(lua_State *L) {
	limiter *l = check_open(L, 1);
	size_t i, count = 0;
	if(lua_isnoneornil(L, 2)) {
		count = l->tracked + l->offenders;
		memset(l->rate, 0, l->rate_sets * RATE_WAYS * sizeof *l->rate);
		memset(l->off, 0, l->off_sets * OFF_WAYS * sizeof *l->off);
		memset(l->ban_plens, 0, sizeof l->ban_plens);
		l->tracked = l->offenders = 0;
	} else {
		const unsigned char *key = check_key(L, 2);
		int plen = opt_plen(L, 3);
		uint64_t hi, lo;
		key_words(key, &hi, &lo);
		mask_words(&hi, &lo, plen);
		for(i = 0; i < l->rate_sets * RATE_WAYS; i++) {
			rate_entry *e = &l->rate[i];
			if(e->used && within(e->hi, e->lo, e->plen, hi, lo, plen)) {
				memset(e, 0, sizeof *e);
				l->tracked--;
				count++;
			}
		}
		for(i = 0; i < l->off_sets * OFF_WAYS; i++) {
			offender *o = &l->off[i];
			if(o->used && within(o->hi, o->lo, o->plen, hi, lo, plen)) {
				memset(o, 0, sizeof *o);
				l->offenders--;
				count++;
			}
		}
	}
	lua_pushinteger(L, (lua_Integer)count);
	return 1;
}

static void push_offender(lua_State *L, limiter *l, offender *o, int64_t now) {
	lua_createtable(L, 0, 8);
	push_prefix(L, o->hi, o->lo, o->plen);
	lua_setfield(L, -2, "prefix");
	lua_pushinteger(L, o->plen);
	lua_setfield(L, -2, "bits");
	lua_pushnumber(L, o->strikes);
	lua_setfield(L, -2, "strikes");
	lua_pushinteger(L, o->level);
	lua_setfield(L, -2, "level");
	lua_pushnumber(L, o->ban_until > now ? (double)(o->ban_until - now) / US : 0);
	lua_setfield(L, -2, "ban_left");
	lua_pushinteger(L, o->refused);
	lua_setfield(L, -2, "refused");
	lua_pushinteger(L, o->bans);
	lua_setfield(L, -2, "bans");
	(void)l;
}

static int64_t g_sort_now;
static int offender_cmp(const void *a, const void *b) {
	const offender *x = *(const offender *const *)a, *y = *(const offender *const *)b;
	int bx = x->ban_until > g_sort_now, by = y->ban_until > g_sort_now;
	if(bx != by)
		return by - bx;
	if(x->level != y->level)
		return y->level - x->level;
	if(x->strikes != y->strikes)
		return y->strikes > x->strikes ? 1 : -1;
	if(x->refused != y->refused)
		return y->refused > x->refused ? 1 : -1;
	return 0;
}

/* lim:top(n?) -> { {prefix=, bits=, strikes=, level=, ban_left=, refused=, bans=}, ... }
 * Offenders, banned first, then by level, strikes and refusals (n defaults to 10). */
static int Ltop(lua_State *L) {
	limiter *l = check_open(L, 1);
	lua_Integer want = luaL_optinteger(L, 2, 10), i, k = 0;
	int64_t now = now_us(l);
	size_t total = l->off_sets * OFF_WAYS, j;
	offender **list;
	luaL_argcheck(L, want >= 0, 2, "count must not be negative");
	list = lua_newuserdatauv(L, (l->offenders + 1) * sizeof *list, 0);
	for(j = 0; j < total && (size_t)k < l->offenders; j++) {
		if(l->off[j].used) {
			off_decay(l, &l->off[j], now);
			list[k++] = &l->off[j];
		}
	}
	g_sort_now = now;
	qsort(list, (size_t)k, sizeof *list, offender_cmp);
	lua_createtable(L, (int)(want < k ? want : k), 0);
	for(i = 0; i < k && i < want; i++) {
		push_offender(L, l, list[i], now);
		lua_rawseti(L, -2, i + 1);
	}
	return 1;
}

/* lim:show(key16, prefix_length?) -> { offenders = {...}, rules = { {rule=, prefix=, tokens=, burst=}, ... } }
 * What the table holds about an address or prefix: offender entries containing it
 * or inside it, and the budget left at every level of every rule that applies. */
static int Lshow(lua_State *L) {
	limiter *l = check_open(L, 1);
	const unsigned char *key = check_key(L, 2);
	int plen = opt_plen(L, 3), fam = key_is_v4(key) ? 4 : 6, r, i, n = 0;
	int64_t now = now_us(l);
	uint64_t hi, lo;
	size_t j;
	key_words(key, &hi, &lo);
	mask_words(&hi, &lo, plen);
	lua_createtable(L, 0, 2);
	lua_newtable(L);
	for(j = 0; j < l->off_sets * OFF_WAYS; j++) {
		offender *o = &l->off[j];
		if(!o->used)
			continue;
		if(within(o->hi, o->lo, o->plen, hi, lo, plen) || within(hi, lo, plen, o->hi, o->lo, o->plen)) {
			off_decay(l, o, now);
			push_offender(L, l, o, now);
			lua_rawseti(L, -2, ++n);
		}
	}
	lua_setfield(L, -2, "offenders");
	lua_newtable(L);
	n = 0;
	for(r = 0; r < l->nrules; r++) {
		for(i = 0; i < l->rules[r].nlevels; i++) {
			const level_def *d = &l->rules[r].levels[i];
			uint64_t h = hi, w = lo;
			rate_entry *e;
			double used;
			if((d->family && d->family != fam) || d->plen > plen)
				continue;
			mask_words(&h, &w, d->plen);
			e = rate_find(l, h, w, d->plen, r + 1, NULL);
			used = e && e->tat > now ? (double)(e->tat - now) / (double)d->interval : 0;
			lua_createtable(L, 0, 5);
			lua_pushstring(L, l->rules[r].name);
			lua_setfield(L, -2, "rule");
			push_prefix(L, h, w, d->plen);
			lua_setfield(L, -2, "prefix");
			lua_pushnumber(L, d->burst - used);
			lua_setfield(L, -2, "tokens");
			lua_pushnumber(L, d->burst);
			lua_setfield(L, -2, "burst");
			lua_pushnumber(L, d->rate);
			lua_setfield(L, -2, "rate");
			lua_rawseti(L, -2, ++n);
		}
	}
	lua_setfield(L, -2, "rules");
	return 1;
}

/* lim:stats() -> { capacity=, tracked=, offender_capacity=, offenders=, bans=, evictions_idle=,
 *   evictions_busy=, offender_evictions=, offender_full=, checks=, refusals=, memory= } */
static int Lstats(lua_State *L) {
	limiter *l = check_open(L, 1);
	int64_t now = now_us(l);
	size_t j, bans = 0;
	for(j = 0; j < l->off_sets * OFF_WAYS; j++)
		if(l->off[j].used && l->off[j].ban_until > now)
			bans++;
	lua_createtable(L, 0, 12);
#define SETI(name, v) do { lua_pushinteger(L, (lua_Integer)(v)); lua_setfield(L, -2, name); } while(0)
	SETI("capacity", l->rate_sets * RATE_WAYS);
	SETI("tracked", l->tracked);
	SETI("offender_capacity", l->off_sets * OFF_WAYS);
	SETI("offenders", l->offenders);
	SETI("bans", bans);
	SETI("evictions_idle", l->evict_idle);
	SETI("evictions_busy", l->evict_busy);
	SETI("offender_evictions", l->off_evict);
	SETI("offender_full", l->off_full);
	SETI("checks", l->checks);
	SETI("refusals", l->refusals);
	SETI("memory", sizeof *l + l->rate_sets * RATE_WAYS * sizeof *l->rate + l->off_sets * OFF_WAYS * sizeof *l->off);
	SETI("entry_size", sizeof(rate_entry));
	SETI("offender_size", sizeof(offender));
#undef SETI
	return 1;
}

/* lim:now() -> seconds on the table clock */
static int Lnow(lua_State *L) {
	limiter *l = check_open(L, 1);
	lua_pushnumber(L, (double)now_us(l) / US);
	return 1;
}

/* lim:advance(seconds) -> now
 * Moves the table clock forward (a manual clock's only way to move; a skew on
 * the monotonic one), e.g. to simulate minutes passing in tests. */
static int Ladvance(lua_State *L) {
	limiter *l = check_open(L, 1);
	int64_t d = seconds_arg(L, 2, "advance", 0, 86400.0 * 3650);
	if(l->manual)
		l->manual_now += d;
	else
		l->skew += d;
	lua_pushnumber(L, (double)now_us(l) / US);
	return 1;
}

/* ---------------------------------------------------------------- per-session buckets */

static void bucket_set(lua_State *L, bucket *b, int ri, int bi) {
	b->rate = luaL_checknumber(L, ri);
	b->burst = luaL_checknumber(L, bi);
	luaL_argcheck(L, b->rate > 1e-9 && b->rate <= 1e9, ri, "rate must be a positive number of events per second");
	luaL_argcheck(L, b->burst >= 1 && b->burst <= 1e6, bi, "burst must be from 1 to 1000000");
	b->interval = (int64_t)(US / b->rate);
	if(b->interval < 1)
		b->interval = 1;
	b->capacity = (int64_t)(b->burst * (double)b->interval);
}

/* lim:bucket(rate, burst) -> bucket
 * A single token bucket on the table's clock, for state that belongs to one
 * session or occupant (created once, checked without allocation). */
static int Lbucket(lua_State *L) {
	limiter *l = check_open(L, 1);
	bucket *b = lua_newuserdatauv(L, sizeof *b, 1);
	memset(b, 0, sizeof *b);
	luaL_setmetatable(L, BUCKET_MT);
	bucket_set(L, b, 2, 3);
	b->tat = now_us(l);
	b->l = l;
	lua_pushvalue(L, 1);
	lua_setiuservalue(L, -2, 1);
	return 1;
}

/* bucket:take(cost?, max_wait?) -> allowed, wait_seconds */
static int Lbucket_take(lua_State *L) {
	bucket *b = luaL_checkudata(L, 1, BUCKET_MT);
	double cost = luaL_optnumber(L, 2, 1), max_wait = luaL_optnumber(L, 3, 0);
	limiter *l = b->l;
	int64_t now, tat, excess;
	if(!l->rate)
		return luaL_error(L, "attempt to use a closed limiter");
	luaL_argcheck(L, cost >= 0 && cost <= 1e6, 2, "cost must be from 0 to 1000000");
	now = now_us(l);
	tat = (b->tat > now ? b->tat : now) + (int64_t)(cost * (double)b->interval);
	excess = tat - now - b->capacity;
	if(excess > 0 && excess > (int64_t)(max_wait * US)) {
		lua_pushboolean(L, 0);
		lua_pushnumber(L, (double)excess / US);
		return 2;
	}
	b->tat = tat;
	lua_pushboolean(L, 1);
	lua_pushnumber(L, excess > 0 ? (double)excess / US : 0);
	return 2;
}

/* bucket:set(rate, burst) -- new limits, same state */
static int Lbucket_set(lua_State *L) {
	bucket *b = luaL_checkudata(L, 1, BUCKET_MT);
	bucket_set(L, b, 2, 3);
	return 0;
}

/* bucket:tokens() -> tokens left now */
static int Lbucket_tokens(lua_State *L) {
	bucket *b = luaL_checkudata(L, 1, BUCKET_MT);
	limiter *l = b->l;
	int64_t now;
	if(!l->rate)
		return luaL_error(L, "attempt to use a closed limiter");
	now = now_us(l);
	lua_pushnumber(L, b->burst - (b->tat > now ? (double)(b->tat - now) / (double)b->interval : 0));
	return 1;
}

/* ---------------------------------------------------------------- registration */

static const luaL_Reg limiter_meta[] = {
	{ "__gc", Lclose },
	{ "__close", Lclose },
	{ "__tostring", Ltostring },
	{ NULL, NULL }
};

static const luaL_Reg limiter_methods[] = {
	{ "close", Lclose },
	{ "rule", Lrule },
	{ "check", Lcheck },
	{ "checker", Lchecker },
	{ "strike", Lstrike },
	{ "banned", Lbanned },
	{ "ban", Lban },
	{ "unban", Lunban },
	{ "reset", Lreset },
	{ "top", Ltop },
	{ "show", Lshow },
	{ "stats", Lstats },
	{ "now", Lnow },
	{ "advance", Ladvance },
	{ "bucket", Lbucket },
	{ "handle", Lhandle },
	{ "absorb", Labsorb },
	{ NULL, NULL }
};

static const luaL_Reg bucket_meta[] = {
	{ NULL, NULL }
};

static const luaL_Reg bucket_methods[] = {
	{ "take", Lbucket_take },
	{ "set", Lbucket_set },
	{ "tokens", Lbucket_tokens },
	{ NULL, NULL }
};

static const luaL_Reg limiter_functions[] = {
	{ "new", Lnew },
	{ "address", Laddress },
	{ "prefix", Lprefix },
	{ "format", Lformat },
	{ "parse_rate", Lparse_rate },
	{ NULL, NULL }
};

int luaopen_prosody_native_limiter(lua_State *L);
int luaopen_prosody_native_limiter(lua_State *L) {
	luaL_checkversion(L);
	pn_new_class(L, LIMITER_MT, limiter_meta, limiter_methods);
	pn_new_class(L, BUCKET_MT, bucket_meta, bucket_methods);
	luaL_newlib(L, limiter_functions);
	lua_pushinteger(L, PN_ABI);
	lua_setfield(L, -2, "_ABI");
	lua_pushinteger(L, MAX_LEVELS);
	lua_setfield(L, -2, "max_levels");
	return 1;
}
