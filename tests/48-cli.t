#!/usr/bin/perl
# 48-cli.t: the command line as the man page promises it (issue 11):
# `remarket help [CMD]` and `remarket CMD --help` for every command of the
# table, without a database or a key; an unknown command named; extra
# words and unknown options refused with the usage; the exit codes of
# remarket.8's EXIT STATUS (0 ok, 1 failure, 2 usage); the read-only
# commands working without the key; and the SMTP password of smtp_url in
# no output of a tick whose relay fails (stdout, stderr, the database, the
# report, contact, export).
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use IO::Socket::INET;
use lib dirname(abs_path($0)) . '/lib';

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
our %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null');

# rm([{VAR => value, _stdin => text}], @args): (exit code, stdout, stderr)
sub rm {
	my @args = @_;
	my %extra = ref $args[0] eq 'HASH' ? %{ shift @args } : ();
	my $stdin = delete $extra{_stdin} // '';
	open my $fh, '>', "$tmp/in" or die;
	print $fh $stdin;
	close $fh;
	local %ENV = (%ENV, %env, %extra);
	delete local $ENV{GATEWAY_INTERFACE};
	my $q = join ' ', map { my $a = $_; $a =~ s/'/'\\''/g; "'$a'" } @args;
	my $out = `'$bin' $q < '$tmp/in' 2>'$tmp/err'`;
	my $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
	return ($rc, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub slurp { local (@ARGV, $/) = @_; <> // '' }

# ---- help, help CMD, CMD --help: stdout, exit 0, no database, no key ----
my ($rc, $out, $err) = rm('help');
is($rc, 0, 'help: exit 0');
my %seen;
my @cmds = grep { !$seen{$_}++ } $out =~ /^  ([a-z][a-z-]*)/mg;
ok(@cmds >= 18, 'help lists the commands of the table (' . scalar(@cmds) . ')');
for my $c (@cmds) {
	my ($rc1, $o1, $e1) = rm('help', $c);
	my ($rc2, $o2, $e2) = rm($c, '--help');
	ok($rc1 == 0 && $o1 =~ /\Ausage: remarket \Q$c\E\b/ && $e1 eq '',
		"help $c: its usage on stdout, exit 0") or diag("$rc1 [$o1] [$e1]");
	ok($rc2 == 0 && $o2 eq $o1 && $e2 eq '', "$c --help: the same, exit 0")
		or diag("$rc2 [$o2] [$e2]");
}
ok(!-e "$tmp/rm.db" && !-e "$tmp/rm.key",
	'... none of them made a database or a key');
($rc, $out) = rm('help', 'report');
like($out, qr/^usage: remarket report --link \[--days N\]$/m, 'help report: both forms');
like($out, qr/works without the key/, '... and that it works without the key');
($rc, $out) = rm('help', 'tick');
like($out, qr/needs the key/, 'help tick: it needs the key');

# ---- unknown commands ----
($rc, $out, $err) = rm('frobnicate');
is($rc, 2, 'an unknown command: exit 2');
is($err, "remarket: unknown command 'frobnicate' (see remarket help)\n",
	'... named, with where to look');
is($out, '', '... nothing on stdout');
($rc, $out, $err) = rm('help', 'frobnicate');
is($rc, 2, 'help of an unknown command: exit 2');
like($err, qr/unknown command 'frobnicate'/, '... named');

# ---- usage errors before anything is opened: exit 2 and the usage ----
my @extra = (
	[qw(init extra)], [qw(keygen --rotate extra)], [qw(serve a b)],
	[qw(tick extra)], [qw(event extra)], [qw(report extra)],
	[qw(segments extra)], [qw(recommend a@example.com 3 extra)],
	[qw(products kind SKU product extra)],
	[qw(import orders a.csv extra)], [qw(contact a@example.com extra)],
	[qw(unsubscribe a@example.com extra)],
	[qw(suppress add a@example.com extra)], [qw(export a@example.com extra)],
	[qw(forget a@example.com extra)], [qw(help tick extra)],
	[qw(version extra)],
);
for my $a (@extra) {
	($rc, $out, $err) = rm(@$a);
	ok($rc == 2 && $err =~ /^usage: remarket $a->[0]\b/m,
		"@$a: an extra word is refused with the usage, exit 2")
		or diag("$rc [$err]");
}
for my $c (@cmds) {
	($rc, $out, $err) = rm($c, '--bogus');
	ok($rc == 2 && $err =~ /^remarket \Q$c\E: unknown option '--bogus'\n/
		&& $err =~ /^usage: remarket \Q$c\E\b/m,
		"$c --bogus: an unknown option is named, with the usage, exit 2")
		or diag("$rc [$err]");
}
($rc, $out, $err) = rm(qw(report --since));
ok($rc == 2 && $err =~ /--since needs a value/, 'an option without its value: exit 2');
ok(!-e "$tmp/rm.db", '... and none of these opened the database');

# ---- failures: exit 1 ----
($rc, $out, $err) = rm('flows');
ok($rc == 1 && $err =~ /run 'remarket init'/,
	'flows (no key needed) before init: exit 1, saying to run init') or diag $err;
ok(!-e "$tmp/rm.db", '... without making an empty database');
($rc, $out, $err) = rm('tick');
is($rc, 1, 'tick before init: exit 1 (a failure, not a usage error)');
like($err, qr/key_file .*run 'remarket init'/, '... naming the key file and the fix');
is((rm('init'))[0], 0, 'init: exit 0');

# ---- usage errors a command finds itself: exit 2 ----
($rc, $out, $err) = rm(qw(report --json --link));
is($rc, 2, 'report --json --link: the options of two forms, exit 2');
($rc, $out, $err) = rm(qw(report --days 3));
is($rc, 2, 'report --days without --link: exit 2');
($rc, $out, $err) = rm(qw(recommend a@example.com many));
is($rc, 2, 'recommend EMAIL many: N must be a number, exit 2');
($rc, $out, $err) = rm(qw(flows frobnicate));
is($rc, 2, 'flows frobnicate: exit 2');
($rc, $out, $err) = rm(qw(contact nobody@example.com));
is($rc, 1, 'contact of nobody: a failure, exit 1');

# ---- read-only commands without the key ----
my $T0 = 1795000000;
my $cart = qq({"type":"cart","email":"ann\@example.com","consent":true,)
	. qq("cart_id":"c1","currency":"EUR","ts":$T0,)
	. qq("items":[{"sku":"LAMP-1","name":"Lamp","price":39.9,"qty":1}]});
($rc, $out, $err) = rm({ _stdin => $cart }, 'event', '--now', $T0);
is($rc, 0, 'a cart event') or diag $err;
rename "$tmp/rm.key", "$tmp/rm.key.away" or die;
for my $a ([qw(flows)], [qw(report)], [qw(report --json)], [qw(segments)],
	   [qw(contact ann@example.com)], [qw(contact --json ann@example.com)],
	   [qw(export ann@example.com)], [qw(recommend ann@example.com 2)]) {
	($rc, $out, $err) = rm(@$a, '--now', $T0 + 60);
	ok($rc == 0 && $err !~ /key_file/, "@$a: works without the key")
		or diag("$rc [$err]");
}
($rc, $out, $err) = rm(qw(contact --json ann@example.com));
like($out, qr/ann\@example\.com/, 'contact --json without the key prints the person');
($rc, $out, $err) = rm(qw(report --link));
is($rc, 1, 'report --link without the key: exit 1 (it signs)');
like($err, qr/signed with the key in key_file \Q$tmp\E\/rm\.key/, '... and says why');
is($out, '', '... and prints no link');
for my $a ([qw(tick)], [qw(event)], [qw(forget ann@example.com)],
	   [qw(import orders /dev/null)]) {
	($rc, $out, $err) = rm(@$a);
	ok($rc == 1 && $err =~ /key_file/, "@$a: needs the key, exit 1")
		or diag("$rc [$err]");
}
rename "$tmp/rm.key.away", "$tmp/rm.key" or die;
($rc, $out) = rm(qw(report --link --days 2));
like($out, qr{/report\?t=}, 'report --link with the key: the link');

# ---- the SMTP password is never printed ----
my $secret = 'Pw-s3cret-42';
my $closed = do {
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
		Proto => 'tcp', Listen => 1) or die;
	my $p = $s->sockport;
	close $s;
	$p;
};
my @relays = (["smtp://shop:$secret\@127.0.0.1:$closed", 'a relay that is down']);
my $relay;
if (grep { -x "$_/python3" } split /:/, $ENV{PATH}) {
	require RMRelay;
	$relay = RMRelay->start(dir => "$tmp/relay", fail => ['auth=535']);
	push @relays, ["smtp://shop:$secret\@127.0.0.1:$relay->{port}",
		'a relay that refuses the login'],
		["smtp+starttls://shop:$secret\@127.0.0.1:$relay->{port}",
		'smtp+starttls:// to a relay without TLS'];
}
my $k = 0;
for my $r (@relays) {
	my ($url, $what) = @$r;
	$k++;
	# a real relay: a sender and links a tick accepts (see remarket status)
	local %env = (%env, REMARKET_DB => "$tmp/pw$k.db", REMARKET_SMTP_URL => $url,
		REMARKET_FROM => 'Shop <shop@shop.example>',
		REMARKET_POSTAL_ADDRESS => '1 Test Street, Testville',
		REMARKET_ALLOW_INSECURE_LINKS => 'yes');
	my @all;
	for my $a (['init'], [qw(flows holdout abandoned_cart 0)],
		   [{ _stdin => $cart }, 'event', '--now', $T0],
		   ['tick', '--now', $T0 + 3700], ['tick', '--now', $T0 + 7400],
		   ['report', '--now', $T0 + 7400], ['report', '--json', '--now', $T0 + 7400],
		   ['contact', 'ann@example.com'], ['export', 'ann@example.com'],
		   ['flows'], ['tick', '--bogus'], ['frobnicate']) {
		my @r = rm(@$a);
		push @all, "== @{[grep { !ref } @$a]}: rc $r[0]\n$r[1]$r[2]";
	}
	my $db = `sqlite3 '$tmp/pw$k.db' .dump 2>/dev/null`;
	my $all = join('', @all);
	like($all, qr/smtp_url smtp\S*:\/\/shop\@127\.0\.0\.1:\d+: /,
		"$what: the failure names the relay, user and host") or diag $all;
	unlike($all . $db, qr/\Q$secret\E/, "$what: the password is in no output "
		. "and nowhere in the database") or diag $all;
	ok(length $db > 1000 || !`which sqlite3`, '... (the database was read)');
}
$relay->stop if $relay;

# ---- remarket.8 says these exit codes ----
my ($status) = slurp("$root/remarket.8") =~ /^\.SH EXIT STATUS\n(.*?)^\.SH /ms;
like($status // '', qr/^\.TP\n0\nSuccess/m, 'remarket.8: 0 on success');
like($status // '', qr/^\.TP\n1\nA failure/m, 'remarket.8: 1 on a failure');
like($status // '', qr/^\.TP\n2\nA usage error/m, 'remarket.8: 2 on a usage error');

done_testing;
