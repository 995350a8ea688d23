#!/usr/bin/perl
# 30-bad-input.t: hostile and malformed requests through the real nginx.
#
# Table-driven: each case is [name, method, path, headers, body, status,
# options]. For every case the test checks the status, that a 4xx answer
# is application/json with an "error" key (the signed-link pages answer
# text/html instead), that a 405 carries an Allow header, and that no row
# was written to events, contacts, carts or orders.
#
# A header value of SIGN is replaced, at send time, by a valid
# X-Remarket-Signature over the case's body.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Digest::SHA qw(hmac_sha256_hex);
use RMTest qw(:DEFAULT bin $TICK_TOKEN $HOOK_SECRET);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

my $J = JSON::PP->new->canonical;
use constant SIGN => "\0SIGN";
use constant CAP  => 65536;

start();
my $now = time();

# --- bodies ----------------------------------------------------------------
sub item_h { return { sku => 'A-1', name => 'Lamp', price => 10, qty => 1,
    url => 'https://shop.example/p/a', image => 'https://shop.example/i/a.jpg', @_ } }

# cart(key => value, ...): a valid cart event with fields replaced (undef
# removes); item => {...} replaces fields of its single item.
sub cart_h {
    my %o = @_;
    my $it = item_h(%{ delete $o{item} || {} });
    delete @$it{ grep { !defined $it->{$_} } keys %$it };
    my %e = (type => 'cart', email => 'zed@example.com', cart_id => 'c-99',
        currency => 'EUR', items => [$it], total => 10, %o);
    delete @e{ grep { !defined $e{$_} } keys %e };
    return \%e;
}
sub cart { $J->encode(cart_h(@_)) }
sub ident { $J->encode({ type => 'identify', email => 'zed@example.com', name => 'Zed',
    consent => JSON::PP::true, @_ }) }

my $valid = cart();
my $JSONH = { 'Content-Type' => 'application/json', 'X-Remarket-Signature' => SIGN };
sub signed { return { %$JSONH, @_ } }

# Raw JSON with a hand-written fragment where the encoder cannot help.
sub raw_cart {
    my ($field_json) = @_;    # e.g. '"name":"A\u0000B"' inside the item
    return '{"type":"cart","email":"zed@example.com","cart_id":"c-99","currency":"EUR",'
        . '"items":[{"sku":"A-1","price":10,"qty":1,' . $field_json . '}],"total":10}';
}

my $big_items = '{"type":"cart","email":"zed@example.com","cart_id":"c-99","currency":"EUR","items":['
    . join(',', ('{"qty":1}') x 10000) . '],"total":0}';
my $items101 = cart(items => [ map { item_h(sku => "S$_", url => undef, image => undef) } 1 .. 101 ]);
my $pad_over = cart() . (' ' x (CAP + 1 - length cart()));       # CAP + 1 bytes
my $pad_cap  = ident(name => 'Cap') . (' ' x (CAP - length ident(name => 'Cap')));  # exactly CAP
my $mega = '{"type":"cart","email":"zed@example.com","cart_id":"c-99","items":[],"pad":"'
    . ('x' x (1024 * 1024)) . '"}';
my $deep = ('[' x 5000) . (']' x 5000);

my $t_old = $now - 400;
my $t_future = $now + 3600;
my $other = cart(cart_id => 'c-98');
my $hex = hmac_sha256_hex("$now.$valid", $HOOK_SECRET);

my $form = { 'Content-Type' => 'application/x-www-form-urlencoded' };
my $cjson = { 'Content-Type' => 'application/json' };
my $ctext = { 'Content-Type' => 'text/plain' };
my $html = { html => 1 };

my @cases = (
    # --- signature --------------------------------------------------------
    [ 'no signature header', 'POST', '/rm/events', $cjson, $valid, 401 ],
    [ 'signature with the wrong secret', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => sign($valid, $now, 'not-the-secret') }, $valid, 401 ],
    [ 'signature t 400 s old', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => sign($valid, $t_old) }, $valid, 401 ],
    [ 'signature t 1 h in the future', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => sign($valid, $t_future) }, $valid, 401 ],
    [ 'signature header garbage', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => 'garbage' }, $valid, 401 ],
    [ 'signature header empty', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => '' }, $valid, 401 ],
    [ 'signature t not a number', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => "t=abc,v1=$hex" }, $valid, 401 ],
    [ 'signature without v1', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => "t=$now" }, $valid, 401 ],
    [ 'signature v1 truncated', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => "t=$now,v1=" . substr($hex, 0, 32) }, $valid, 401 ],
    [ 'valid signature over a different body', 'POST', '/rm/events',
        { %$cjson, 'X-Remarket-Signature' => sign($other, $now) }, $valid, 401 ],

    # --- content type and size --------------------------------------------
    [ 'Content-Type text/plain on /events', 'POST', '/rm/events',
        signed('Content-Type' => 'text/plain'), $valid, 415 ],
    [ 'Content-Type form on /events', 'POST', '/rm/events',
        signed('Content-Type' => 'application/x-www-form-urlencoded'), $valid, 415 ],
    [ 'Content-Type application/octet-stream on /events', 'POST', '/rm/events',
        signed('Content-Type' => 'application/octet-stream'), $valid, 415 ],
    [ 'empty body', 'POST', '/rm/events', signed(), '', 400 ],
    [ 'body of 1 MB', 'POST', '/rm/events', signed(), $mega, 413 ],
    [ '10 000 items (over 64 KiB)', 'POST', '/rm/events', signed(), $big_items, 413 ],
    [ 'body of 65537 bytes', 'POST', '/rm/events', signed(), $pad_over, 413 ],
    [ '101 items', 'POST', '/rm/events', signed(), $items101, 400 ],

    # --- JSON shape -------------------------------------------------------
    [ 'malformed JSON', 'POST', '/rm/events', signed(), '{"type":"cart",', 400 ],
    [ 'top level a string', 'POST', '/rm/events', signed(), '"cart"', 400 ],
    [ 'top level a number', 'POST', '/rm/events', signed(), '42', 400 ],
    [ 'top level null', 'POST', '/rm/events', signed(), 'null', 400 ],
    [ 'nested 5000 deep', 'POST', '/rm/events', signed(), $deep, 400 ],
    [ 'unknown type', 'POST', '/rm/events', signed(), cart(type => 'launch_missiles'), 400 ],
    [ 'missing type', 'POST', '/rm/events', signed(), cart(type => undef), 400 ],
    [ 'array with one valid and one invalid event', 'POST', '/rm/events', signed(),
        '[' . ident() . ',' . cart(email => 'bad') . ']', 400 ],

    # --- email --------------------------------------------------------------
    [ 'identify without email', 'POST', '/rm/events', signed(), ident(email => undef) =~ s/,?"email":null//r, 400 ],
    [ 'email without @', 'POST', '/rm/events', signed(), ident(email => 'not-an-email'), 400 ],
    [ 'email over 254 chars', 'POST', '/rm/events', signed(),
        ident(email => ('a' x 64) . '@' . join('.', ('b' x 60) x 3) . '.example.com'), 400 ],
    [ 'email with a space', 'POST', '/rm/events', signed(), ident(email => 'ann smith@example.com'), 400 ],
    [ 'email with CRLF Bcc', 'POST', '/rm/events', signed(),
        ident(email => "ann\@example.com\r\nBcc: x\@y.com"), 400 ],
    [ 'email with LF', 'POST', '/rm/events', signed(), ident(email => "ann\@example.com\nx"), 400 ],
    [ 'email a number', 'POST', '/rm/events', signed(), ident(email => 12), 400 ],

    # --- name -------------------------------------------------------------
    [ 'name with LF', 'POST', '/rm/events', signed(), ident(name => "Zed\nBcc: x\@y.com"), 400 ],
    [ 'name with CR', 'POST', '/rm/events', signed(), ident(name => "Zed\rX"), 400 ],
    [ 'name with BEL control char', 'POST', '/rm/events', signed(), ident(name => "Zed\x07"), 400 ],
    [ 'name with NUL (\u0000)', 'POST', '/rm/events', signed(), ident(name => "Zed\x00x"), 400 ],
    [ 'email with NUL then CRLF Bcc', 'POST', '/rm/events', signed(),
        ident(email => "nul\@example.com\x00\r\nBcc: evil\@x.com"), 400 ],

    # --- cart fields ------------------------------------------------------
    [ 'cart_id of 65 chars', 'POST', '/rm/events', signed(), cart(cart_id => 'c' x 65), 400 ],
    [ 'cart_id with a space', 'POST', '/rm/events', signed(), cart(cart_id => 'c 19'), 400 ],
    [ 'cart_id with NUL then a space', 'POST', '/rm/events', signed(), cart(cart_id => "c-1\x00 x"), 400 ],
    [ 'item name with CR LF', 'POST', '/rm/events', signed(), cart(item => { name => "Lamp\r\nBcc: x" }), 400 ],
    [ 'item name with NUL then CR LF', 'POST', '/rm/events', signed(),
        cart(item => { name => "L\x00\r\nBcc: x" }), 400 ],
    [ 'items a string', 'POST', '/rm/events', signed(), cart(items => 'lamp'), 400 ],
    [ 'items an object', 'POST', '/rm/events', signed(), cart(items => { a => 1 }), 400 ],
    [ 'item a number', 'POST', '/rm/events', signed(), cart(items => [1]), 400 ],
    [ 'item price negative', 'POST', '/rm/events', signed(), cart(item => { price => -1 }), 400 ],
    [ 'item price a string', 'POST', '/rm/events', signed(), cart(item => { price => '39.90' }), 400 ],
    [ 'item price 1e400', 'POST', '/rm/events', signed(), raw_cart('"name":"Lamp","price":1e400'), 400 ],
    [ 'item qty 0', 'POST', '/rm/events', signed(), cart(item => { qty => 0 }), 400 ],
    [ 'item qty 1.5', 'POST', '/rm/events', signed(), cart(item => { qty => 1.5 }), 400 ],
    [ 'item qty 1001', 'POST', '/rm/events', signed(), cart(item => { qty => 1001 }), 400 ],
    [ 'item qty a string', 'POST', '/rm/events', signed(), cart(item => { qty => '1' }), 400 ],
    [ 'item url javascript:', 'POST', '/rm/events', signed(),
        cart(item => { url => 'javascript:alert(1)' }), 400 ],
    [ 'item url ftp:', 'POST', '/rm/events', signed(), cart(item => { url => 'ftp://shop.example/a' }), 400 ],
    [ 'invalid UTF-8 (\xff) in a name', 'POST', '/rm/events', signed(), raw_cart(qq{"name":"L\xffmp"}), 400 ],
    [ 'overlong UTF-8 (\xc0\xaf) in a name', 'POST', '/rm/events', signed(),
        raw_cart(qq{"name":"L\xc0\xafmp"}), 400 ],
    [ 'total a string', 'POST', '/rm/events', signed(), cart(total => '79.8'), 400 ],
    [ 'total 1e400', 'POST', '/rm/events', signed(),
        '{"type":"cart","email":"zed@example.com","cart_id":"c-99","currency":"EUR","items":[],"total":1e400}', 400 ],
    [ 'currency lower case', 'POST', '/rm/events', signed(), cart(currency => 'eur'), 400 ],
    [ 'currency 4 letters', 'POST', '/rm/events', signed(), cart(currency => 'EURO'), 400 ],
    [ 'ts 1 h in the future', 'POST', '/rm/events', signed(), cart(ts => $now + 3600), 400 ],

    # --- routes -----------------------------------------------------------
    [ 'GET /events', 'GET', '/rm/events', {}, undef, 405, { allow => 'POST' } ],
    [ 'POST /health', 'POST', '/rm/health', $cjson, '{}', 405, { allow => 'GET' } ],
    [ 'unknown route', 'GET', '/rm/nope', {}, undef, 404 ],
    [ 'POST /tick without a token', 'POST', '/rm/tick', {}, '', 401 ],
    [ 'POST /tick with a wrong token', 'POST', '/rm/tick',
        { Authorization => 'Bearer wrong-token' }, '', 401 ],
    [ 'POST /tick with the token plus a suffix', 'POST', '/rm/tick',
        { Authorization => "Bearer ${TICK_TOKEN}4" }, '', 401 ],
    [ 'POST /tick with a prefix of the token', 'POST', '/rm/tick',
        { Authorization => 'Bearer ' . substr($TICK_TOKEN, 0, 5) }, '', 401 ],

    # --- signed links -----------------------------------------------------
    [ 'forged recovery token', 'GET', '/rm/r/AAAAforgedAAAAtokenAAAA', {}, undef, 400, $html ],
    [ 'forged unsubscribe page', 'GET', '/rm/u/AAAAforgedAAAAtokenAAAA', {}, undef, 400, $html ],
    [ 'forged one-click unsubscribe', 'POST', '/rm/u/AAAAforgedAAAAtokenAAAA', $form,
        'List-Unsubscribe=One-Click', 400, $html ],
    [ 'forged discount token', 'GET', '/rm/d/AAAAforgedAAAAtokenAAAA', {}, undef, 400, $html ],

    # --- browser /collect -------------------------------------------------
    [ '/collect order', 'POST', '/rm/collect', $cjson,
        $J->encode({ type => 'order', order_id => 'o-1', email => 'zed@example.com',
            total => 10, currency => 'EUR', items => [] }), 403 ],
    [ '/collect checkout', 'POST', '/rm/collect', $cjson,
        $J->encode({ type => 'checkout', cart_id => 'c-99', email => 'zed@example.com' }), 403 ],
    [ '/collect email with CRLF Bcc', 'POST', '/rm/collect', $ctext,
        ident(email => "zed\@example.com\r\nBcc: x\@y"), 400 ],
    [ '/collect malformed JSON', 'POST', '/rm/collect', $ctext, '{"type":', 400 ],
    [ '/collect unknown type', 'POST', '/rm/collect', $cjson, '{"type":"nope"}', 400 ],
    [ '/collect form content type', 'POST', '/rm/collect', $form, 'type=view', 415 ],
    [ '/collect body of 65537 bytes', 'POST', '/rm/collect', $cjson, $pad_over, 413 ],
);

cmp_ok(scalar @cases, '>=', 30, 'at least 30 cases');

my $COUNTS = 'SELECT (SELECT count(*) FROM events)||\',\'||(SELECT count(*) FROM contacts)'
    . '||\',\'||(SELECT count(*) FROM carts)||\',\'||(SELECT count(*) FROM orders)';

# --- controls: the valid requests the cases are mutations of ---------------
my $r = post_event(ident());
is($r->{status}, 202, 'control: a valid signed identify -> 202') or diag $r->{content};
$r = post_event($valid);
is($r->{status}, 202, 'control: the valid cart body -> 202') or diag $r->{content};
$r = post_event(ident(name => 'Old'), t => time() - 290);
is($r->{status}, 202, 'control: a signature 290 s old is still accepted') or diag $r->{content};
$r = post_event($pad_cap);
is(length $pad_cap, CAP, 'control body is exactly 65536 bytes');
is($r->{status}, 202, 'control: a body of exactly 65536 bytes -> 202') or diag $r->{content};
$r = http('POST', '/rm/collect', $J->encode({ type => 'view', visitor_id => 'v-1',
    url => 'https://shop.example/p/a' }), $ctext);
is($r->{status}, 204, 'control: /collect view (text/plain) -> 204') or diag $r->{content};
$r = http('GET', '/rm/p.gif?e=%ff%00&x=' . ('z' x 2000));
is($r->{status}, 200, 'GET /p.gif with junk query -> 200');
like($r->{headers}{'content-type'} // '', qr{^image/gif}, '... image/gif');
is(sql('SELECT count(*) FROM contacts WHERE unsubscribed_at IS NOT NULL'), 0, 'nobody unsubscribed');

# --- an empty batch: a feeder's quiet ten minutes is no error ----------------
{
    my $before = sql($COUNTS);
    $r = post_event('[]');
    is($r->{status}, 202, 'an empty batch [] at /events -> 202') or diag $r->{content};
    like($r->{content}, qr/^\{"accepted":0\b/, '... {"accepted":0,...}');
    $r = http('POST', '/rm/collect', '[]', $cjson);
    is($r->{status}, 204, 'an empty batch [] at /collect -> 204 (its success)') or diag $r->{content};
    my ($rc, $out, $err) = cli('event', { stdin => "[]\n" });
    is($rc, 0, 'remarket event with [] on stdin exits 0') or diag $err;
    like($out, qr/^\{"accepted":0\b/, '... and prints {"accepted":0,...}');
    is(sql($COUNTS), $before, '... nothing is stored');
}

my @disagree;
for my $c (@cases) {
    my ($name, $method, $path, $hdr, $body, $want, $o) = @$c;
    $o ||= {};
    my %h = %$hdr;
    for (values %h) { $_ = sign($body // '', time()) if $_ eq SIGN }
    my $before = sql($COUNTS);
    my $res = http($method, $path, $body, \%h);
    my $ct = $res->{headers}{'content-type'} // '';
    my $ok = is($res->{status}, $want, "$name: $method $path -> $want");
    unless ($ok) {
        diag "got body: " . substr($res->{content}, 0, 300);
        push @disagree, sprintf "%s: %s %s -> expected %s, got %s %s", $name, $method, $path,
            $want, $res->{status}, substr($res->{content}, 0, 120);
    }
    if ($res->{status} >= 400 && $res->{status} < 500) {
        if ($o->{html}) {
            like($ct, qr{^text/html}, "$name: text/html page");
        } else {
            like($ct, qr{^application/json}, "$name: Content-Type application/json")
                or push @disagree, "$name: Content-Type '$ct', body " . substr($res->{content}, 0, 80);
            my $j = decode_json_or_undef($res->{content});
            ok(ref $j eq 'HASH' && defined $j->{error} && !ref $j->{error} && length $j->{error},
                qq{$name: body is {"error":"..."}})
                or diag 'body: ' . substr($res->{content}, 0, 300);
        }
    }
    if ($o->{allow}) {
        like($res->{headers}{allow} // '', qr/\b$o->{allow}\b/, "$name: Allow header lists $o->{allow}");
    }
    is(sql($COUNTS), $before, "$name: events,contacts,carts,orders unchanged");
}

is(sql('SELECT count(*) FROM contacts WHERE unsubscribed_at IS NOT NULL'), 0,
    'no contact was unsubscribed by the forged one-click POST');
is(sql("SELECT count(*) FROM contacts WHERE email LIKE '%bcc%' OR email LIKE '%' || char(10) || '%'"), 0,
    'no contact with a header-injection email');

# --- the server survived all of it -----------------------------------------
$r = http('GET', '/rm/health');
is($r->{status}, 200, 'health still 200 after the bad input');
my $before = sql('SELECT count(*) FROM events');
$r = post_event(cart(cart_id => 'c-100'));
is($r->{status}, 202, 'a valid event still -> 202') or diag $r->{content};
cmp_ok(sql('SELECT count(*) FROM events'), '>', $before, '... and is recorded');

diag "disagreements:\n  " . join("\n  ", @disagree) if @disagree;
stop();
done_testing();
