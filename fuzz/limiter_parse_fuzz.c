/* libFuzzer target: the limiter engine's parsers of untrusted text -- client
 * addresses (from sockets and X-Forwarded-For), CIDR prefixes and rate specs (from
 * the configuration and the admin shell). Every input is fed to all three; what
 * parses must satisfy the engine's invariants, or the target aborts:
 *  - an address is IPv4 exactly when its key is IPv4-mapped, and its text form
 *    parses back to the same key;
 *  - a prefix has no bit set after its length and round-trips through its text;
 *  - a rate is finite and positive, a burst a whole number from 1 to 1e6.
 * Built by `make fuzz-limiter`. */
#include <stddef.h>
#include <stdint.h>

#include "../csrc/limiter.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_zero_tail(const unsigned char k[16], int plen) {
	unsigned char m[16];
	memcpy(m, k, 16);
	mask_key(m, plen);
	if(memcmp(m, k, 16) != 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	const char *s = (const char *)data;
	unsigned char k[16], k2[16];
	char text[PREFIX_TEXT];
	int fam, plen, plen2;
	double rate, burst;

	fam = lim_parse_address(s, size, k);
	if(fam) {
		if((fam == 4) != key_is_v4(k))
			abort();
		lim_format_prefix(k, 128, text, sizeof text);
		if(lim_parse_address(text, strlen(text), k2) != fam || memcmp(k, k2, 16) != 0)
			abort();
	}

	if(lim_parse_prefix(s, size, k, &plen) == 0) {
		if(plen < 0 || plen > 128)
			abort();
		check_zero_tail(k, plen);
		lim_format_prefix(k, plen, text, sizeof text);
		if(lim_parse_prefix(text, strlen(text), k2, &plen2) != 0 || plen2 != plen || memcmp(k, k2, 16) != 0)
			abort();
	}

	if(lim_parse_rate(s, size, &rate, &burst) == 0) {
		if(!(rate > 0 && rate <= 1e9) || !(burst >= 1 && burst <= 1e6) || burst != floor(burst))
			abort();
	}
	return 0;
}
