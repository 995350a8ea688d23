#!/usr/bin/perl
# 90-install.t: the README's quick start and "Installing on a server",
# walked from a clean checkout (the files `git ls-files` names, copied to
# a temporary directory, as CI's checkout has them):
#   - remarket.conf.example names every key of the cfg_keys table in
#     remarket.c, once, and each commented "#key = value" shows the real
#     default (so the example cannot drift from the code), and the
#     README's Configuration table has a row for each;
#   - `make PREFIX=/usr` builds a binary that looks for its files in
#     /usr/share/remarket; `make install PREFIX=/usr DESTDIR=...` does not
#     rebuild it and installs the binary, templates, migrations,
#     remarket.js, the man page, the README and examples (DOCDIR) and the
#     systemd units (UNITDIR, with BINDIR and DOCDIR filled in);
#   - the quick start's demo (scripts/demo.sh, as `make demo` runs it
#     without the package installs): five shoppers, five mails;
#   - `init`, an abandoned cart and `tick` work with the installed files,
#     configured by the installed remarket.conf.example plus the paths an
#     operator would set, from a directory with no ./templates; the
#     installed remarket.js is served;
#   - a build with another PREFIX rebuilds (build/prefix.stamp), and a
#     second make with the same PREFIX does not;
#   - the installed units pass `systemd-analyze verify` (when installed).
# `make check` itself is not run from here: this file is part of it.
# Two compiles (the second at -O0, which only the stamp can trigger).
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname basename);
use File::Path qw(make_path);
use File::Copy qw(copy);
use Cwd qw(abs_path);
use Time::HiRes qw(time);

my $root = abs_path(dirname(abs_path($0)) . '/..');

sub slurp {
	my ($path) = @_;
	open my $fh, '<:raw', $path or die "$path: $!";
	local $/;
	return scalar <$fh>;
}

sub spew {
	my ($path, $data) = @_;
	open my $fh, '>:raw', $path or die "$path: $!";
	print $fh $data;
	close $fh or die "$path: $!";
}

# ---- remarket.conf.example against the cfg_keys table ----------------------

my ($table) = slurp("$root/remarket.c") =~ /\}\s*cfg_keys\[\]\s*=\s*\{(.*?)\n\};/s;
ok($table, 'remarket.c has the cfg_keys table') or BAIL_OUT('no cfg_keys table');
my %default;
while ($table =~ /CFG_(?:STR|LONG)\((\w+),\s*"((?:[^"\\]|\\.)*)"\)/g) {
	$default{$1} = $2;
}
cmp_ok(scalar keys %default, '>=', 40, 'cfg_keys: ' . scalar(keys %default) . ' keys read');

my (%seen, @dup, @unknown, @wrong_default);
for my $line (split /\n/, slurp("$root/remarket.conf.example")) {
	# "key = value" sets a key; "#key = value" shows its default; prose
	# comments start with "# ".
	next unless $line =~ /^(#?)([a-z_]+)\s*=\s*(.*?)\s*$/;
	my ($commented, $key, $value) = ($1, $2, $3);
	push @dup, $key if $seen{$key}++;
	if (!exists $default{$key}) {
		push @unknown, $key;
	} elsif ($commented && $value ne $default{$key}) {
		push @wrong_default, "$key: example '$value', remarket.c '$default{$key}'";
	}
}
my @missing = grep { !$seen{$_} } sort keys %default;
is("@missing", '', 'remarket.conf.example names every key of cfg_keys');
is("@unknown", '', 'remarket.conf.example names no key remarket.c does not know');
is("@dup", '', 'remarket.conf.example names each key once');
is(join('; ', @wrong_default), '', 'each "#key = value" line shows the default of remarket.c');

# The README's table under "Configuration" has a row for each key too.
my ($section) = slurp("$root/README.md") =~ /^## Configuration\n(.*?)^## /ms;
my @rows = grep { /^\|/ } split /\n/, $section // '';
my @no_row = grep { my $k = $_; !grep { /^\|[^|]*`\Q$k\E`/ } @rows } sort keys %default;
is("@no_row", '', 'README.md: the Configuration table has a row for every key');

# ---- a clean checkout ---------------------------------------------------------

my @files = -d "$root/.git" || -f "$root/.git"
	? split /\0/, `git -C '$root' ls-files -z 2>/dev/null` : ();
sub skip_rest {
	my ($why) = @_;
	SKIP: { skip $why, 1 }
	done_testing();
	exit 0;
}
skip_rest('not a git checkout: the walk copies what `git ls-files` names') unless @files;
for my $tool (qw(make cc)) {
	skip_rest("$tool is missing: sudo sh scripts/deps.sh build")
		unless system("command -v $tool >/dev/null 2>&1") == 0;
}

my $tmp = tempdir(CLEANUP => 1);
my $src = "$tmp/src";
my $dest = "$tmp/dest";
for my $f (@files) {
	next unless -f "$root/$f";    # deleted in the working tree
	make_path(dirname("$src/$f"));
	copy("$root/$f", "$src/$f") or die "copy $f: $!";
	chmod((stat "$root/$f")[2] & 07777, "$src/$f");
}
ok(!-e "$src/remarket" && !-e "$src/build", 'the clean checkout has no build output');

# make with nothing of the caller's (make check's MAKEFLAGS, CFLAGS, PREFIX,
# REMARKET_* configuration) leaking in.
delete @ENV{qw(MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES CFLAGS PREFIX DESTDIR
	BINDIR SHAREDIR MANDIR DOCDIR UNITDIR CC)};
delete $ENV{$_} for grep { /^REMARKET_/ } keys %ENV;

sub run_in {
	my ($dir, @cmd) = @_;
	my $t = time;
	my $pid = open(my $fh, '-|') // die "fork: $!";
	if (!$pid) {
		chdir $dir or die "$dir: $!";
		open STDERR, '>&', \*STDOUT;
		open STDIN, '<', '/dev/null';
		exec @cmd or die "exec $cmd[0]: $!";
	}
	local $/;
	my $out = <$fh> // '';
	close $fh;
	my $rc = $? >> 8;
	note(sprintf '%s: exit %d in %.1f s', "@cmd", $rc, time - $t);
	return ($rc, $out);
}

# Does the binary carry this SHAREDIR (as RM_SHAREDIR "/templates")?
sub names_sharedir {
	my ($bin, $dir) = @_;
	return index(slurp($bin), "$dir/templates\0") >= 0;
}

my ($rc, $out) = run_in($src, 'make', 'PREFIX=/usr');
is($rc, 0, 'make PREFIX=/usr builds in a clean checkout') or diag $out;
ok(-x "$src/remarket", '... remarket') or BAIL_OUT('no binary');
ok(names_sharedir("$src/remarket", '/usr/share/remarket'),
	'... whose share directory is /usr/share/remarket');
ok(!names_sharedir("$src/remarket", '/usr/local/share/remarket'),
	'... and not /usr/local/share/remarket');
my $built = (stat "$src/remarket")[9];

($rc, $out) = run_in($src, 'make', 'install', 'PREFIX=/usr', "DESTDIR=$dest");
is($rc, 0, 'make install PREFIX=/usr DESTDIR=... works') or diag $out;
unlike($out, qr/remarket\.c/, '... without compiling again');
is((stat "$src/remarket")[9], $built, '... (the binary is untouched)');

# ---- what make install put where ------------------------------------------------

my $share = "$dest/usr/share/remarket";
my @want = (
	'usr/bin/remarket',
	'usr/share/man/man8/remarket.8',
	'usr/share/remarket/static/remarket.js',
	'usr/share/remarket/static/sw.js',
	'usr/share/remarket/nginx.conf.example',
	(map { "usr/share/remarket/templates/" . basename($_) } glob "$src/templates/*"),
	(map { "usr/share/remarket/sql/" . basename($_) } glob "$src/sql/*.sql"),
	(map { "usr/share/doc/remarket/$_" } qw(README.md remarket.conf.example
		nginx.conf.example apache.conf.example lighttpd.conf.example)),
	(map { "usr/lib/systemd/system/$_" } qw(remarket.service
		remarket-tick.service remarket-tick.timer)),
);
my @absent = grep { !-f "$dest/$_" } @want;
is("@absent", '', scalar(@want) . ' files installed under DESTDIR/usr');
ok(-x "$dest/usr/bin/remarket", 'usr/bin/remarket is executable');
my @differ = grep { slurp("$src/templates/$_") ne slurp("$share/templates/$_") }
	map { basename($_) } glob "$src/templates/*";
is("@differ", '', 'the installed templates are the checkout\'s');

my $units = "$dest/usr/lib/systemd/system";
for my $u (qw(remarket.service remarket-tick.service)) {
	my $text = slurp("$units/$u");
	like($text, qr{^ExecStart=/usr/bin/remarket }m, "$u: ExecStart=/usr/bin/remarket");
	like($text, qr{^Documentation=.*file:/usr/share/doc/remarket/README\.md}m,
		"$u: Documentation names the installed README");
	unlike($text, qr{/usr/local}, "$u: nothing left of /usr/local");
	like($text, qr{^Environment=REMARKET_CONFIG=/etc/remarket/remarket\.conf$}m,
		"$u: reads /etc/remarket/remarket.conf");
}
like(slurp("$units/remarket.service"), qr{^RuntimeDirectory=remarket$}m,
	'remarket.service: RuntimeDirectory=remarket (its socket\'s directory)');
like(slurp("$units/remarket.service"), qr{^ExecStart=\S+ serve /run/remarket/remarket\.sock$}m,
	'remarket.service serves on the socket the web server examples name');
like(slurp("$src/nginx.conf.example"), qr{unix:/run/remarket/remarket\.sock},
	'... (nginx.conf.example)');

# ---- the quick start's demo -----------------------------------------------------

($rc, $out) = run_in($src, 'env', 'DEMO_BATCH=1', 'sh', 'scripts/demo.sh');
is($rc, 0, 'the quick start\'s demo runs (scripts/demo.sh)') or diag $out;
my %mails;
for my $f (glob "$src/var/demo/outbox/*.eml") {
	my ($to) = slurp($f) =~ /^To: .*?(\w+)\@example\.com/m;
	$mails{$to // '?'}++;
}
is(join(' ', map { "$_=$mails{$_}" } sort keys %mails), 'bruno=1 chloe=1 lea=3',
	'... five shoppers: lea gets all three mails, bruno buys after one, chloe '
	. 'unsubscribes after one, dan (no consent) and eva (holdout) get none');
ok(-s "$src/var/demo/report.html", '... and writes var/demo/report.html');

# ---- init and tick with the installed files ------------------------------------

my $bin = "$dest/usr/bin/remarket";
my $run = "$tmp/run";      # a working directory without ./templates or ./static
my $state = "$tmp/state";
make_path($run, $state);
# The installed example, with the paths an operator sets.
my $conf = "$tmp/remarket.conf";
spew($conf, slurp("$dest/usr/share/doc/remarket/remarket.conf.example") . <<"EOF");

# 90-install.t: the state and the DESTDIR-installed files
db = $state/remarket.db
key_file = $state/remarket.key
outbox = $state/outbox
templates = $share/templates
static_dir = $share/static
EOF

($rc, $out) = run_in($run, $bin, '-c', $conf, 'init');
is($rc, 0, 'remarket -c remarket.conf init, with the installed example') or diag $out;
ok(-s "$state/remarket.key" && -f "$state/remarket.db", '... makes the key and the database');

my $T0 = 1795000000;
my $events = "$tmp/events.json";
spew($events, <<"EOF");
[{"type":"identify","email":"ines\@example.com","name":"Ines","consent":true,"ts":$T0},
 {"type":"cart","email":"ines\@example.com","cart_id":"c-1","currency":"EUR","ts":$T0,
  "items":[{"sku":"LAMP-1","name":"Rattan pendant lamp","price":39.90,"qty":1}]}]
EOF
($rc, $out) = run_in($run, 'sh', '-c', "'$bin' -c '$conf' event --now $T0 < '$events'");
is($rc, 0, 'an identify and a cart are recorded') or diag $out;

($rc, $out) = run_in($run, $bin, '-c', $conf, 'tick', '--now', $T0 + 3700);
is($rc, 0, 'tick an hour later') or diag $out;
like($out, qr/"sent":1\b/, '... sends the reminder') or diag $out;
my @eml = glob "$state/outbox/*.eml";
is(scalar @eml, 1, '... into the outbox');
my $mail = @eml ? slurp($eml[0]) : '';
like($mail, qr/^To: .*ines\@example\.com/m, '... to the shopper');
like($mail, qr{/rm/r/[A-Za-z0-9_-]+}, '... rendered from the installed templates, with its recovery link');

# /rm/remarket.js from the installed static directory (CGI form).
{
	local %ENV = (%ENV, GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'GET',
		PATH_INFO => '/remarket.js', REMOTE_ADDR => '127.0.0.1');
	($rc, $out) = run_in($run, $bin, '-c', $conf);
}
my ($head, $body) = split /\r?\n\r?\n/, $out, 2;
like($head // '', qr/^Status: 200/m, 'GET /rm/remarket.js: 200') or diag $out;
is($body, slurp("$share/static/remarket.js"), '... the installed remarket.js');

# ---- another PREFIX rebuilds; the same one does not ----------------------------

($rc, $out) = run_in($src, 'make', 'PREFIX=/opt/rmtest', 'CFLAGS=-O0');
is($rc, 0, 'make PREFIX=/opt/rmtest') or diag $out;
like($out, qr/remarket\.c/, '... compiles again (the stamp changed)');
ok(names_sharedir("$src/remarket", '/opt/rmtest/share/remarket'),
	'... a binary whose share directory is /opt/rmtest/share/remarket');
($rc, $out) = run_in($src, 'make', 'PREFIX=/opt/rmtest', 'CFLAGS=-O0');
is($rc, 0, 'make PREFIX=/opt/rmtest again');
unlike($out, qr/remarket\.c/, '... compiles nothing') or diag $out;

# ---- the units, as systemd reads them -------------------------------------------

SKIP: {
	skip 'systemd-analyze is not installed', 1
		unless system('command -v systemd-analyze >/dev/null 2>&1') == 0;
	# Outside DESTDIR the binary is not at /usr/bin: point ExecStart at the
	# installed one; the man page is not installed on this host either.
	my $v = "$tmp/units";
	make_path($v);
	my @units = qw(remarket.service remarket-tick.service remarket-tick.timer);
	for my $u (@units) {
		(my $text = slurp("$units/$u")) =~ s{/usr/bin/remarket}{$bin}g;
		spew("$v/$u", $text);
	}
	($rc, $out) = run_in($v, 'systemd-analyze', 'verify', '--man=no', map { "$v/$_" } @units);
	# verify exits 0 on unknown keys and bad values too: they are warnings.
	ok($rc == 0 && $out !~ /remarket/, 'systemd-analyze verify: the units are clean')
		or diag $out;
}

done_testing();
