#!/usr/bin/perl
# Mail a strict inbox accepts, with the real binary and no web server
# (links are opened through the CGI form, as 85-keys-files.t does): a
# store name with a comma and a contact with a non-ASCII name give mail
# that Python's email package (policy=default) parses with no defect, one
# From mailbox, the names intact, Reply-To and Auto-Submitted; money and
# dates in the store's locale and time zone; every store and product link
# goes through /l/, which records the click, restores the cart, and
# refuses a forged token or a target it did not sign.
use strict;
use warnings;
use utf8;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

binmode(Test::More->builder->$_, ':encoding(UTF-8)') for qw(output failure_output todo_output);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
plan skip_all => 'python3 not installed' unless grep { -x "$_/python3" } split /:/, $ENV{PATH};
plan skip_all => 'sqlite3 not installed' unless grep { -x "$_/sqlite3" } split /:/, $ENV{PATH};
my $T0 = 1795000000; # 2026-11-18T11:06:40Z
my $HOUR = 3600;

my $tmp = tempdir(CLEANUP => !$ENV{KEEP});
my %env = (
	REMARKET_DB => "$tmp/var/rm.db", REMARKET_KEY_FILE => "$tmp/var/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null',
	REMARKET_FROM => 'Maison Demo, Paris <shop@example.com>',
	REMARKET_REPLY_TO => '"Service client, Maison Demo" <help@example.com>',
	REMARKET_BASE_URL => 'https://shop.example/rm',
	REMARKET_STORE_URL => 'https://shop.example',
	REMARKET_CART_URL => 'https://shop.example/cart?restore={cart}&code={code}',
	REMARKET_LOCALE => 'fr_FR', REMARKET_TIMEZONE => 'Europe/Paris',
	REMARKET_CURRENCY => 'EUR',
	# the mails of one contact follow each other here: no smart-sending gap
	REMARKET_MIN_GAP_HOURS => 0,
);

sub rm {
	my ($stdin, $extra, @args) = @_;
	local %ENV = (%ENV, %env, %{ $extra || {} });
	open my $fh, '>:encoding(UTF-8)', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	my $rc = $? >> 8;
	return ($rc, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}

# GET PATH?QUERY through the CGI form: (status, whole response).
sub cgi_get {
	my ($path, $query, $now) = @_;
	my ($rc, $out) = rm('', { GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'GET',
		PATH_INFO => $path, QUERY_STRING => $query, REMARKET_NOW => $now });
	my ($status) = $out =~ /^Status: (\d+)/m;
	return ($status // 0, $out);
}

sub sql {
	my ($q) = @_;
	my $v = `sqlite3 '$env{REMARKET_DB}' "$q"`;
	chomp $v;
	return $v;
}

sub slurp { local (@ARGV, $/) = @_; return <> // '' }

sub mails {
	opendir my $d, $env{REMARKET_OUTBOX} or return ();
	return map { "$env{REMARKET_OUTBOX}/$_" } sort grep { /\.eml$/ } readdir $d;
}

# What Python's email package (policy=default) makes of a mail: its
# defects, the From/To/Reply-To mailboxes and the decoded text part.
my $py = <<'PY';
import email, json, sys
from email import policy
raw = open(sys.argv[1], 'rb').read()
m = email.message_from_bytes(raw, policy=policy.default)
defects = [repr(d) for d in m.defects]
out = {}
for h in ('From', 'To', 'Reply-To', 'Auto-Submitted', 'Subject'):
    v = m[h]
    if v is None:
        continue
    defects += [h + ': ' + repr(d) for d in v.defects]
    if h in ('From', 'To', 'Reply-To'):
        out[h] = [[a.display_name, a.addr_spec] for a in v.addresses]
    else:
        out[h] = str(v)
for part in m.walk():
    defects += [repr(d) for d in part.defects]
    if part.get_content_type() in ('text/plain', 'text/html'):
        out[part.get_content_type()] = part.get_content()
out['defects'] = defects
print(json.dumps(out))
PY
open my $pf, '>', "$tmp/parse.py" or die;
print $pf $py;
close $pf;

sub parse_mail {
	my ($file) = @_;
	my $json = `python3 '$tmp/parse.py' '$file'`;
	require JSON::PP;
	return eval { JSON::PP->new->utf8->decode($json) } // {};
}

my ($rc, $out, $err) = rm('', {}, 'init');
is($rc, 0, 'init') or diag $err;
rm('', {}, qw(flows holdout abandoned_cart 0));
my $ev = '{"type":"cart","email":"zoe@example.com","name":"Zoë Müller","consent":true,'
	. '"cart_id":"c1","currency":"EUR","items":[{"sku":"LAMP-1","name":"Lampe","price":1234.5,'
	. '"qty":1,"url":"https://shop.example/p/lamp"}]}';
($rc, $out, $err) = rm($ev, {}, qw(event --now), $T0);
is($rc, 0, 'a cart from Zoë Müller') or diag $err;
($rc, $out, $err) = rm('', {}, qw(tick --now), $T0 + $HOUR + 60);
like($out, qr/"sent":1/, 'the reminder is sent') or diag "$out $err";
my ($mail) = mails();
ok($mail, 'the reminder is in the outbox') or BAIL_OUT('no mail');

my $m = parse_mail($mail);
is_deeply($m->{defects}, [], "Python's email (policy=default) finds no defect")
	or diag explain $m->{defects};
is_deeply($m->{From}, [['Maison Demo, Paris', 'shop@example.com']],
	'From: one mailbox, the comma kept in its name');
is_deeply($m->{To}, [['Zoë Müller', 'zoe@example.com']], "To: the contact's non-ASCII name");
is_deeply($m->{'Reply-To'}, [['Service client, Maison Demo', 'help@example.com']],
	'Reply-To: reply_to');
is($m->{'Auto-Submitted'}, 'auto-generated', 'Auto-Submitted: auto-generated');
my $text = $m->{'text/plain'} // '';
my $html = $m->{'text/html'} // '';
like($html, qr/1\x{202f}234,50\x{a0}\x{20ac}/, 'the price in fr_FR: 1 234,50 €');
unlike($html, qr{href="https://shop\.example/p/lamp"}, 'no plain product link is left');

my ($tok, $q) = $html =~ m{https://shop\.example/rm/l/([A-Za-z0-9_-]+)\?(u=https%3A%2F%2Fshop\.example%2Fp%2Flamp)"};
ok($tok, 'the product link goes through /l/') or BAIL_OUT('no tracked link');
my ($stok, $sq) = $html =~ m{https://shop\.example/rm/l/([A-Za-z0-9_-]+)\?(u=https%3A%2F%2Fshop\.example)"};
ok($stok, 'the store link too');

my ($st, $resp) = cgi_get("/l/$tok", $q, $T0 + 2 * $HOUR);
is($st, 302, 'GET /l/<token>: 302');
like($resp, qr{^Location: https://shop\.example/p/lamp\?restore=c1&code=\r?$}m,
	'... to the product page, with the cart to restore');
like($resp, qr/^Set-Cookie: rm_vid=/m, '... joining this browser to the contact');
is(sql("SELECT count(*) FROM interactions WHERE kind = 'click'"), 1, '... and the click is recorded');
($st) = cgi_get("/l/$stok", $sq, $T0 + 2 * $HOUR);
is($st, 302, 'the store link redirects too');
is(sql("SELECT count(*) FROM interactions WHERE kind = 'click'"), 2, '... recording its click');

(my $forged = $tok) =~ s/^(.{6})(.)/$1 . ($2 eq 'A' ? 'B' : 'A')/e;
($st, $resp) = cgi_get("/l/$forged", $q, $T0 + 2 * $HOUR);
is($st, 403, 'a forged token: 403');
unlike($resp, qr/^Location:/m, '... redirecting nowhere');
($st, $resp) = cgi_get("/l/$tok", 'u=https%3A%2F%2Fevil.example%2Fp%2Flamp', $T0 + 2 * $HOUR);
is($st, 403, 'a token with a target it was not signed for (off the host): 403');
unlike($resp, qr/^Location:/m, '... redirecting nowhere');
($st) = cgi_get("/l/$tok", '', $T0 + 2 * $HOUR);
is($st, 403, 'a token without its target: 403');
is(sql("SELECT count(*) FROM interactions WHERE kind = 'click'"), 2, 'none of these recorded a click');

# an order after the click is the click's
my $order = '{"type":"order","order_id":"o1","email":"zoe@example.com","cart_id":"c1",'
	. '"currency":"EUR","total":1234.5,"items":[{"sku":"LAMP-1","name":"Lampe","price":1234.5}]}';
($rc, $out, $err) = rm($order, {}, qw(event --now), $T0 + 3 * $HOUR);
is($rc, 0, 'the order') or diag $err;
is(sql("SELECT attribution FROM orders WHERE order_key = 'o1'"), 'click',
	'... is attributed to the tracked click');

# post-purchase: its product and store links are tracked too, its dates
# and money in the store's locale
rm('', {}, qw(flows enable post_purchase));
$order = '{"type":"order","order_id":"o2","email":"bob@example.com","name":"Bob","consent":true,'
	. '"currency":"EUR","total":22,"items":[{"sku":"MUG-1","name":"Tasse","price":22,'
	. '"url":"https://shop.example/p/mug"}]}';
($rc, $out, $err) = rm($order, {}, qw(event --now), $T0 + 4 * $HOUR);
is($rc, 0, "Bob's order") or diag $err;
($rc, $out, $err) = rm('', {}, qw(tick --now), $T0 + 5 * $HOUR + 60);
like($out, qr/"sent":2/, "the thank-yous are sent (Zoë's order is one too)") or diag "$out $err";
my ($thanks) = grep { `grep -c '^To: Bob <bob\@example.com>' '$_'` > 0 } mails();
$m = parse_mail($thanks // '');
is_deeply($m->{defects}, [], "... and parses with no defect");
$html = $m->{'text/html'} // '';
like($html, qr{/rm/l/[A-Za-z0-9_-]+\?u=https%3A%2F%2Fshop\.example%2Fp%2Fmug"}, '... its product link is tracked');
like($html, qr/22,00\x{a0}\x{20ac}/, '... its total in fr_FR: 22,00 €');
unlike($html, qr{href="https://shop\.example(?!/rm/)[/"]}, '... no plain store link is left');

# win-back: a lapsed customer with a comma and an accent in her name; the
# offer's minimum spend as a person writes it, its expiry in Paris time
rm('', {}, qw(flows holdout winback 0));
$order = '{"type":"order","order_id":"o3","email":"emile@example.com","name":"Émile, Jr.",'
	. '"consent":true,"currency":"EUR","total":97.18,"ts":' . ($T0 - 100 * 86400) . ','
	. '"items":[{"sku":"MUG-1","name":"Tasse","price":97.18,"url":"https://shop.example/p/mug"}]}';
($rc, $out, $err) = rm($order, {}, qw(event --now), $T0 + 5 * $HOUR);
is($rc, 0, "Émile's order of 100 days ago") or diag $err;
rm('', {}, qw(tick --now), $T0 + 6 * $HOUR);
($rc, $out, $err) = rm('', {}, qw(tick --now), $T0 + 6 * $HOUR + 7 * 86400 + 60);
my @offer = grep { my $t = slurp($_); $t =~ /^Subject: .*% off/m && $t =~ /^To: .*<emile\@example\.com>/m } mails();
is(scalar @offer, 1, 'the win-back offer is sent') or diag "$out $err";
$m = parse_mail($offer[0] // '');
is_deeply($m->{defects}, [], '... and parses with no defect');
is_deeply($m->{To}, [['Émile, Jr.', 'emile@example.com']], '... To: the name with its comma and accent');
$text = $m->{'text/plain'} // '';
like($text, qr/On orders of 95\x{a0}\x{20ac} or more/, '... the minimum spend 97.18 is written 95 €');
# sent at 2026-11-25 17:07:40 UTC, valid 14 days: 18:07 in Paris
like($text, qr/Valid until mercredi 9 décembre, 18:07\./, '... the expiry in Paris time, in French');
unlike($text, qr/UTC|  /, '... no "UTC", no double space');
like($m->{'text/html'} // '', qr{/rm/l/[A-Za-z0-9_-]+\?u=https%3A%2F%2Fshop\.example"}, '... its store link is tracked');

done_testing();
