# remarket: build, check, demo, bench, install.
# Libraries come from pkg-config; CFLAGS is yours to override.
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/bin
SHAREDIR ?= $(PREFIX)/share/remarket
MANDIR   ?= $(PREFIX)/share/man
DOCDIR   ?= $(PREFIX)/share/doc/remarket
# systemd reads units from /usr/local/lib/systemd/system and /usr/lib/...
UNITDIR  ?= $(PREFIX)/lib/systemd/system
CC       ?= cc
CFLAGS   ?= -O2 -g
PKGS      = fcgi sqlite3 libcurl libsodium libcrypto
# -Wno-format-truncation: snprintf results that matter are checked; the
# rest are error messages, where a cut is harmless.
RM_CFLAGS = -std=c11 -Wall -Wextra -Werror -Wno-format-truncation -DRM_SHAREDIR='"$(SHAREDIR)"' \
            $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS      = $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lfcgi -lsqlite3 -lcurl -lsodium -lcrypto) -lpthread -lm
SAN       = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
MIGRATIONS = $(sort $(wildcard sql/[0-9]*.sql))

.PHONY: all check check-run unit demo demo-shop bench install clean deps fuzz fuzz-build FORCE

all: remarket

sql_migrations.h: $(MIGRATIONS) scripts/embed-sql.sh
	sh scripts/embed-sql.sh $(MIGRATIONS) > $@.tmp && mv $@.tmp $@

# The binary carries SHAREDIR: the stamp changes (and remarket is rebuilt)
# when it does, so `make; make install PREFIX=/usr` installs a /usr binary.
build/prefix.stamp: FORCE
	@mkdir -p build; echo '$(SHAREDIR)' | cmp -s - $@ || echo '$(SHAREDIR)' > $@

remarket: remarket.c remarket.h sql_migrations.h build/prefix.stamp
	$(CC) $(CFLAGS) $(RM_CFLAGS) -o $@ remarket.c $(LIBS)

# Sanitized program and unit tests for `make check`; a plain unit test
# binary for valgrind (which cannot run ASan binaries).
build/san/remarket: remarket.c remarket.h sql_migrations.h
	@mkdir -p build/san
	$(CC) $(SAN) $(RM_CFLAGS) -o $@ remarket.c $(LIBS)
build/san/unit: tests/unit.c tests/tap.h remarket.c remarket.h sql_migrations.h
	@mkdir -p build/san
	$(CC) $(SAN) $(RM_CFLAGS) -DRM_NO_MAIN -I. -o $@ tests/unit.c remarket.c $(LIBS)
build/plain/unit: tests/unit.c tests/tap.h remarket.c remarket.h sql_migrations.h
	@mkdir -p build/plain
	$(CC) -O0 -g $(RM_CFLAGS) -DRM_NO_MAIN -I. -o $@ tests/unit.c remarket.c $(LIBS)

# libFuzzer targets (tests/fuzz/NAME.c, corpora in tests/fuzz/corpus/NAME/):
# clang with -fsanitize=fuzzer,address,undefined, linked like the unit
# tests. `make check` replays every corpus (tests/15-fuzz-replay.t);
# `make fuzz` runs each target for FUZZ_SECONDS, keeping what it finds in
# build/fuzz/corpus/NAME/ and crashes as build/fuzz/crash-NAME-*.
FUZZ_CC      ?= $(shell command -v clang-14 || command -v clang || echo clang)
FUZZ_SECONDS ?= 60
FUZZ_TARGETS  = ingest http template token csv feedback
FUZZ_SAN      = -g -O1 -fno-omit-frame-pointer -fno-sanitize-recover=all
FUZZ_CFLAGS   = $(RM_CFLAGS) -Wno-unknown-warning-option -DRM_NO_MAIN -I. \
                -DFZ_TEMPLATES='"$(CURDIR)/templates"'
build/fuzz/remarket.o: remarket.c remarket.h sql_migrations.h
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer-no-link,address,undefined $(FUZZ_CFLAGS) -c -o $@ remarket.c
build/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz.h build/fuzz/remarket.o
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer,address,undefined $(FUZZ_CFLAGS) -o $@ $< build/fuzz/remarket.o $(LIBS)
fuzz-build: $(addprefix build/fuzz/,$(FUZZ_TARGETS))
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p build/fuzz/corpus/$$t; \
		dict=; [ -f tests/fuzz/$$t.dict ] && dict=-dict=tests/fuzz/$$t.dict; \
		echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		build/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
			-close_fd_mask=3 -print_final_stats=1 $$dict \
			-artifact_prefix=build/fuzz/crash-$$t- \
			build/fuzz/corpus/$$t tests/fuzz/corpus/$$t || exit 1; \
	done

deps:
	sh scripts/deps.sh test

# The README's test command. Installs what is missing, then builds with
# the sanitizers and runs every test under prove.
check: deps
	$(MAKE) check-run

check-run: remarket build/san/remarket build/san/unit build/plain/unit fuzz-build
	REMARKET_BIN=$(CURDIR)/build/san/remarket \
	FUZZ_BIN_DIR=$(CURDIR)/build/fuzz \
	UNIT_BIN=$(CURDIR)/build/san/unit \
	VALGRIND_UNIT=$(CURDIR)/build/plain/unit \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
	sh -c 'prove --state=save tests/ || { prove -v --state=failed; exit 1; }'

unit: build/san/unit
	./build/san/unit

# Three days of the flows in seconds; at a terminal, then the demo shop.
demo:
	sh scripts/deps.sh shop
	$(MAKE) remarket
	sh scripts/demo.sh

# The demo storefront in a browser: nginx + remarket + a tiny backend.
demo-shop:
	sh scripts/deps.sh shop
	$(MAKE) remarket
	sh scripts/demo-shop.sh

# BIG=1 adds the 1 M-customer database and the 540 k-line import to
# bench/scale.sh (several minutes more).
bench:
	sh scripts/deps.sh bench
	$(MAKE) remarket
	sh bench/run.sh
	BIG=$(BIG) sh bench/scale.sh

install: remarket
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SHAREDIR)/templates $(DESTDIR)$(SHAREDIR)/sql $(DESTDIR)$(SHAREDIR)/static
	install -m 0755 remarket $(DESTDIR)$(BINDIR)/remarket
	install -m 0644 templates/* $(DESTDIR)$(SHAREDIR)/templates/
	install -m 0644 sql/*.sql $(DESTDIR)$(SHAREDIR)/sql/
	install -m 0644 static/remarket.js static/sw.js $(DESTDIR)$(SHAREDIR)/static/
	install -m 0644 nginx.conf.example $(DESTDIR)$(SHAREDIR)/
	install -d $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR) $(DESTDIR)$(UNITDIR)
	install -m 0644 remarket.8 $(DESTDIR)$(MANDIR)/man8/remarket.8
	install -m 0644 README.md *.conf.example $(DESTDIR)$(DOCDIR)/
	for u in remarket.service remarket-tick.service remarket-tick.timer; do \
		sed 's#/usr/local/bin/#$(BINDIR)/#; s#/usr/local/share/doc/remarket#$(DOCDIR)#' \
			systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; done

clean:
	rm -rf remarket build sql_migrations.h
