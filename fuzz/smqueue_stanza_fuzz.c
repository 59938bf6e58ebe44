/* libFuzzer target: the smqueue engine's recognition of the stanzas XEP-0198 counts
 * in bytes written to a stream (queue:push_stanza). The bytes are the server's own
 * serialization, but what is inside a stanza comes from remote users. What is
 * recognised must really start with that stanza's start tag:
 *  - "<" and the kind's name, then white space, '>' or '/';
 *  - a start tag with no namespace is recognised whatever namespace is expected, and
 *    one recognised with no namespace expected has no xmlns attribute, so it is also
 *    recognised when one is;
 * and the same input always gives the same answer. Built by `make fuzz-smqueue`. */
#include <stddef.h>
#include <stdint.h>

#include "../csrc/smqueue.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const kind_names[] = { NULL, "message", "presence", "iq" };

/* aborts unless s starts with the start tag of that kind of stanza */
static void check_start_tag(const char *s, size_t size, int kind) {
	size_t n;
	if(kind < 1 || kind > 3)
		abort();
	n = strlen(kind_names[kind]);
	if(size < n + 2 || s[0] != '<' || memcmp(s + 1, kind_names[kind], n) != 0)
		abort();
	if(!is_space(s[n + 1]) && s[n + 1] != '>' && s[n + 1] != '/')
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
	const char *s = (const char *)data;
	static const char ns[] = "jabber:client";
	int plain = smq_stanza_kind(s, size, NULL, 0);
	int with_ns = smq_stanza_kind(s, size, ns, sizeof ns - 1);
	if(plain) {
		check_start_tag(s, size, plain);
		if(with_ns != plain)
			abort();
	}
	if(with_ns)
		check_start_tag(s, size, with_ns);
	if(smq_stanza_kind(s, size, ns, sizeof ns - 1) != with_ns)
		abort();
	return 0;
}
