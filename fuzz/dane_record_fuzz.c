/* libFuzzer target: the dane engine's parsers of untrusted bytes -- TLSA rdata from
 * DNS answers, TLSA presentation text (configuration, the check command), and
 * certificate chains from peers (DER or PEM). Every input is fed to all of them,
 * and every parsed record is handed to OpenSSL's SSL_dane_tlsa_add, which parses
 * Full(0) certificate and SPKI data itself. Invariants, or the target aborts:
 *  - rdata: fields are octets and usage/selector/mtype/data cover the input exactly;
 *  - text: what parses is re-rendered as "u s m HEX" and parses back to the same record;
 *  - chains: between 1 and 32 certificates, or a refusal with a message.
 * Built by `make fuzz-dane`. */
#include <stddef.h>
#include <stdint.h>

#include "../csrc/dane.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static SSL_CTX *fuzz_ctx;

/* As verify does: usable or unusable with a reason, never an internal failure. */
static void add_record(const struct tlsa *t) {
	char why[256];
	int r;
	SSL *ssl = SSL_new(fuzz_ctx);
	if(!ssl)
		abort();
	if(SSL_dane_enable(ssl, "xmpp.dane.example") <= 0)
		abort();
	why[0] = '\0';
	r = tlsa_add(ssl, t, why, sizeof why);
	if(r < 0 || (r == 0 && !why[0]))
		abort();
	ERR_clear_error();
	SSL_free(ssl);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	struct tlsa t, t2;
	const char *why = NULL;
	unsigned char *out, *out2;
	char *text;
	size_t i, n;
	STACK_OF(X509) *chain;
	char err[256];
	int added;

	if(!fuzz_ctx) {
		fuzz_ctx = SSL_CTX_new(TLS_client_method());
		if(!fuzz_ctx || SSL_CTX_dane_enable(fuzz_ctx) <= 0)
			abort();
	}

	if(tlsa_parse_rdata(data, size, &t) == 0) {
		if(size < 3 || t.usage != data[0] || t.selector != data[1] || t.mtype != data[2]
		|| t.data != data + 3 || t.len != size - 3)
			abort();
		add_record(&t);
	} else if(size >= 3) {
		abort();
	}

	out = malloc(size / 2 + 1);
	if(!out)
		return 0;
	if(tlsa_parse_text((const char *)data, size, &t, out, size / 2 + 1, &why) == 0) {
		if(t.usage < 0 || t.usage > 255 || t.selector < 0 || t.selector > 255 || t.mtype < 0 || t.mtype > 255
		|| t.len == 0 || t.len > size / 2)
			abort();
		add_record(&t);
		text = malloc(16 + 2 * t.len);
		out2 = malloc(t.len + 1);
		if(text && out2) {
			n = (size_t)sprintf(text, "%d %d %d ", t.usage, t.selector, t.mtype);
			for(i = 0; i < t.len; i++)
				n += (size_t)sprintf(text + n, "%02X", t.data[i]);
			if(tlsa_parse_text(text, n, &t2, out2, t.len + 1, &why) != 0
			|| t2.usage != t.usage || t2.selector != t.selector || t2.mtype != t.mtype
			|| t2.len != t.len || memcmp(t2.data, t.data, t.len) != 0)
				abort();
		}
		free(text);
		free(out2);
	} else if(!why) {
		abort();
	}
	free(out);

	chain = sk_X509_new_null();
	if(!chain)
		return 0;
	ERR_clear_error();
	added = chain_add_string(chain, (const char *)data, size, err, sizeof err);
	if(added > 0 && (sk_X509_num(chain) != added || added > MAX_CHAIN))
		abort();
	if(added < 0 && !err[0])
		abort();
	sk_X509_pop_free(chain, X509_free);
	ERR_clear_error();
	return 0;
}
