#!/usr/bin/perl
# The report as an operator sees it: a world of 120 abandoned carts (with
# the default 10 % holdout), clicks and orders, then GET /report rendered
# by headless Chromium. Every number on the page (data-k/data-v) must
# equal the same number in GET /report.json; a screenshot is kept in
# tests/artifacts/report.png. Requests go through the CGI front-end.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
my $chromium = (grep { -x } '/usr/bin/chromium', '/usr/bin/chromium-browser')[0];
plan skip_all => 'chromium not installed (apt-get install chromium)' unless $chromium;
BAIL_OUT("$bin not built: run make check") unless -x $bin;

my $tmp = tempdir(CLEANUP => 1);
my $T0 = 1795000000;
my %env = (
	REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_FROM => 'Maison Test <shop@example.com>',
);

sub run_rm {
	my ($stdin, $extra, @args) = @_;
	local %ENV = (%ENV, %env, %{ $extra || {} });
	my $in = "$tmp/stdin";
	open my $fh, '>', $in or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$in' 2>'$tmp/stderr'`;
	return ($? >> 8, $out);
}

# One request through the CGI front-end; returns (headers, body).
sub cgi {
	my ($path, $now, $query) = @_;
	my (undef, $out) = run_rm('', {
		GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'GET',
		PATH_INFO => $path, QUERY_STRING => $query // '',
		REMOTE_ADDR => '127.0.0.1', REMARKET_NOW => $now });
	my ($h, $b) = split /\r\n\r\n/, $out, 2;
	return ($h // '', $b // '');
}

is((run_rm('', {}, 'init'))[0], 0, 'init');
is((run_rm('', {}, 'flows', 'variant', 'abandoned_cart', '1', 'template=social_proof', 'share=50'))[0], 0,
    'step 1 gets a variant B (the social proof template) for half the contacts');
my @ev;
for my $i (1 .. 120) {
	push @ev, qq({"type":"cart","email":"r$i\@example.com","name":"R $i","consent":true,)
	    . qq("cart_id":"r$i","currency":"EUR","ts":$T0,"items":[{"sku":"LAMP-1",)
	    . qq("name":"Rattan lamp","price":40,"qty":1}]});
}
is((run_rm('[' . join(',', @ev) . ']', {}, 'event', '--now', $T0))[0], 0, '120 carts recorded');
my ($rc, $out) = run_rm('', {}, 'tick', '--now', $T0 + 3700);
like($out, qr/"enrolled":120/, 'all 120 enrolled at +1 h');

# a third of the messaged shoppers click their link and buy the next day;
# every fourth held-out shopper buys anyway
my $db = $env{REMARKET_DB};
my @msgs = split /\n/, `sqlite3 '$db' "SELECT m.id || ' ' || c.email FROM messages m JOIN contacts c ON c.id = m.contact_id WHERE m.step = 1 ORDER BY m.id"`;
my @held = split /\n/, `sqlite3 '$db' "SELECT c.email FROM enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 1"`;
ok(@held > 0 && @held < 30, scalar(@held) . ' of 120 held out');
my ($clicked, $orders) = (0, 0);
for my $k (0 .. $#msgs) {
	next if $k % 3;
	my ($id, $email) = split / /, $msgs[$k];
	open my $fh, '<', sprintf('%s/m%06d.eml', $env{REMARKET_OUTBOX}, $id) or next;
	local $/;
	my $mail = <$fh>;
	$mail =~ s/=\r?\n//g;
	my ($t) = $mail =~ m{/rm/r/([A-Za-z0-9_-]+)} or next;
	my ($h) = cgi("/r/$t", $T0 + 2 * 3600);
	$clicked++ if $h =~ /^Status: 302/m;
	my $o = qq({"type":"order","order_id":"o-$id","email":"$email","total":40,"currency":"EUR","ts":) . ($T0 + 86400) . '}';
	$orders++ if (run_rm($o, {}, 'event', '--now', $T0 + 86400))[0] == 0;
}
for my $k (0 .. $#held) {
	next if $k % 4;
	my $o = qq({"type":"order","order_id":"h-$k","email":"$held[$k]","total":40,"currency":"EUR","ts":) . ($T0 + 86400) . '}';
	run_rm($o, {}, 'event', '--now', $T0 + 86400);
}
ok($clicked > 20 && $clicked == $orders, "$clicked shoppers clicked and ordered");

my $now = $T0 + 2 * 86400;
# the report is the operator's: from loopback too it needs the token or a
# link from `remarket report --link`
my ($h401) = cgi('/report.json', $now);
like($h401, qr/^Status: 401/m, 'GET /report.json from 127.0.0.1 without a token -> 401');
my ($lrc, $link) = run_rm('', {}, 'report', '--link', '--days', '3', '--now', $now);
like($link, qr{^http://127\.0\.0\.1:8080/rm/report\?t=[A-Za-z0-9_-]+\n\z}, 'report --link prints a URL')
    or diag $link;
my ($t) = $link =~ /[?&]t=([A-Za-z0-9_-]+)/;
my ($hexp) = cgi('/report', $now + 3 * 86400 + 1, "t=$t");
like($hexp, qr/^Status: 401/m, '... that stops working after --days 3');
my (undef, $json_text) = cgi('/report.json', $now, "t=$t");
my $j = eval { JSON::PP->new->decode($json_text) };
ok($j, 'GET /report.json is JSON') or diag $json_text;
is($j->{recovered_carts}, $orders, 'recovered carts = the messaged shoppers who ordered');
is($j->{flows}[0]{holdout}, scalar @held, 'the held out are counted');
my @s1 = grep { $_->{position} == 1 } @{ $j->{flows}[0]{steps} };
is(scalar @s1, 2, 'step 1 is reported as variants A and B');
my ($c, $o) = (0, 0);
$c += $_->{clicked}, $o += $_->{orders} for @s1;
is($c, $clicked, 'step 1 clicks counted');
is($o, $orders, 'step 1 orders attributed');
ok(exists $s1[1]{versus_a}{lift_ci95}, 'variant B is compared with A, with an interval');

# `remarket report` prints the numbers of `remarket report --json`
my (undef, $cli_json) = run_rm('', {}, 'report', '--json', '--now', $now);
my (undef, $text) = run_rm('', {}, 'report', '--now', $now);
my $cj = eval { JSON::PP->new->decode($cli_json) } || {};
my @lines = (
	sprintf('abandoned carts    %d (held out not counted)', $cj->{abandoned_carts} // -1),
	sprintf('recovered carts    %d (%.1f %%)', $cj->{recovered_carts} // -1,
	    $cj->{abandoned_carts} ? 100 * $cj->{recovered_carts} / $cj->{abandoned_carts} : 0),
	sprintf('recovered revenue  %.2f %s', $cj->{recovered_revenue} // -1, $cj->{currency} // ''),
	sprintf('orders             %d (%d attributed, %d influenced)',
	    map { $_ // -1 } @$cj{qw(orders attributed_orders influenced_orders)}),
	sprintf('emails             %d sent, %d opened, %d clicked, %d unsubscribed, %d bounced',
	    map { $_ // -1 } @$cj{qw(sent opened clicked unsubscribed bounced)}),
	sprintf('stale steps        %d (too late to send: recorded, not sent)', $cj->{stale_steps} // -1),
	sprintf('discount codes     %d issued, %d redeemed, cost %.2f %s',
	    (map { $_ // -1 } @$cj{qw(codes_issued codes_redeemed discount_cost)}), $cj->{currency} // ''),
	sprintf('flagged codes      %d orders with a code used before, %d with an expired code (not attributed to it)',
	    map { $_ // -1 } @{ $cj->{codes_flagged} || {} }{qw(reused expired)}),
	map { sprintf('  step %d%s %s  sent %d  opened %d  clicked %d  orders %d  revenue %.2f'
	    . '  bounce_rate %.2f %%  complaint_rate %.2f %%',
	    $_->{position}, $_->{variant} eq 'B' ? 'B' : ' ', $_->{name} || '(unnamed)',
	    @$_{qw(sent opened clicked orders revenue)},
	    100 * ($_->{bounce_rate} // -1), 100 * ($_->{complaint_rate} // -1)) }
	    map { @{ $_->{steps} } } @{ $cj->{flows} || [] },
);
my @missing = grep { index($text, "$_\n") < 0 } @lines;
diag("not in the text: $_") for @missing;
ok(@lines > 8 && !@missing && $cj->{sent},
    'remarket report prints every headline and step number of report --json, in its lines')
    or diag $text;

my ($h, $html) = cgi('/report', $now, "t=$t");
like($h, qr{Content-Type: text/html}, 'GET /report is HTML');
open my $fh, '>', "$tmp/report.html" or die;
print $fh $html;
close $fh;

my @flags = qw(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync);
my $dom = `'$chromium' @flags --user-data-dir='$tmp/profile' --dump-dom 'file://$tmp/report.html' 2>/dev/null`;
like($dom, qr/<svg/, 'Chromium rendered the page, chart included');

# every number on the page equals the JSON's
sub lookup {
	my ($data, $key) = @_;
	for my $part (split /\./, $key) {
		return undef unless ref $data;
		$data = ref $data eq 'ARRAY' ? $data->[$part] : $data->{$part};
	}
	return $data;
}
my ($n, $bad) = (0, 0);
while ($dom =~ /data-k="([^"]+)" data-v="([^"]+)"/g) {
	my ($k, $v) = ($1, $2);
	$n++;
	my $want = lookup($j, $k);
	if (!defined $want || abs($want - $v) > 0.00005) {
		$bad++;
		diag("page $k = $v, JSON " . ($want // 'missing'));
	}
}
# "when will it be known" shows the enrollments needed, and their days
# when there is a rate to count them with
sub eta { my ($x) = @_; my $m = $x->{verdict_more_enrollments} > 0; $m + ($m && $x->{verdict_days} >= 0) }
my ($steps, $bees, $etas) = (0, 0, eta($j));
for my $f (@{ $j->{flows} }) {
	$steps += @{ $f->{steps} };
	$bees += grep { $_->{variant} eq 'B' } @{ $f->{steps} };
	$etas += eta($f);
}
is($n, 11 + 11 + 8 + 6 + 6 * @{ $j->{flows} } + 7 * $steps + $bees + $etas,
    'every number on the page carries its value (11 cards, 11 in "is it real?", '
    . '8 win-back, 6 segments, 6 a flow, 7 a step (with bounce and complaint rates), '
    . '1 a B variant, 1-2 a verdict\'s estimate)');
is($bad, 0, 'each equals the number in report.json');

mkdir "$root/tests/artifacts";
my $png = "$root/tests/artifacts/report.png";
unlink $png;
system("'$chromium' @flags --user-data-dir='$tmp/profile2' --hide-scrollbars --window-size=900,1600 --screenshot='$png' 'file://$tmp/report.html' >/dev/null 2>&1");
ok(-s $png, 'screenshot kept as tests/artifacts/report.png');

done_testing();
