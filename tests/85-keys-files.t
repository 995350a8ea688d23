#!/usr/bin/perl
# Keys and files, with the real binary and no web server (links are opened
# through the CGI form): an unsubscribe link mailed before `remarket keygen
# --rotate` still works after it; `init` with a lost key on a database that
# has sent mail refuses and says what to do; `init --new-key` is the
# explicit way out. The database, its -wal and -shm, the key file and the
# outbox's .eml files are 0600 and the directories remarket makes 0700,
# under umask 000 and 022. The log names message ids, not addresses.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $T0 = 1795000000;
my $HOUR = 3600;

# One world per umask: its own database, key, outbox.
sub world {
	my ($umask) = @_;
	my $tmp = tempdir(CLEANUP => 1);
	return {
		tmp => $tmp, umask => $umask,
		env => {
			REMARKET_DB => "$tmp/var/rm.db", REMARKET_KEY_FILE => "$tmp/keys/rm.key",
			REMARKET_OUTBOX => "$tmp/spool/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
			REMARKET_SMTP_URL => '', REMARKET_FROM => 'Maison Test <shop@example.com>',
			REMARKET_CONFIG => '/dev/null', REMARKET_BASE_URL => 'https://shop.example/rm',
		},
	};
}

sub rm {
	my ($w, $stdin, $extra, @args) = @_;
	local %ENV = (%ENV, %{ $w->{env} }, %{ $extra || {} });
	my $tmp = $w->{tmp};
	open my $fh, '>', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $old = umask $w->{umask};
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	umask $old;
	my $rc = $? >> 8;
	return ($rc, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}

# A link opened through the CGI form, as a web server would run it.
sub cgi_get {
	my ($w, $path, $now) = @_;
	my ($rc, $out) = rm($w, '', { GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'GET',
		PATH_INFO => $path, QUERY_STRING => '', REMARKET_NOW => $now });
	my ($status) = $out =~ /^Status: (\d+)/m;
	return ($status // 0, $out);
}

sub mode_of { my @st = stat $_[0]; return @st ? sprintf('%04o', $st[2] & 07777) : 'none' }

sub first_mail {
	my ($w) = @_;
	my $dir = "$w->{env}{REMARKET_OUTBOX}";
	opendir my $d, $dir or return;
	my ($f) = sort grep { /\.eml$/ } readdir $d;
	return $f ? "$dir/$f" : undef;
}

# A shopper's cart, one hour idle, one reminder in the outbox.
sub one_mail {
	my ($w) = @_;
	my $u = sprintf('%03o', $w->{umask});
	is((rm($w, '', {}, 'init'))[0], 0, "umask $u: init");
	is((rm($w, '', {}, qw(flows holdout abandoned_cart 0)))[0], 0, "umask $u: no holdout");
	my $ev = '{"type":"cart","email":"pii.person@example.com","name":"Ann","consent":true,'
		. '"cart_id":"c1","currency":"EUR","items":[{"sku":"LAMP-1","name":"Lamp","price":10,"qty":1}]}';
	my ($rc, $out, $err) = rm($w, $ev, {}, qw(event --now), $T0);
	is($rc, 0, "umask $u: cart event") or diag $err;
	my $sent = 0;
	for my $t ($T0 + $HOUR + 60, $T0 + 2 * $HOUR + 120) {
		($rc, $out, $err) = rm($w, '', {}, qw(tick --now), $t);
		$sent += $1 if $out =~ /"sent":(\d+)/;
	}
	is($sent, 1, "umask $u: one reminder sent") or diag "$out $err";
	return first_mail($w);
}

for my $umask (0000, 0022) {
	my $w = world($umask);
	my $u = sprintf('%03o', $umask);
	my $mail = one_mail($w);
	ok($mail, "umask $u: the reminder is in the outbox");
	my $e = $w->{env};
	# a reader holds the database open, so that its -wal and -shm exist
	open my $hold, '-|', 'sqlite3', $e->{REMARKET_DB}, 'BEGIN; SELECT count(*) FROM messages;', '.shell sleep 2', 'COMMIT;'
		or die "sqlite3: $!";
	select undef, undef, undef, 0.3;
	rm($w, '', {}, qw(tick --now), $T0 + 3 * $HOUR);
	is(mode_of($e->{REMARKET_DB}), '0600', "umask $u: the database is 0600");
	for my $sfx ('-wal', '-shm') {
		my $f = "$e->{REMARKET_DB}$sfx";
		if (-e $f) {
			is(mode_of($f), '0600', "umask $u: the database's $sfx is 0600");
		} else {
			pass("umask $u: no $sfx file left to check");
		}
	}
	close $hold;
	is(mode_of($e->{REMARKET_KEY_FILE}), '0600', "umask $u: the key file is 0600");
	is(mode_of($mail // ''), '0600', "umask $u: the outbox's .eml file is 0600");
	is(mode_of(dirname($e->{REMARKET_DB})), '0700', "umask $u: the database's directory is 0700");
	is(mode_of(dirname($e->{REMARKET_KEY_FILE})), '0700', "umask $u: the key's directory is 0700");
	is(mode_of($e->{REMARKET_OUTBOX}), '0700', "umask $u: the outbox is 0700");
	is(mode_of(dirname($e->{REMARKET_OUTBOX})), '0700', "umask $u: the outbox's parent made by init is 0700");
}

# ---- keys: a ring that rotates without breaking links ----
my $w = world(0022);
my $mail = one_mail($w);
my $text = do { local (@ARGV, $/) = $mail; <> };
my ($utok) = $text =~ m{/rm/u/([A-Za-z0-9_-]{20,})};
ok($utok, 'the reminder carries an unsubscribe link') or BAIL_OUT('no unsubscribe link');
my ($st) = cgi_get($w, "/u/$utok", $T0 + 3 * $HOUR);
is($st, 200, 'the unsubscribe link opens its page before the rotation');

my ($rc, $out, $err) = rm($w, '', {}, qw(keygen --rotate));
is($rc, 0, 'keygen --rotate') or diag $err;
like($out, qr/holds 2 keys/, 'keygen --rotate: the ring holds two keys');
is(-s $w->{env}{REMARKET_KEY_FILE}, 64, 'the key file holds two 32-byte keys');
is(mode_of($w->{env}{REMARKET_KEY_FILE}), '0600', 'the rotated key file is 0600');
($st) = cgi_get($w, "/u/$utok", $T0 + 3 * $HOUR);
is($st, 200, 'the unsubscribe link mailed before the rotation still works after it');

# a second cart after the rotation: its links are signed by the new key
my $ev = '{"type":"cart","email":"bob@example.com","name":"Bob","consent":true,'
	. '"cart_id":"c2","currency":"EUR","items":[{"sku":"LAMP-1","name":"Lamp","price":10,"qty":1}]}';
rm($w, $ev, {}, qw(event --now), $T0 + 4 * $HOUR);
rm($w, '', {}, qw(tick --now), $T0 + 5 * $HOUR + 60);
rm($w, '', {}, qw(tick --now), $T0 + 6 * $HOUR + 120);
my ($new_mail) = grep { $_ ne $mail } map { "$w->{env}{REMARKET_OUTBOX}/$_" }
	do { opendir my $d, $w->{env}{REMARKET_OUTBOX}; grep { /\.eml$/ } readdir $d };
my $new_text = $new_mail ? do { local (@ARGV, $/) = $new_mail; <> } : '';
my ($ntok) = $new_text =~ m{/rm/u/([A-Za-z0-9_-]{20,})};
ok($ntok, 'a mail sent after the rotation carries an unsubscribe link');
($st) = cgi_get($w, "/u/$ntok", $T0 + 7 * $HOUR);
is($st, 200, '... which works');
# the old key alone does not verify it: the new key signed it
my $ring = do { local (@ARGV, $/) = $w->{env}{REMARKET_KEY_FILE}; <> };
{
	open my $k, '>:raw', "$w->{tmp}/old.key" or die;
	print $k substr($ring, 0, 32);
	close $k;
}
($st) = do {
	local $w->{env}{REMARKET_KEY_FILE} = "$w->{tmp}/old.key";
	cgi_get($w, "/u/$ntok", $T0 + 7 * $HOUR);
};
isnt($st, 200, '... and was signed with the new key, not the old one');
($st) = do {
	local $w->{env}{REMARKET_KEY_FILE} = "$w->{tmp}/old.key";
	cgi_get($w, "/u/$utok", $T0 + 7 * $HOUR);
};
is($st, 200, 'the first link was signed with the old key');

($rc, $out, $err) = rm($w, '', {}, qw(keygen --rotate --bogus));
is($rc, 2, 'keygen with an unknown option: usage, exit 2');
($rc, $out, $err) = rm($w, '', { REMARKET_KEY_FILE => "$w->{tmp}/none.key" }, qw(keygen --rotate));
is($rc, 1, 'keygen --rotate without a key file refuses');
like($err, qr/none\.key/, '... naming the key file') or diag $err;

# ---- a lost key: init refuses, --new-key is the explicit way out ----
rename $w->{env}{REMARKET_KEY_FILE}, "$w->{tmp}/lost.key" or die;
($rc, $out, $err) = rm($w, '', {}, 'tick', '--now', $T0 + 8 * $HOUR);
is($rc, 1, 'tick with a lost key refuses (review L2)');
like($err, qr/restore .*from .*backup/i, '... saying to restore the key file from a backup') or diag $err;
like($err, qr/init --new-key/, '... naming init --new-key as the way to start over');
unlike($err, qr/keygen >/, '... never telling to write a new key over it');
($rc, $out, $err) = rm($w, '', {}, 'init');
is($rc, 1, 'init with a lost key on a database that has sent mail refuses');
like($err, qr/missing/, '... saying the key file is missing');
like($err, qr/Restore the key file/, '... saying to restore it');
like($err, qr/init --new-key/, '... and naming the way to start over');
ok(!-e $w->{env}{REMARKET_KEY_FILE}, '... and makes no key');
($st) = do {
	local $w->{env}{REMARKET_KEY_FILE} = "$w->{tmp}/lost.key";
	cgi_get($w, "/u/$utok", $T0 + 7 * $HOUR);
};
is($st, 200, 'the restored key file still opens the old link');
($rc, $out, $err) = rm($w, '', {}, qw(init --new-key));
is($rc, 0, 'init --new-key makes a new key') or diag $err;
is(-s $w->{env}{REMARKET_KEY_FILE}, 32, '... a ring of one');
($st) = cgi_get($w, "/u/$utok", $T0 + 7 * $HOUR);
isnt($st, 200, '... with which the links mailed before no longer verify');
($rc, $out, $err) = rm($w, '', {}, qw(init --new-key));
is($rc, 1, 'init --new-key with a key file present refuses');
like($err, qr/keygen --rotate/, '... and points to keygen --rotate');
($rc, $out, $err) = rm($w, '', {}, 'init');
is($rc, 0, 'init with the key present migrates as before');

# a database that never sent anything: a missing key is simply made
my $fresh = world(0022);
is((rm($fresh, '', {}, 'init'))[0], 0, 'init on a fresh database makes a key');
unlink $fresh->{env}{REMARKET_KEY_FILE};
($rc, $out, $err) = rm($fresh, '', {}, 'init');
is($rc, 0, 'init with no key and no sent mail makes a key') or diag $err;

# a database that sent only confirmation mails (browser_consent = confirm):
# their links were signed too, so a lost key refuses as well (review L2)
my $cw = world(0022);
$cw->{env}{REMARKET_BROWSER_CONSENT} = 'confirm';
is((rm($cw, '', {}, 'init'))[0], 0, 'confirm world: init');
my $body = '{"type":"identify","email":"c1@example.org","consent":true}';
($rc, $out) = rm($cw, $body, { GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'POST',
	PATH_INFO => '/collect', CONTENT_LENGTH => length $body, CONTENT_TYPE => 'application/json',
	REMOTE_ADDR => '10.0.0.1', HTTP_COOKIE => 'rm_vid=vCONFIRM0001', REMARKET_NOW => $T0 });
like($out, qr/^Status: 204/m, 'confirm world: the checkbox is recorded') or diag $out;
rm($cw, '', {}, qw(tick --now), $T0 + 60);
is(scalar(() = glob("$cw->{env}{REMARKET_OUTBOX}/m-*.eml")), 1, '... one confirmation mail went out');
unlink $cw->{env}{REMARKET_KEY_FILE};
($rc, $out, $err) = rm($cw, '', {}, 'init');
is($rc, 1, 'init with a lost key on a database that sent only confirmation mails refuses')
    or diag $err;
ok(!-e $cw->{env}{REMARKET_KEY_FILE}, '... and makes no key');

# ---- keygen --rotate as root keeps the key file's owner (review L4) ----
SKIP: {
	skip 'changing a file\'s owner needs root', 2 unless $> == 0;
	my $ow = world(0022);
	is((rm($ow, '', {}, 'init'))[0], 0, 'owner world: init');
	my $nobody = getpwnam('nobody') // 65534;
	chown $nobody, -1, $ow->{env}{REMARKET_KEY_FILE} or die "chown: $!";
	rm($ow, '', {}, qw(keygen --rotate));
	my @st = stat $ow->{env}{REMARKET_KEY_FILE};
	is($st[4], $nobody, 'keygen --rotate run as root keeps the key file\'s owner');
}

# ---- logs: message ids, not addresses, unless log_pii = yes ----
for my $pii ('no', 'yes') {
	my $l = world(0022);
	is((rm($l, '', {}, 'init'))[0], 0, "log_pii=$pii: init");
	rm($l, '', {}, qw(flows holdout abandoned_cart 0));
	my $ev = '{"type":"cart","email":"pii.person@example.com","name":"Ann","consent":true,'
		. '"cart_id":"c1","currency":"EUR","items":[{"sku":"LAMP-1","name":"Lamp","price":10,"qty":1}]}';
	rm($l, $ev, {}, qw(event --now), $T0);
	# the outbox cannot be written: the send fails and is logged
	my $ob = $l->{env}{REMARKET_OUTBOX};
	rmdir $ob or die "rmdir $ob: $!";
	open my $f, '>', $ob or die;
	close $f;
	my $log = '';
	for my $t ($T0 + $HOUR + 60, $T0 + 2 * $HOUR + 120) {
		my ($rc, $out, $err) = rm($l, '', { REMARKET_LOG_PII => $pii }, qw(tick --now), $t);
		$log .= $err;
	}
	like($log, qr/message \d+/, "log_pii=$pii: the failed send is logged by message id") or diag $log;
	if ($pii eq 'no') {
		unlike($log, qr/pii\.person|example\.com/, 'log_pii=no: the log names no address') or diag $log;
	} else {
		like($log, qr/to pii\.person\@example\.com/, 'log_pii=yes: the log names the address') or diag $log;
	}
}
my ($lrc, undef, $lerr) = rm(world(0022), '', { REMARKET_LOG_PII => 'maybe' }, 'init');
is($lrc, 1, 'log_pii=maybe: refused');
like($lerr, qr/log_pii: 'maybe' must be yes or no/, '... with a message naming the key and the values');

done_testing();
