# prosody-native developer Makefile.
#   make              build every native engine into build/prosody_native/
#   make check        build, then run every test (unit, integration, install paths)
#   make check-asan   the same tests with the engines built with ASan + UBSan
#   make bench        benchmarks, side by side with the Prosody drivers they replace
#   make demo         the local webchat demo (see README)
#   make install      shims to $(PLUGINDIR), engines to $(LUA_CMOD)/prosody_native
# The rockspec builds the same sources for luarocks; flags live here and there.

PREFIX    ?= /usr/local
LUA_CMOD  ?= $(PREFIX)/lib/lua/5.4
LUA_LMOD  ?= $(PREFIX)/share/lua/5.4
PLUGINDIR ?= $(PREFIX)/lib/prosody/modules
DESTDIR   ?=

CC        ?= cc
OPTFLAGS  ?= -O2 -g
WARNFLAGS  = -std=c99 -Wall -Wextra -Wshadow -pedantic -Wformat=2 \
             -Wmissing-prototypes -Wstrict-prototypes -Wpointer-arith -Wcast-qual
LUA_CFLAGS := $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
ALL_CFLAGS = $(OPTFLAGS) $(WARNFLAGS) $(EXTRA_CFLAGS) -fPIC -D_GNU_SOURCE $(LUA_CFLAGS)
LDFLAGS_SO = -shared $(EXTRA_LDFLAGS)

BUILD     ?= build
# One engine per csrc/*.c file; its extra link flags in <engine>_LIBS.
ENGINES    = $(basename $(notdir $(wildcard csrc/*.c)))
SOS        = $(ENGINES:%=$(BUILD)/prosody_native/%.so)

archive_LIBS = -lsqlite3 -lpthread
dane_LIBS = -lssl -lcrypto

.PHONY: all check check-asan bench demo install uninstall deps clean asan-build
all: $(SOS)

$(BUILD)/prosody_native/%.so: csrc/%.c csrc/pn_common.h
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS_SO) -o $@ $< $($*_LIBS)

# Installs the Debian packages the tests need when run as root; says what is missing otherwise.
deps:
	@sh spec/deps.sh

check: deps all
	@sh spec/run

ASAN_FLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
asan-build:
	$(MAKE) BUILD=build-asan EXTRA_CFLAGS="$(ASAN_FLAGS)" EXTRA_LDFLAGS="$(ASAN_FLAGS)" OPTFLAGS="-O1 -g" all

check-asan: deps asan-build
	@PN_BUILD=build-asan PN_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	 ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	 sh spec/run

bench: deps all
	@sh bench/run

demo: all
	@sh demo/run

install: all
	install -d $(DESTDIR)$(LUA_CMOD)/prosody_native $(DESTDIR)$(PLUGINDIR)
	install -m 0644 $(SOS) $(DESTDIR)$(LUA_CMOD)/prosody_native/
	install -m 0644 modules/*.lua $(DESTDIR)$(PLUGINDIR)/

uninstall:
	rm -rf $(DESTDIR)$(LUA_CMOD)/prosody_native
	cd modules && for f in *.lua; do rm -f $(DESTDIR)$(PLUGINDIR)/$$f; done

clean:
	rm -rf build build-asan build-fuzz .rocks spec/out

# Coverage-guided fuzzing of the parsers of untrusted bytes (libFuzzer, clang).
FUZZ_SECONDS ?= 60
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined $(WARNFLAGS) -Wno-missing-prototypes -D_GNU_SOURCE $(LUA_CFLAGS)
# Each target is fuzz/<name>.c, which includes the source of the engine it fuzzes.
build-fuzz/%_fuzz: fuzz/%_fuzz.c csrc/pn_common.h
	@mkdir -p $(@D)
	clang $(FUZZ_FLAGS) -o $@ $< -llua5.4 $(FUZZ_LIBS_$*) -lm
build-fuzz/archive_decode_fuzz: csrc/archive.c
FUZZ_LIBS_archive_decode = -lsqlite3 -lpthread
build-fuzz/limiter_parse_fuzz: csrc/limiter.c
build-fuzz/smqueue_stanza_fuzz: csrc/smqueue.c
build-fuzz/dane_record_fuzz: csrc/dane.c
FUZZ_LIBS_dane_record = -lssl -lcrypto

# $(call fuzz_corpus,SEEDS,DIR): one seed file in DIR per line of SEEDS
define fuzz_corpus
@mkdir -p $(2)
@i=0; while IFS= read -r s; do i=$$((i+1)); printf '%s' "$$s" > $(2)/seed$$i; done < $(1)
endef

# The archive engine's value decoder (make fuzz).
.PHONY: fuzz
fuzz: all build-fuzz/archive_decode_fuzz
	@mkdir -p build-fuzz/corpus
	LUA_CPATH="$(BUILD)/?.so;;" lua5.4 fuzz/seeds.lua build-fuzz/corpus
	build-fuzz/archive_decode_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=4096 build-fuzz/corpus

# The limiter's address, prefix and rate parsers (make fuzz-limiter).
.PHONY: fuzz-limiter
fuzz-limiter: build-fuzz/limiter_parse_fuzz
	$(call fuzz_corpus,fuzz/limiter_seeds.txt,build-fuzz/limiter-corpus)
	build-fuzz/limiter_parse_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=128 build-fuzz/limiter-corpus

# The smqueue engine's recognition of stanzas in written bytes (make fuzz-smqueue).
.PHONY: fuzz-smqueue
fuzz-smqueue: build-fuzz/smqueue_stanza_fuzz
	$(call fuzz_corpus,fuzz/smqueue_seeds.txt,build-fuzz/smqueue-corpus)
	build-fuzz/smqueue_stanza_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=512 build-fuzz/smqueue-corpus

# The dane engine's TLSA rdata/text and certificate chain parsers (make fuzz-dane).
.PHONY: fuzz-dane
fuzz-dane: build-fuzz/dane_record_fuzz
	$(call fuzz_corpus,fuzz/dane_seeds.txt,build-fuzz/dane-corpus)
	@printf '\003\001\001' > build-fuzz/dane-corpus/rdata-short
	@openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null -subj /CN=seed -days 1 \
	  -outform DER -out build-fuzz/dane-corpus/cert.der 2>/dev/null
	@openssl x509 -inform DER -in build-fuzz/dane-corpus/cert.der -out build-fuzz/dane-corpus/cert.pem
	build-fuzz/dane_record_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=4096 build-fuzz/dane-corpus
