/*
 * tests/tap.h: a tiny TAP producer for the unit tests, no dependencies.
 * ok()/is_int()/is_str() print "ok N - name" or "not ok N - name" on
 * stdout, with "# got/# want" diagnostics on stderr when a test fails
 * (as Test::More does); done_testing() prints the plan "1..N" and returns
 * the exit code: 0 when every test passed.
 */
#ifndef TAP_H
#define TAP_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int tap_run, tap_failed;

static inline void diag(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void diag(const char *fmt, ...)
{
	char msg[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fflush(stdout);
	for (const char *p = msg, *nl; p; p = nl ? nl + 1 : NULL) {
		nl = strchr(p, '\n');
		fprintf(stderr, "# %.*s\n", nl ? (int)(nl - p) : (int)strlen(p), p);
	}
}

static inline int ok(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline int ok(int cond, const char *fmt, ...)
{
	char name[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(name, sizeof name, fmt, ap);
	va_end(ap);
	printf("%sok %d - ", cond ? "" : "not ", ++tap_run);
	for (const char *p = name; *p; p++) /* '#' would start a directive */
		if (*p == '#')
			fputs("\\#", stdout);
		else
			putchar(*p == '\n' || *p == '\r' ? ' ' : *p);
	putchar('\n');
	fflush(stdout);
	if (!cond) {
		tap_failed++;
		diag("  Failed test %d: %s", tap_run, name);
	}
	return cond;
}

static inline int is_int(long long got, long long want, const char *name)
{
	if (ok(got == want, "%s", name))
		return 1;
	diag("  got: %lld", got);
	diag(" want: %lld", want);
	return 0;
}

static inline int is_str(const char *got, const char *want, const char *name)
{
	int same = got && want ? strcmp(got, want) == 0 : got == want;
	if (ok(same, "%s", name))
		return 1;
	diag("  got: %s%s%s", got ? "'" : "", got ? got : "NULL", got ? "'" : "");
	diag(" want: %s%s%s", want ? "'" : "", want ? want : "NULL", want ? "'" : "");
	return 0;
}

static inline int done_testing(void)
{
	printf("1..%d\n", tap_run);
	fflush(stdout);
	if (tap_failed)
		diag("Looks like you failed %d test%s of %d.", tap_failed,
		     tap_failed == 1 ? "" : "s", tap_run);
	return tap_failed ? 1 : 0;
}

#endif
