#!/usr/bin/perl
# Issue 14: `remarket backtest` on real data. The fixture
# tests/data/online-retail-sample.csv (60 customers of the UCI "Online
# Retail" data set, CC BY 4.0; see tests/data/README.md), given an email
# per CustomerID and consent, is imported whole into a store; then
# `backtest --from 2011-09-01 --to 2011-10-15` says what win-back would
# have done. Its numbers are checked against an independent reference:
# a second database that lives the same weeks for real, the orders of
# each day imported on their day and `remarket tick --now` run once a
# day into the outbox, and against sqlite3 queries on the imported
# history for who came back within 30 days. The store's own database must
# be left as it was.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();
use Time::Local qw(timegm);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
plan skip_all => 'sqlite3 not installed' if system('sqlite3 -version >/dev/null 2>&1');
my $tmp = tempdir(CLEANUP => 1);
my $DAY = 86400;
my %env = (
	REMARKET_DB => "$tmp/store.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_SMTP_URL => '', REMARKET_FROM => 'Shop <shop@example.com>',
	REMARKET_CONFIG => '/dev/null', TMPDIR => "$tmp/scratch",
);
mkdir "$tmp/scratch" or die;

sub rm {
	my ($db, @args) = @_;
	local %ENV = (%ENV, %env, REMARKET_DB => $db);
	delete local $ENV{GATEWAY_INTERFACE};
	my $out = `'$bin' @args 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql {
	my ($db, $q) = @_;
	my $o = `sqlite3 '$db' "$q"`;
	chomp $o;
	return $o;
}
sub day { my ($y, $m, $d) = split /-/, shift; timegm(0, 0, 0, $d, $m - 1, $y) }
sub ymd { my @t = gmtime shift; sprintf '%04d-%02d-%02d', $t[5] + 1900, $t[4] + 1, $t[3] }

# The fixture with an email for each CustomerID (guests keep none) and
# consent; the lines by day, for the reference's daily imports.
open my $in, '<', "$root/tests/data/online-retail-sample.csv" or die $!;
my $head = <$in>;
$head =~ s/\r?\n$//;
my (@lines, %by_day);
while (my $l = <$in>) {
	$l =~ s/\r?\n$//;
	my @f = split /,/, $l;
	my $cust = $f[-2];
	my ($date) = $l =~ /,(\d{4}-\d\d-\d\d)T\d\d:/ or die "no date in $l";
	$l .= $cust ne '' ? ",c$cust\@example.com,1" : ',,';
	push @lines, $l;
	push @{$by_day{$date}}, $l;
}
close $in;
$head .= ',email,consent';
sub csv {
	my ($name, @rows) = @_;
	open my $fh, '>', "$tmp/$name" or die;
	print $fh join("\n", $head, @rows), "\n";
	close $fh;
	return "$tmp/$name";
}

my $store = "$tmp/store.db";
my ($rc, $out, $err) = rm($store, 'init');
is($rc, 0, 'init the store') or diag $err;
($rc, $out, $err) = rm($store, qw(import orders), csv('all.csv', @lines), '--now', '2012-01-01');
like($out, qr/"imported":230/, 'the whole fixture imported (230 orders)') or diag $out, $err;
my %before = map { $_ => sql($store, "SELECT count(*) FROM $_") }
	qw(enrollments messages orders refunds segments);
$before{refunded} = sql($store, 'SELECT total(refunded) FROM orders');

my ($from, $to) = (day('2011-09-01'), day('2011-10-15'));
($rc, $out, $err) = rm($store, qw(backtest --from 2011-09-01 --to 2011-10-15 --json --now 2012-01-01));
is($rc, 0, 'backtest --json runs') or diag $err;
my $bt = eval { JSON::PP::decode_json($out) } || {};
ok($bt->{flows}, 'it prints JSON') or diag $out;
my ($wb) = grep { $_->{name} eq 'winback' } @{$bt->{flows} || []};
$wb ||= {};
is($bt->{days}, 45, 'one tick a day, 2011-09-01 to 2011-10-15: 45');
is($bt->{orders}, sql($store, "SELECT count(*) FROM orders WHERE ts > $from AND ts <= $to"),
   'the orders of those days were re-applied on their day');
my %after = map { $_ => sql($store, "SELECT count(*) FROM $_") }
	qw(enrollments messages orders refunds segments);
$after{refunded} = sql($store, 'SELECT total(refunded) FROM orders');
is_deeply(\%after, \%before, "the store's database is as it was (nothing enrolled, sent or removed)");
opendir my $sd, "$tmp/scratch" or die;
is_deeply([grep { !/^\./ } readdir $sd], [], 'the temporary copy is gone');
ok(!-d "$tmp/outbox" || !glob("$tmp/outbox/*"), 'nothing in the outbox');

# The reference: a database that lives those weeks, with the real tick.
my $ref = "$tmp/ref.db";
($rc, $out, $err) = rm($ref, 'init');
is($rc, 0, 'init the reference') or diag $err;
my @early = map { @{$by_day{$_}} } grep { day($_) < $from } sort keys %by_day;
rm($ref, qw(import orders), csv('early.csv', @early), '--now', $from);
my $ticks_ok = 1;
for (my $t = $from; $t <= $to; $t += $DAY) {
	my $rows = $by_day{ymd($t - $DAY)};
	rm($ref, qw(import orders), csv('day.csv', @$rows), '--now', $t)
		if $t > $from && $rows;
	($rc, $out, $err) = rm($ref, 'tick', '--now', $t);
	$ticks_ok &&= $rc == 0 or diag "tick at " . ymd($t) . ": $err";
}
ok($ticks_ok, 'the reference: 45 real ticks into the outbox');
my $wf = "(SELECT id FROM flows WHERE name = 'winback')";
my $ref_enrolled = sql($ref, "SELECT count(*) FROM enrollments WHERE flow_id = $wf");
ok($ref_enrolled > 5, "the reference enrolled $ref_enrolled customers in win-back");
is($wb->{enrolled}, $ref_enrolled, 'backtest: as many enrolled as the real ticks');
is($wb->{held_out}, sql($ref, "SELECT count(*) FROM enrollments WHERE flow_id = $wf AND holdout = 1"),
   '... as many held out');
my $mails = () = glob("$tmp/outbox/*.eml");
ok($mails > 0, "the real ticks wrote $mails mails");
is($wb->{mails}, $mails, '... and backtest says as many would have gone');
my %ref_day = map { split /\|/ } split /\n/, sql($ref,
	"SELECT date(created, 'unixepoch'), count(*) FROM enrollments WHERE flow_id = $wf GROUP BY 1");
my %bt_day = map { $_->{enrolled} ? ($_->{date} => $_->{enrolled}) : () } @{$wb->{per_day} || []};
is_deeply(\%bt_day, \%ref_day, '... enrolled on the same days');
my %ref_mail = map { split /\|/ } split /\n/, sql($ref,
	"SELECT date(m.next_try, 'unixepoch'), count(*) FROM messages m JOIN enrollments e "
	. "ON e.id = m.enrollment_id WHERE e.flow_id = $wf AND m.status = 'sent' GROUP BY 1");
my %bt_mail = map { $_->{mails} ? ($_->{date} => $_->{mails}) : () } @{$wb->{per_day} || []};
is_deeply(\%bt_mail, \%ref_mail, '... and their mails due on the same days');
my ($peak) = sort { $ref_mail{$b} <=> $ref_mail{$a} || $a cmp $b } keys %ref_mail;
is("$wb->{peak_day} $wb->{peak_mails}", "$peak $ref_mail{$peak}", "peak day $peak");

# Who came back within 30 days, counted on the imported history for the
# reference's enrollments (nothing could have caused it).
my $end = sql($store, "SELECT min(max(ts), $to + 30 * 86400) FROM orders");
my $back = "EXISTS (SELECT 1 FROM s.orders o JOIN s.contacts sc ON sc.id = o.contact_id "
	. "WHERE sc.email = c.email AND o.ts > e.created AND o.ts <= e.created + 30 * 86400)";
my $q = "ATTACH '$store' AS s; SELECT count(*), total(e.created + 30 * 86400 <= $end), "
	. "total($back), total(e.created + 30 * 86400 <= $end AND $back) FROM enrollments e "
	. "JOIN contacts c ON c.id = e.contact_id WHERE e.flow_id = $wf";
my ($n, $complete, $came, $came_complete) = map { int } split /\|/, sql($ref, $q);
is($wb->{came_back}, $came, "came back on their own within 30 days: $came of $n");
is($wb->{complete}, $complete, "... $complete enrollments whose 30 days ended in the history");
is($wb->{came_back_complete}, $came_complete, "... of whom $came_complete came back");
ok(abs(($wb->{organic_rate} // -1) - ($complete ? $came_complete / $complete : -1)) < 1e-4,
   '... the organic rate');
is($wb->{window_days}, 30, 'a win-back window is 30 days');

($rc, $out, $err) = rm($store, qw(backtest --from 2011-09-01 --to 2011-10-15 --now 2012-01-01));
is($rc, 0, 'backtest (text) runs') or diag $err;
like($out, qr/^winback: $ref_enrolled customers enrolled from \S+ to \S+, \d+ of them held out/m,
     'the text names the enrolled');
like($out, qr/ordered within 30 days with no mail \(the baseline\): $came_complete of the $complete /,
     '... and the baseline');
like($out, qr/mails a week \(from Monday\):\n    \d{4}-\d\d-\d\d \d+/, '... and the mails a week');

($rc, $out, $err) = rm($store, qw(backtest --to 2011-10-15));
is($rc, 2, 'no --from: exit 2');
like($err, qr/usage: remarket backtest/, '... with the usage');
($rc, $out, $err) = rm($store, qw(backtest --from 2011-10-15 --to 2011-09-01));
is($rc, 2, '--from after --to: exit 2');
($rc, $out, $err) = rm($store, qw(backtest --from yesterday));
is($rc, 2, 'a date that is none: exit 2');
like($err, qr/want a date/, '... saying what a date is');

done_testing();
