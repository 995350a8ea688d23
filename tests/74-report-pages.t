#!/usr/bin/perl
# 74-report-pages.t: the operator's pages behind the report (issue 11).
#
#   1. A world of 60 abandoned carts (10 % held out): Ann (the newest)
#      clicks her reminder and orders; Bob's name is hostile HTML.
#   2. GET /report/carts (the activity list) and /report/contact (a person)
#      answer 401 without the token or a report link, 200 with it; the list
#      shows Ann's cart with what was sent (the step by name), clicked and
#      ordered, pages 50 carts at a time, and links to her contact page
#      with the token carried; every name is escaped.
#   3. The report page: steps named, flows without activity folded, a date
#      form that keeps the token, "is it real?" with the incremental revenue
#      equal to the JSON's lift x carts messaged x average order.
#   4. One clock: with REMARKET_CLOCK_FILE, the report, a signed hook and
#      the demo backend's +1 h button agree on the time.
#   5. Chromium screenshots of the report, the activity list and the
#      contact page: tests/artifacts/report-page.png, report-carts.png,
#      report-contact.png.
# Requests go through the CGI front-end (no web server needed).
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();
use HTTP::Tiny;
use IO::Socket::INET;
use Digest::SHA qw(hmac_sha256_hex);
use POSIX qw(strftime);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;

my $tmp = tempdir(CLEANUP => 1);
my $T0 = 1795000000;
my %env = (
	REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_SMTP_URL => '', REMARKET_FROM => 'Maison Test <shop@example.com>',
	REMARKET_HOOK_SECRET => 'hook-secret-456', REMARKET_TICK_TOKEN => 'tick-secret-123',
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

# One request through the CGI front-end; returns (status, headers, body).
sub cgi {
	my ($path, $now, $query, $extra) = @_;
	my (undef, $out) = run_rm('', {
		GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'GET',
		PATH_INFO => $path, QUERY_STRING => $query // '',
		REMOTE_ADDR => '127.0.0.1', (defined $now ? (REMARKET_NOW => $now) : ()),
		%{ $extra || {} } });
	my ($h, $b) = split /\r\n\r\n/, $out, 2;
	my ($st) = ($h // '') =~ /^Status: (\d+)/m;
	return ($st // 0, $h // '', $b // '');
}

sub save {
	my ($name, $text) = @_;
	open my $fh, '>', "$tmp/$name" or die;
	print $fh $text;
	close $fh;
	return "$tmp/$name";
}

# ---- 1. the world ----
is((run_rm('', {}, 'init'))[0], 0, 'init');
my @ev;
for my $i (1 .. 60) {
	my ($email, $name) = ("p$i\@example.com", "P $i");
	($email, $name) = ('anna@example.com', 'Ann Example') if $i == 1;
	($email, $name) = ('bob@example.com', 'Bob <b>&"bold"') if $i == 2;
	push @ev, qq({"type":"cart","email":"$email","name":) . JSON::PP->new->encode([$name]) =~ s/^\[|\]$//gr
	    . qq(,"consent":true,"cart_id":"k$i","currency":"EUR","ts":) . ($T0 + 61 - $i)
	    . qq(,"items":[{"sku":"LAMP-1","name":"Rattan lamp","price":40,"qty":1}]});
}
# oldest first, so that Ann's cart (k1) is the newest by time and by id
is((run_rm('[' . join(',', reverse @ev) . ']', {}, 'event', '--now', $T0 + 60))[0], 0, '60 carts recorded');
my (undef, $tick) = run_rm('', {}, 'tick', '--now', $T0 + 3700);
like($tick, qr/"enrolled":60/, 'all 60 enrolled at +1 h');

my $db = $env{REMARKET_DB};
sub sql1 { my $v = `sqlite3 '$db' "$_[0]"`; chomp $v; $v }
my $ann_msg = sql1("SELECT m.id FROM messages m JOIN contacts c ON c.id = m.contact_id WHERE c.email = 'anna\@example.com' AND m.step = 1");
ok($ann_msg, "Ann got the reminder (message $ann_msg)");
my $ann_id = sql1("SELECT id FROM contacts WHERE email = 'anna\@example.com'");
my $mail = do { local (@ARGV, $/) = sprintf('%s/m%06d.eml', $env{REMARKET_OUTBOX}, $ann_msg); <> } // '';
$mail =~ s/=\r?\n//g;
my ($rtok) = $mail =~ m{/rm/r/([A-Za-z0-9_-]+)};
my ($st) = cgi("/r/$rtok", $T0 + 2 * 3600);
is($st, 302, 'Ann clicks her recovery link');
my $o = qq({"type":"order","order_id":"o-ann","email":"anna\@example.com","cart_id":"k1","total":40,"currency":"EUR","ts":) . ($T0 + 3 * 3600) . '}';
is((run_rm($o, {}, 'event', '--now', $T0 + 3 * 3600))[0], 0, 'and orders her cart');
my $held = sql1("SELECT c.email FROM enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 1 ORDER BY e.id LIMIT 1");
ok($held, "someone is held out ($held)");

# ---- 2. the activity list and the contact page ----
my $now = $T0 + 86400;
my (undef, $link) = run_rm('', {}, 'report', '--link', '--now', $now);
my ($t) = $link =~ /[?&]t=([A-Za-z0-9_-]+)/;
ok($t, 'a report link');
for my $p ('/report/carts', '/report/contact') {
	my ($s0, $h0) = cgi($p, $now, "c=$ann_id");
	is($s0, 401, "GET $p without a token -> 401");
	like($h0, qr/^WWW-Authenticate: Basic/m, '... and the browser is asked for it');
	my ($s1) = cgi($p, $now, "c=$ann_id&t=${t}x");
	is($s1, 401, "GET $p with a forged token -> 401");
}
my ($s200, $hc, $carts) = cgi('/report/carts', $now, "t=$t");
is($s200, 200, 'GET /report/carts with the token -> 200');
like($hc, qr{^Content-Type: text/html}m, '... HTML');
like($hc, qr{^Referrer-Policy: no-referrer}m, '... that leaks no token through a Referer');
like($carts, qr/60 carts, newest first, page 1 of 2/, 'the list counts 60 carts, 50 a page');
my @rows = $carts =~ /<tr><td class=l>/g;
is(scalar @rows, 50, '50 carts on page 1');
my ($ann_row) = $carts =~ m{(<tr><td class=l>(?:(?!</tr>).)*anna\@example\.com(?:(?!</tr>).)*</tr>)}s;
ok($ann_row, "Ann's cart is listed");
like($ann_row // '', qr/Ann Example/, '... with her name');
like($ann_row // '', qr/40\.00 EUR/, '... its value');
like($ann_row // '', qr/Cart reminder \x{c2}\x{b7} \+1 h &middot; <b>clicked<\/b>/,
    '... what was sent, by step name, and that she clicked it');
like($ann_row // '', qr/40\.00 EUR<br><span class=note>[0-9-]+ [0-9:]+, after a click/,
    '... and what she ordered, after a click');
like($ann_row // '', qr{href="contact\?c=$ann_id&amp;t=$t"}, '... her name links to her contact page, token carried');
my (undef, undef, $page2) = cgi('/report/carts', $now, "t=$t&page=2");
my ($held_row) = "$carts$page2" =~ m{(<tr><td class=l>(?:(?!</tr>).)*\Q$held\E(?:(?!</tr>).)*</tr>)}s;
like($held_row // '', qr/held out: sent nothing/, 'a held-out cart says it got nothing');
unlike($carts, qr/Bob <b>/, 'a hostile name is not HTML in the list');
like($carts, qr/Bob &lt;b&gt;&amp;&quot;bold&quot;/, '... it is escaped');
like($carts, qr{href="carts\?page=2&amp;t=$t"}, 'the next page is linked, token carried');
my @rows2 = $page2 =~ /<tr><td class=l>/g;
is(scalar @rows2, 10, 'page 2 holds the 10 oldest');
like($page2, qr/p60\@example\.com/, '... the oldest cart among them');
unlike($page2, qr/anna\@example\.com/, "... not Ann's, the newest");
is((cgi('/report/carts', $now, "t=$t&page=0"))[0], 400, 'page=0 -> 400');
is((cgi('/report/carts', $now, "t=$t&page=x1"))[0], 400, 'page=x1 -> 400');

my ($sc, undef, $contact) = cgi('/report/contact', $now, "c=$ann_id&t=$t");
is($sc, 200, "GET /report/contact?c=$ann_id with the token -> 200");
like($contact, qr{<h1>anna\@example\.com</h1>}, 'the contact page names Ann');
my (undef, $cli) = run_rm('', {}, 'contact', 'anna@example.com');
my @missing;
for my $line (split /\n/, $cli) {
	my ($path, $value) = $line =~ /^(\S+)\s+(.*)$/ or next;
	my $h = $path =~ s/&/&amp;/gr =~ s/</&lt;/gr =~ s/>/&gt;/gr =~ s/"/&quot;/gr;
	my $v = $value =~ s/&/&amp;/gr =~ s/</&lt;/gr =~ s/>/&gt;/gr =~ s/"/&quot;/gr;
	push @missing, $line unless index($contact, "<td class=l>$h</td><td class=l>$v") >= 0;
}
diag("not on the page: $_") for @missing[0 .. ($#missing < 4 ? $#missing : 4)];
ok($cli =~ /carts\[0\]\.status/ && !@missing, 'the page shows every line of remarket contact');
like($contact, qr{orders\[0\]\.order</td><td class=l>o-ann}, "... her order among them");
like($contact, qr{orders\[0\]\.ts</td><td class=l>\d+ <span class=note>2026-11-1\d \d\d:\d\d UTC</span>}, '... times with their dates');
like($contact, qr{messages\[0\]\.interactions\[0\]\.kind</td><td class=l>click}, '... and her click');
is((cgi('/report/contact', $now, "c=999999&t=$t"))[0], 404, 'an unknown contact -> 404');
is((cgi('/report/contact', $now, "t=$t"))[0], 400, 'no contact number -> 400');
my $bob_id = sql1("SELECT id FROM contacts WHERE email = 'bob\@example.com'");
my (undef, undef, $bob) = cgi('/report/contact', $now, "c=$bob_id&t=$t");
ok($bob =~ /Bob &lt;b&gt;&amp;&quot;bold&quot;/ && $bob !~ /Bob <b>/, "Bob's name is escaped on his page");

# ---- 3. the report page ----
my (undef, undef, $json_text) = cgi('/report.json', $now, "t=$t");
my $j = JSON::PP->new->utf8->decode($json_text);
my (undef, undef, $page) = cgi('/report', $now, "t=$t");
like($page, qr{<td title="step 1">Cart reminder \x{c2}\x{b7} \+1 h</td>}, 'steps are named by template and delay');
is($j->{flows}[0]{steps}[0]{name}, "Cart reminder \x{b7} +1 h", '... in the JSON too');
like($page, qr{<details class=folded><summary>3 flows without activity in this period or disabled: winback, post_purchase \(disabled\), browse_abandonment \(disabled\)</summary>},
    'flows without activity are folded into one line');
like($page, qr{<form class=range method=get action=report>.*name=since value=2026-10-20.*name=until value=2026-11-19.*<input type=hidden name=t value="$t">}s,
    'a date form with since, until and the token');
like($page, qr{<a href="report/carts\?t=$t">}, 'the report links to the activity list, token carried');
like($page, qr{<text [^>]*class=day>2026-10-20</text>.*<text [^>]*class=day>2026-11-19</text>}s, "the chart's axis is dated");
like($page, qr{<div class="big flat"><span data-k="unsubscribe_rate"}, 'an unsubscribe rate of 0 is not green');
like($page, qr{<div class="big good"><span data-k="recovered_revenue"}, 'recovered revenue above 0 is green');
like($page, qr{A cart is <b>recovered</b> when it was ordered within 7 days}, 'one definition of recovered, on the page');
# the JSON's lift has 4 decimals: it may be off by 0.00005 x carts x order
my $k = $j->{abandoned_carts} * $j->{average_order};
my $want = $j->{recovery_lift} * $k;
ok(abs($j->{incremental_revenue} - $want) <= 0.00005 * $k + 0.005
    && abs($j->{incremental_revenue_ci95}[0] - $j->{recovery_lift_ci95}[0] * $k) <= 0.00005 * $k + 0.005
    && abs($j->{incremental_revenue_ci95}[1] - $j->{recovery_lift_ci95}[1] * $k) <= 0.00005 * $k + 0.005
    && $j->{recovered_revenue} == 40
    && $j->{average_order} == 40,
    "incremental revenue = lift x carts messaged x average order ($j->{incremental_revenue})");
my $t_until = $T0 + 86400;
my (undef, undef, $win) = cgi('/report.json', $now, "t=$t&since=2026-11-18&until=2026-11-19");
my $w = JSON::PP->new->decode($win);
is($w->{until} - $w->{since}, 2 * 86400, 'until as a date includes that whole day');

# ---- 4. one clock ----
my $clock = save('clock', "259200\n");
my (undef, undef, $cj) = cgi('/report.json', undef, '', { REMARKET_CLOCK_FILE => $clock,
	HTTP_AUTHORIZATION => 'Bearer tick-secret-123' });
my $cjj = eval { JSON::PP->new->decode($cj) } || {};
ok(abs(($cjj->{until} // 0) - (time + 259200)) < 60, 'the report runs on the clock file (+72 h)');
my $body = '{"type":"identify","email":"clock@example.com"}';
my $ts = time + 259200;
my $sig = "t=$ts,v1=" . hmac_sha256_hex("$ts.$body", 'hook-secret-456');
my $evin = save('ev', $body);
my $evout = do {
	local %ENV = (%ENV, %env, GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'POST',
		PATH_INFO => '/events', CONTENT_TYPE => 'application/json',
		CONTENT_LENGTH => length $body, HTTP_X_REMARKET_SIGNATURE => $sig,
		REMOTE_ADDR => '127.0.0.1', REMARKET_CLOCK_FILE => $clock);
	`'$bin' < '$evin' 2>/dev/null`;
};
like($evout, qr/^Status: 20[02]/m, 'a hook signed at the demo clock is accepted on it') or diag $evout;

SKIP: {
	my $py = (grep { -x } '/usr/bin/python3', '/usr/local/bin/python3')[0];
	skip 'python3 missing', 3 unless $py;
	my $port = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1)->sockport;
	my $cf = "$tmp/backend-clock";
	my $pid = fork // die;
	if (!$pid) {
		%ENV = (%ENV, %env, REMARKET_CLOCK_FILE => $cf);
		open STDERR, '>', "$tmp/backend.log";
		exec $py, "$root/demo/backend.py", '--port', $port, '--remarket-url', 'http://127.0.0.1:9/rm',
		    '--remarket-bin', $bin, '--outbox', "$tmp/outbox", '--state', "$tmp/backend";
		exit 127;
	}
	my $ua = HTTP::Tiny->new(timeout => 30);
	my $up;
	for (1 .. 100) { last if ($up = $ua->get("http://127.0.0.1:$port/api/health")->{success}); select undef, undef, undef, 0.1 }
	ok($up, 'the demo backend answers');
	my $r = $ua->post("http://127.0.0.1:$port/api/clock?advance=3600");
	my $rj = eval { JSON::PP->new->decode($r->{content}) } || {};
	my $file = do { local (@ARGV, $/) = $cf; <> } // '';
	is($file, "3600\n", '+1 h writes the offset where remarket reads it');
	my $rl = eval { JSON::PP->new->decode($ua->get("http://127.0.0.1:$port/api/report-link")->{content}) } || {};
	my ($lt) = ($rl->{url} // '') =~ /[?&]t=([A-Za-z0-9_-]+)/;
	my (undef, undef, $rep) = cgi('/report.json', undef, "t=" . ($lt // ''), { REMARKET_CLOCK_FILE => $cf });
	my $repj = eval { JSON::PP->new->decode($rep) } || {};
	ok(abs(($repj->{until} // 0) - ($rj->{now} // -1)) < 60,
	    "the backend's tick, its report link and the report agree on the demo clock")
	    or diag "tick now $rj->{now}, report until " . ($repj->{until} // 'none');
	kill 'TERM', $pid;
	waitpid $pid, 0;
}

# ---- 5. screenshots ----
SKIP: {
	my $chromium = (grep { -x } '/usr/bin/chromium', '/usr/bin/chromium-browser')[0];
	skip 'chromium not installed', 3 unless $chromium;
	my @flags = qw(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
	    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars);
	mkdir "$root/tests/artifacts";
	my %shots = ('report-page' => [$page, 1900], 'report-carts' => [$carts, 1400],
	    'report-contact' => [$contact, 1400]);
	for my $name (sort keys %shots) {
		my $html = save("$name.html", $shots{$name}[0]);
		my $png = "$root/tests/artifacts/$name.png";
		unlink $png;
		system("'$chromium' @flags --user-data-dir='$tmp/profile-$name' --window-size=900,$shots{$name}[1] "
		    . "--screenshot='$png' 'file://$html' >/dev/null 2>&1");
		ok(-s $png, "screenshot kept as tests/artifacts/$name.png");
	}
}

done_testing();
