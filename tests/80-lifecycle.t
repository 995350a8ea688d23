#!/usr/bin/perl
# The customer life over 200 simulated days, with the real binary: a store
# imports its catalog and a year of past orders from CSV, then the tick
# runs once a day. Who gets which win-back email when is checked against
# the rules: lapsed after the threshold (two thirds of it when at risk),
# step 1 at once, the code a week later (VIPs get early access instead),
# the last chance at +19 days; once per lapse, never within the 180-day
# cool-down, never after an unsubscribe, never without consent; an order
# ends it.
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
my $tmp = tempdir(CLEANUP => 1);
my $DAY = 86400;
my $T0 = 1795000000;    # the day remarket is installed
my %env = (
	REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_FROM => 'Maison Test <shop@example.com>',
);

sub rm {
	my ($stdin, $extra, @args) = @_;
	local %ENV = (%ENV, %env, %{ $extra || {} });
	open my $fh, '>', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	my $rc = $? >> 8;
	return ($rc, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql { my $q = shift; my $o = `sqlite3 '$env{REMARKET_DB}' "$q"`; chomp $o; $o }

is((rm('', {}, 'init'))[0], 0, 'init');
is((rm('', {}, qw(flows holdout winback 0)))[0], 0, 'no holdout: every lapsed customer is followed');

# ---- the catalog and a year of orders, as CSV ----
my @products = (
	[qw(LAMP-1 lighting 39.90)], [qw(LAMP-2 lighting 64.00)], [qw(LAMP-3 lighting 24.50)],
	[qw(VASE-1 decor 24.50)], [qw(VASE-2 decor 32.00)], [qw(MIRROR-1 decor 89.00)],
	[qw(THROW-1 textiles 59.00)], [qw(THROW-2 textiles 45.00)], [qw(RUG-1 textiles 149.00)],
	[qw(CANDLE-1 decor 12.00)],
);
open my $pf, '>', "$tmp/products.csv" or die;
print $pf "sku,name,price,url,image,category,review_author,review_rating,review_text\n";
for my $p (@products) {
	my ($sku, $cat, $price) = @$p;
	print $pf qq($sku,"Product $sku, handmade",$price,https://shop.example/p/$sku,,$cat,Eva,5,"Lovely, ""really"" lovely"\n);
}
close $pf;
my ($rc, $out, $err) = rm('', {}, qw(import products), "$tmp/products.csv");
is($rc, 0, 'import products') or diag $err;
like($out, qr/"imported":10,"refused":0/, '10 products imported (quoted fields, doubled quotes)');

srand(42);
my (%last, %orders, %noconsent);
open my $of, '>', "$tmp/orders.csv" or die;
print $of "order_id,email,date,sku,name,price,qty,currency,consent\n";
my $lines = 0;
for my $c (1 .. 150) {
	my $email = sprintf 'customer%03d@example.com', $c;
	my $consent = $c % 15 == 0 ? 'no' : 'yes';
	$noconsent{$email} = 1 if $consent eq 'no';
	# cadence: a few weekly buyers (VIP), many every 1-4 months, some once
	my $every = $c <= 8 ? 14 : $c <= 100 ? 30 + int(rand(90)) : 400;
	my $t = $T0 - 360 * $DAY + int(rand(60)) * $DAY;
	my $n = 0;
	while ($t < $T0 - $DAY) {
		my $id = sprintf 'H-%03d-%02d', $c, ++$n;
		for my $l (1 .. 1 + int(rand(3))) {
			my $p = $products[int(rand(@products))];
			printf $of "%s,%s,%s,%s,\"Product %s, handmade\",%s,%d,EUR,%s\n", $id, $email,
			    POSIX::strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $t), $p->[0], $p->[0],
			    $p->[2], 1 + int(rand(2)), $consent;
			$lines++;
		}
		$last{$email} = $t;
		$orders{$email}++;
		last if $every > 360;
		$t += ($every + int(rand(15))) * $DAY;
	}
}
close $of;
use POSIX ();
($rc, $out, $err) = rm('', {}, qw(import orders), "$tmp/orders.csv", '--now', $T0);
is($rc, 0, "import $lines order lines") or diag $err;
my $norders = 0;
$norders += $_ for values %orders;
like($out, qr/"imported":$norders,"refused":0/, "$norders past orders imported");
is(sql('SELECT count(*) FROM order_lines'), $lines, 'every line is an order line for recommendations');
is(sql("SELECT count(*) FROM enrollments"), 0, 'past orders start no flow by themselves');

# a bad date is refused, never taken as "now"; blank lines are no rows
open my $bf, '>', "$tmp/bad.csv" or die;
print $bf "order_id,email,date,sku,name,price,qty\n\n"
    . "X-1,late\@example.com,2024-01-15 10:00:00,LAMP-1,Lamp,10,1\n"
    . "X-2,ok\@example.com,2024-01-16,LAMP-1,Lamp,10,1\n";
close $bf;
($rc, $out, $err) = rm('', {}, qw(import orders), "$tmp/bad.csv", '--now', $T0);
is($rc, 1, 'an import with a refused row exits 1');
like($out, qr/"imported":1,"refused":1/, 'the good order is in, the undated one is not');
like($err, qr/bad\.csv line 3: date: '2024-01-15 10:00:00' is not ISO 8601/, 'the bad line is named');
is(sql("SELECT count(*) FROM orders WHERE order_key = 'X-1'"), 0, 'no order was dated "now"');
# issue 14: the refusals by reason, and every refused line in --rejects
($rc, $out, $err) = rm('', {}, qw(import orders), "$tmp/bad.csv",
		       '--rejects', "$tmp/rejects.csv", '--now', $T0);
is($rc, 1, 'again with --rejects: exit 1');
like($err, qr/refused: 1 line, 1 order, revenue 10\.00: date: not ISO 8601/,
     '... the summary names the reason, lines, orders and revenue');
open my $rj, '<', "$tmp/rejects.csv" or die "rejects: $!";
my @rej = <$rj>;
close $rj;
is_deeply(\@rej, ["order_id,sku,name,qty,price,date,customer_id,reason\n",
		  "X-1,LAMP-1,Lamp,1,10,2024-01-15 10:00:00,,date: not ISO 8601 or Unix seconds\n"],
	  '... and the rejects file holds the refused line and why');

($rc, $out) = rm('', {}, 'segments', '--now', $T0);
like($out, qr/lapsed after 90 days/, 'segments: the default 90-day threshold');
for my $seg (qw(vip active lapsed)) {
	like($out, qr/^\s+$seg\s+\d+$/m, "segments: some customers are $seg");
}

# ---- 200 days of daily ticks; life goes on meanwhile ----
my $unsub = 'customer020@example.com';    # unsubscribes from the first mail
my $back = 'customer031@example.com';     # orders again after the first mail
my ($unsub_at, $back_at);
for my $d (0 .. 200) {
	my $now = $T0 + $d * $DAY + 3600;
	($rc, $out, $err) = rm('', {}, 'tick', '--now', $now);
	if ($rc) { fail("tick on day $d: $err"); last }
	for my $who ([$unsub, \$unsub_at], [$back, \$back_at]) {
		my ($email, $at) = @$who;
		next if $$at;
		my $m = sql("SELECT m.id FROM messages m JOIN contacts c ON c.id = m.contact_id "
			. "WHERE c.email = '$email' AND m.status = 'sent' LIMIT 1");
		next unless $m;
		$$at = $now + 3600;
		if ($email eq $unsub) {
			my $f = sprintf '%s/m%06d.eml', $env{REMARKET_OUTBOX}, $m;
			my $mail = do { local (@ARGV, $/) = $f; <> };
			my ($tok) = $mail =~ m{^List-Unsubscribe: <[^>]*/u/([A-Za-z0-9_-]+)>}m;
			my (undef, $resp) = rm('List-Unsubscribe=One-Click', {
				GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'POST',
				PATH_INFO => "/u/$tok", CONTENT_LENGTH => 26,
				CONTENT_TYPE => 'application/x-www-form-urlencoded',
				REMARKET_NOW => $$at });
			like($resp, qr/^Status: 200/, "$email unsubscribes with one click on day $d");
		} else {
			my $o = qq({"type":"order","order_id":"back-1","email":"$email","total":50,)
			    . qq("ts":$$at,"items":[{"sku":"CANDLE-1","name":"Candle","price":50}]});
			is((rm($o, {}, 'event', '--now', $$at))[0], 0, "$email orders again on day $d");
		}
	}
}

# ---- who got what, when ----
my $rows = sql("SELECT c.email || '|' || e.id || '|' || e.created || '|' || e.status || '|' || "
	. "coalesce(e.exit_reason, '') FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
	. "WHERE e.flow_id = 2 ORDER BY e.id");
my @enr = map { [split /\|/] } split /\n/, $rows;
ok(@enr >= 40, scalar(@enr) . ' win-back enrollments over 200 days');

my ($early, $noc, $cool, $late, $wrongstep) = (0, 0, 0, 0, 0);
my %by;
for my $e (@enr) {
	my ($email, $id, $created) = @$e;
	push @{ $by{$email} }, $created;
	# the last order before enrolling is at least 60 days (2/3 of 90) old
	my $lastord = sql("SELECT max(o.ts) FROM orders o JOIN contacts c ON c.id = o.contact_id "
		. "WHERE c.email = '$email' AND o.ts < $created");
	$early++ if $created - $lastord < 60 * $DAY;
	$noc++ if $noconsent{$email};
	# step 1 the day of enrolling; step 2 or 3 a week later, never both
	my $steps = join ' ', split /\n/, sql("SELECT step || '\@' || ((sent_at - $created) / 86400) "
		. "FROM messages WHERE enrollment_id = $id AND status = 'sent' ORDER BY step");
	# complete, or cut short by the end of the simulation or an exit
	if ($steps !~ /^1\@0(?: [23]\@7(?: 4\@19)?)?$/) {
		$wrongstep++;
		diag("enrollment $id ($email): '$steps'");
	}
}
for my $email (keys %by) {
	my @t = sort { $a <=> $b } @{ $by{$email} };
	for my $i (1 .. $#t) {
		$cool++ if $t[$i] - $t[$i - 1] < 180 * $DAY;
	}
}
is($early, 0, 'nobody was enrolled before 60 days without an order (90, or 2/3 of it at risk)');
is($noc, 0, 'nobody without consent was enrolled');
is($cool, 0, 'no second win-back within the 180-day cool-down');
is($wrongstep, 0, 'each win-back: step 1 at once, the code (or VIP early access) at +7 d, last chance at +19 d');

my $vip_steps = sql("SELECT count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
	. "WHERE e.flow_id = 2 AND m.step = 3 AND m.status = 'sent'");
my $offers = sql("SELECT count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
	. "WHERE e.flow_id = 2 AND m.step = 2 AND m.status = 'sent'");
ok($offers > 0, "$offers loyalty codes sent");
ok($vip_steps > 0, "$vip_steps VIPs got early access instead");
is(sql("SELECT count(*) FROM discounts d JOIN messages m ON m.id = d.message WHERE m.step = 3"), 0,
    'VIPs were given no discount code');
ok(sql("SELECT count(*) FROM discounts WHERE min_spend > 0 AND percent = 15") == $offers,
    'every code is 15 % with a minimum spend (the average order value)');

ok($unsub_at, "$unsub got a first mail");
is(sql("SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id WHERE "
	. "c.email = '$unsub' AND m.status = 'sent' AND m.sent_at > $unsub_at"), 0,
    'nothing was sent after the unsubscribe');
ok($back_at, "$back got a first mail");
is(sql("SELECT e.exit_reason FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
	. "WHERE c.email = '$back' AND e.flow_id = 2 ORDER BY e.id LIMIT 1"), 'order',
    'the order ended that win-back');

# the same through the report
($rc, $out) = rm('', {}, 'report', '--json', '--now', $T0 + 201 * $DAY, '--since', $T0);
my $j = JSON::PP->new->decode($out);
is($j->{winback}{threshold_days}, 90, 'report: the threshold and how it was found')
    and like($j->{winback}{threshold_source}, qr/winback_after = 90/, '... set by winback_after');
is($j->{winback}{contacted}, scalar(keys %by), 'report: contacted = the enrolled customers');
ok($j->{winback}{reactivated_30d} >= 1, "report: $j->{winback}{reactivated_30d} reactivated within 30 days");
my $segs = 0;
$segs += $_ for values %{ $j->{segments} };
is($segs, 151, 'report: each of the 151 customers (150 and ok\@example.com) is in one segment');

done_testing();
