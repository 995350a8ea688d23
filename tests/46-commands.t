#!/usr/bin/perl
# The command table (commands[] in remarket.c) is the one list of commands:
# `remarket help` prints it, `remarket help --man` makes the SYNOPSIS of
# remarket.8 from it (which must be the one in the file), README's
# "## Command line" lists the same commands, and run() dispatches from it:
# arity, unknown commands, aliases, and which commands need the key and
# the database.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
my %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null');

sub rm {
	my @args = @_;
	local %ENV = (%ENV, %env);
	delete local $ENV{GATEWAY_INTERFACE};
	my $out = `'$bin' @args < /dev/null 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub slurp { local (@ARGV, $/) = @_; <> }
sub names { my %s = map { $_ => 1 } @_; join ' ', sort keys %s }

# help: the table's usage lines
my ($rc, $out, $err) = rm('help');
is($rc, 0, 'help exits 0');
my @table = $out =~ /^  ([a-z][a-z-]*)/mg;
is(names(@table), names(qw(init keygen serve tick event report flows segments status
	backtest recommend products preview push-test send-test import contact unsubscribe suppress
	feedback export forget
	help version)), 'help lists every command of the table')
	or diag($out);
my ($rc2, $out2) = rm('--help');
is("$rc2 $out2", "0 $out", '--help is help');
($rc, $out, $err) = rm();
is($rc, 2, 'no command on a terminal: exit 2');
like($err, qr/^usage: remarket \[-c FILE\] COMMAND$/m, '... and the usage on stderr');

# the man page's SYNOPSIS is the table's
($rc, $out) = rm('help', '--man');
is($rc, 0, 'help --man exits 0');
my ($synopsis) = slurp("$root/remarket.8") =~ /^(\.SH SYNOPSIS\n.*?)^\.SH /ms;
is($out, $synopsis, 'remarket.8 SYNOPSIS is `remarket help --man`')
	or diag('run ./remarket help --man and put its output in place of the '
		. 'SYNOPSIS section of remarket.8');
like($out, qr/^\.B remarket $_$/m, "SYNOPSIS names $_") for qw(init flows import);

# README lists the same commands
my ($block) = slurp("$root/README.md") =~ /^## Command line\n\n```\n(.*?)^```/ms;
ok(defined $block, 'README has a ## Command line block');
my @readme = ($block // '') =~ /^remarket (?:\[-c FILE\] )?([a-z][a-z-]*)/mg;
is(names(@readme), names(@table), "README's Command line lists the table's commands");

# dispatch: arity, unknown commands, aliases
($rc, $out, $err) = rm('frobnicate');
is($rc, 2, 'an unknown command: exit 2');
is($err, "remarket: unknown command 'frobnicate' (see remarket help)\n",
	'... named, with where to look');
($rc, $out, $err) = rm('serve');
is($rc, 2, 'serve without ADDR: exit 2');
is($err, "usage: remarket serve ADDR\n", '... with its usage line');
($rc, $out, $err) = rm('import', 'products');
is($rc, 2, 'import without a file: exit 2');
is($err, "usage: remarket import products|orders FILE.csv [--rejects REJECTS.csv]\n"
	. "                       [--dry-run]\n", '... with its usage line');
($rc, $out, $err) = rm('keygen', '--rotate', 'extra');
is($rc, 2, 'keygen with two words: exit 2');
is($err, "usage: remarket keygen [--rotate]\nusage: remarket keygen --vapid\n",
	'... with its usage lines');
($rc, $out, $err) = rm('version');
like($out, qr/^remarket \d+\.\d+\.\d+\n\z/, 'version');
is((rm('--version'))[1], $out, '--version is version');

# which commands need the key and the database
($rc, $out, $err) = rm('tick');
is($rc, 1, 'tick before init: exit 1');
like($err, qr/^remarket tick: key_file \Q$tmp\E\/rm\.key: .*run 'remarket init'/,
	'... naming the key file and the fix');
($rc, $out) = rm('keygen');
is($rc, 0, 'keygen needs no key and no database');
is(length $out, 32, '... and prints 32 bytes');
is((rm('init'))[0], 0, 'init');
($rc, $out, $err) = rm('tick', '--now', 'yesterday');
is($rc, 2, 'a bad --now: exit 2');
like($err, qr/--now: want Unix seconds/, '... says what it wants');
($rc, $out) = rm('tick', '--now', '1795000000');
is($rc, 0, 'tick after init');
like($out, qr/^\{.*\}$/m, '... prints its JSON summary');
($rc, $out) = rm('flows', 'set', 'abandoned_cart', '1', 'delay=2h', 'segment=!vip');
is($rc, 0, 'flows set binds its named parameters');
like($out, qr/step 1\s+\+2h\s+cart_reminder\s+not for vip/, '... delay and segment set');

done_testing;
