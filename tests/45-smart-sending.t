#!/usr/bin/perl
# Issue 13: smart sending and quiet hours, by the real binary with an
# injected clock (--now). Pairs of carts of one shopper half an hour apart:
# with min_gap_hours = 4 the second reminder is deferred (tick JSON
# "deferred") and goes 4 h after the first; with the default 16 h it
# would be later than its step allows and is skipped as stale
# ("deferred_skipped"); min_gap_hours = 0 sends both. A shopper in New
# York (tz from the event) is not mailed at 06:06 their time when
# quiet_hours_email = 21-9, and gets the mail at 09:00 there. The report
# counts deferred and deferred_skipped. A malformed quiet_hours_* is a
# configuration error naming the key.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $tmp = tempdir(CLEANUP => !$ENV{KEEP});
my ($MIN, $HOUR) = (60, 3600);
my $T0 = 1795000000; # 2026-11-18 11:06:40Z: 06:06:40 in New York
my %env = (
	REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_STATIC_DIR => "$root/static", REMARKET_SMTP_URL => '',
	REMARKET_FROM => 'Maison Test <shop@example.com>', REMARKET_CONFIG => '/dev/null',
);

sub rm {
	my ($extra, $stdin, @args) = @_;
	local %ENV = (%ENV, %env, %{ $extra || {} });
	delete local $ENV{GATEWAY_INTERFACE};
	open my $fh, '>', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql { my $q = shift; my $o = `sqlite3 '$env{REMARKET_DB}' "$q"`; chomp $o; $o }
sub cart {
	my ($email, $cart, $ts, $tz) = @_;
	my $z = $tz ? qq(,"tz":"$tz") : '';
	return qq({"type":"cart","email":"$email","consent":true,"cart_id":"$cart")
	    . qq(,"ts":$ts$z,"items":[{"sku":"A","name":"Lamp","price":40}]});
}
sub tick {
	my ($now, %cfg) = @_;
	my ($rc, $out, $err) = rm(\%cfg, '', 'tick', '--now', $now);
	my $j = eval { JSON::PP->new->decode($out) } || {};
	diag("tick at T0+" . ($now - $T0) . ": rc $rc $err") if $rc;
	return $j;
}
sub status { sql("SELECT m.status FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
	. "JOIN carts k ON k.id = e.cart_id WHERE k.cart_key = '$_[0]' AND m.step = 1") }

is((rm({}, '', 'init'))[0], 0, 'init');
# three pairs of carts, half an hour apart, each pair one shopper's
my %at = (a => $T0, b => $T0 + 10 * $HOUR, c => $T0 + 20 * $HOUR);
for my $p (sort keys %at) {
	for my $k (1, 2) {
		my $ts = $at{$p} + ($k - 1) * 30 * $MIN;
		my ($rc, undef, $err) = rm({}, cart("$p\@example.com", "$p$k", $ts), 'event', '--now', $ts);
		is($rc, 0, "cart $p$k") or diag $err;
	}
}
my $j = tick($T0 + $HOUR, REMARKET_MIN_GAP_HOURS => 4);
is($j->{sent}, 1, 'a1 is reminded at +1 h');
$j = tick($T0 + 90 * $MIN, REMARKET_MIN_GAP_HOURS => 4);
is($j->{deferred}, 1, 'min_gap_hours = 4: a2, due 30 min later, is deferred (tick JSON "deferred")');
is(status('a2'), 'queued', '... and waits');
is(sql("SELECT next_try FROM messages WHERE deferred_by = 'gap' AND status = 'queued'"),
   $T0 + 5 * $HOUR, '... until 4 h after a1 went');
$j = tick($T0 + 5 * $HOUR - 60, REMARKET_MIN_GAP_HOURS => 4);
is(status('a2'), 'queued', '... not a minute before');
$j = tick($T0 + 5 * $HOUR, REMARKET_MIN_GAP_HOURS => 4);
is(status('a2'), 'sent', '... sent 4 h after a1');

$j = tick($at{b} + $HOUR);
is(status('b1'), 'sent', 'b1 is reminded');
$j = tick($at{b} + 90 * $MIN);
is($j->{deferred_skipped}, 1, 'the default 16 h: b2 would be past its limit (11.5 h): skipped as stale');
is($j->{stale}, 1, '... counted stale');
is(status('b2'), 'skipped', '... recorded skipped');

$j = tick($at{c} + $HOUR, REMARKET_MIN_GAP_HOURS => 0);
$j = tick($at{c} + 90 * $MIN, REMARKET_MIN_GAP_HOURS => 0);
is(status('c1') . ' ' . status('c2'), 'sent sent', 'min_gap_hours = 0: both reminders go');

# quiet hours in the shopper's zone: T0 + 24 h is 06:06:40 in New York
my $ny = $T0 + 24 * $HOUR;
my ($rc, undef, $err) = rm({}, cart('ny@example.com', 'ny', $ny - $HOUR, 'America/New_York'),
			   'event', '--now', $ny - $HOUR);
is($rc, 0, 'a cart of a shopper in New York (tz)') or diag $err;
is(sql("SELECT tz FROM contacts WHERE email = 'ny\@example.com'"), 'America/New_York', '... zone stored');
$j = tick($ny, REMARKET_QUIET_HOURS_EMAIL => '21-9');
is(status('ny'), 'queued', 'quiet_hours_email = 21-9: not at 06:06 New York time');
is(sql("SELECT next_try FROM messages WHERE deferred_by = 'quiet'"), $ny + 10400,
   '... deferred to 09:00 there (14:00Z)');
$j = tick($ny + 10400, REMARKET_QUIET_HOURS_EMAIL => '21-9');
is(status('ny'), 'sent', '... and sent then');

my (undef, $rep) = rm({}, '', 'report', '--json', '--now', $ny + 6 * $HOUR);
my $r = eval { JSON::PP->new->decode($rep) } || {};
# a2's second step (+24 h) falls 30 min after a1's, and waits too
is(sql("SELECT count(*) FROM messages WHERE step = 2 AND deferred_by = 'gap' AND status = 'queued'"), 1,
   "a2's second step, due 30 min after a1's, waits as well");
is($r->{deferred}, 4, 'report: 4 messages held back (a2 twice, b2, ny)');
is($r->{deferred_skipped}, 1, 'report: 1 of them skipped as stale (b2)');
my (undef, $text) = rm({}, '', 'report', '--now', $ny + 6 * $HOUR);
like($text, qr/deferred +4 held back .*, 1 of them skipped as stale/, 'the text report says so');

($rc, undef, $err) = rm({ REMARKET_QUIET_HOURS_SMS => '25-3' }, '', 'tick', '--now', $T0);
isnt($rc, 0, 'quiet_hours_sms = 25-3 is refused');
like($err, qr/quiet_hours_sms: '25-3'/, '... naming the key');
done_testing();
