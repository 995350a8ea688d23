#!/usr/bin/perl
# 35-browser-trust.t: the browser may name, never write (issue 8, part 1),
# through the real nginx (nginx.conf.example) and a real SMTP server
# (postfix's smtp-sink).
#
# The attack of the issue, as curl would make it: an anonymous POST to
# /rm/collect (no Origin, no cookie) names an address with consent and a
# cart whose item names are an advert; one hour later the shop must not
# mail that text. Then: a cart of unknown skus is never mailed, a browser
# cannot rename a known customer or withdraw their consent, the pixel
# identifies nobody, and a guessed cart id owns nothing of the backend's
# cart (nor shows it through /onsite). A recovery link followed by a
# browser that is not already its contact's gets that browser a fresh id.
#
# Signed events and the server's checks use real time; the flow engine's
# clock is moved with `remarket tick --now T`.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use RMTest qw(:DEFAULT http_port bin);
use RMScenario qw(tick_at $T0 $PORT $J);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

start();
$PORT = http_port();
$T0 = time();
my $text = { 'Content-Type' => 'text/plain' };
my $SPAM = 'Congratulations-you-won-visit-gift-claim.example';

# the catalog: one product, signed by the backend
my $r = post_event($J->encode({ type => 'product', sku => 'LAMP-1', name => 'Rattan lamp',
    price => 39.90, url => "http://127.0.0.1:$PORT/p/lamp-1" }));
is($r->{status}, 202, 'the backend signs the catalog (product LAMP-1)') or diag $r->{content};

# --- the attack: anonymous identify + a free-text cart ---------------------
my $attack = $J->encode([
    { type => 'identify', email => 'victim@example.org', name => $SPAM,
      consent => JSON::PP::true },
    { type => 'cart', email => 'victim@example.org', visitor_id => 'v-curl', cart_id => 'c-1',
      currency => 'EUR', total => 0.01,
      items => [ { sku => 'LAMP-1', name => 'WIN-A-PRIZE at gift-claim.example', price => 0.01,
                   qty => 1 },
                 { sku => 'NOPE-1', name => 'Claim your gift at gift-claim.example', price => 0 } ] },
]);
$r = http('POST', '/rm/collect', $attack, $text);
is($r->{status}, 204, 'anonymous POST /rm/collect (identify + cart, no Origin, no cookie) -> 204')
    or diag $r->{content};
is(sql("SELECT name || '|' || signed FROM contacts WHERE email = 'victim\@example.org'"), '|0',
    'the address is recorded as browser-only, without the name the browser sent');
is(sql("SELECT count(*) FROM carts WHERE items LIKE '%gift-claim%' OR items LIKE '%PRIZE%'"), 0,
    'no item text from the browser is kept');

# a second address, a cart of unknown skus only
$r = http('POST', '/rm/collect', $J->encode([
    { type => 'identify', email => 'other@example.org', consent => JSON::PP::true,
      visitor_id => 'v-curl2' },
    { type => 'cart', email => 'other@example.org', visitor_id => 'v-curl2',
      items => [ { sku => 'NOPE-2', name => 'Visit gift-claim.example', price => 1 } ] } ]), $text);
is($r->{status}, 204, 'a cart of unknown skus -> 204 (recorded)');

my $j = tick_at($T0 + 3700);
is($j->{sent}, 1, 'tick at +1 h sends one mail (the cart with a known sku)') or diag $J->encode($j);
my @m = wait_sink(1);
is(scalar @m, 1, 'one message in the sink: none for the cart of unknown skus');
my $mail = parse_mail($m[0] // '');
my $all = join "\n", map { $_ // '' } $mail->{header}->('Subject'), $mail->{text}, $mail->{html};
like($mail->{header}->('To') // '', qr/victim\@example\.org/, 'the mail goes to the named address');
unlike($all, qr/gift-claim|Congratulations|PRIZE/i,
    'it prints no word the browser typed (subject, text, HTML)');
like($mail->{text} // '', qr/Rattan lamp/, 'the item is named by the catalog');
like($mail->{text} // '', qr/39\.90/, '... and priced by the catalog');
unlike($mail->{text} // '', qr/0\.01/, '... not by the browser');
is(sql("SELECT e.exit_reason FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
    . "WHERE c.email = 'other\@example.org'"), 'no known item',
    'the cart of unknown skus ends its sequence: no known item');

# --- a link never joins a browser that is not already its contact's (review H2)
my ($rlink) = ($mail->{text} // '') =~ m{(http://127\.0\.0\.1:$PORT/rm/r/[A-Za-z0-9_\-.~%]+)};
ok($rlink, "the mail has a /rm/r/ link") or diag $mail->{text};
$r = http('POST', '/rm/collect', $J->encode({ type => 'view', sku => 'LAMP-1' }),
    { %$text, Cookie => 'rm_vid=v-shopper' });
is($r->{status}, 204, "a shopper's browser (rm_vid=v-shopper) views a product");
$r = http('GET', $rlink // '/rm/r/none', undef, { Cookie => 'rm_vid=v-shopper' });
is($r->{status}, 302, "another site sends that browser to the victim's link -> 302");
my $sc = $r->{headers}{'set-cookie'} // '';
like($sc, qr/^rm_vid=v/, '... which sets a visitor id') or diag $sc;
unlike($sc, qr/v-shopper/, '... a fresh one, not the browser\'s own');
is(sql("SELECT coalesce(contact_id, 'none') || '|' || verified FROM visitors "
    . "WHERE vid = 'v-shopper'"), 'none|0', 'the old id stays joined to nobody');
$r = http('POST', '/rm/collect', $J->encode({ type => 'cart', cart_id => 'shop-991',
    items => [ { sku => 'LAMP-1', qty => 2 } ] }), { %$text, Cookie => 'rm_vid=v-shopper' });
is(sql("SELECT coalesce(contact_id, 'none') FROM carts WHERE cart_key = 'shop-991/v-shopper'"),
    'none', "so the shopper's later cart is mailed to nobody");

# --- a browser never renames, nor withdraws someone's consent --------------
$r = post_event($J->encode({ type => 'identify', email => 'ann@example.com', name => 'Ann Smith',
    consent => JSON::PP::true }));
is($r->{status}, 202, 'the backend names ann (signed)');
$r = http('POST', '/rm/collect', $J->encode({ type => 'identify', email => 'ann@example.com',
    name => $SPAM, consent => JSON::PP::false, visitor_id => 'v-curl' }), $text);
is($r->{status}, 204, 'an anonymous identify of ann with another name and consent false -> 204');
is(sql("SELECT name || '|' || consent FROM contacts WHERE email = 'ann\@example.com'"),
    'Ann Smith|1', "ann keeps her name and her consent");

# --- the pixel identifies nobody -------------------------------------------
my $before = sql("SELECT count(*) FROM contacts");
$r = http('GET', '/rm/p.gif?type=identify&email=pixel%40example.org');
is($r->{status}, 200, 'a cross-site <img src=/rm/p.gif?type=identify&email=...> -> 200 GIF');
$r = http('GET', '/rm/p.gif?type=view&sku=LAMP-1&email=pixel2%40example.org&vid=v-pix');
is($r->{status}, 200, 'a pixel view with an email -> 200 GIF');
is(sql("SELECT count(*) FROM contacts"), $before, '... neither made a contact');
is(sql("SELECT count(*) FROM events WHERE source = 'pixel' AND type = 'view'"), 1,
    '... the view is recorded');

# --- a guessed cart id owns nothing of the backend's cart ------------------
$r = http('POST', '/rm/collect', $J->encode({ type => 'cart', cart_id => 'shop-77',
    items => [ { sku => 'LAMP-1', name => 'Lamp', price => 1, qty => 1 } ] }),
    { %$text, Cookie => 'rm_vid=v-guess' });
is($r->{status}, 204, 'a browser posts a guessed cart id first -> 204');
$r = post_event($J->encode([
    { type => 'identify', email => 'carol@example.com', name => 'Carol', consent => JSON::PP::true },
    { type => 'cart', email => 'carol@example.com', cart_id => 'shop-77', currency => 'EUR',
      items => [ { sku => 'LAMP-1', name => 'Rattan lamp', price => 39.9, qty => 2 } ] } ]));
is($r->{status}, 202, "then the backend signs Carol's cart shop-77");
is(sql("SELECT coalesce(visitor_id, 'none') FROM carts WHERE cart_key = 'shop-77'"), 'none',
    "the backend's cart is not the guessing visitor's");
$j = tick_at($T0 + 3 * 3600);
is($j->{sent}, 1, "tick at +3 h: Carol's reminder") or diag $J->encode($j);
$r = http('GET', '/rm/onsite', undef, { Cookie => 'rm_vid=v-guess' });
is($r->{status}, 204, "GET /rm/onsite as the guessing visitor shows nothing of Carol's cart")
    or diag $r->{content};
$r = http('POST', '/rm/collect', $J->encode({ type => 'cart', cart_id => 'shop-77', items => [] }),
    { %$text, Cookie => 'rm_vid=v-guess' });
is($r->{status}, 403, "... nor can it empty Carol's cart (403)");
is(sql("SELECT item_count || status FROM carts WHERE cart_key = 'shop-77'"), '1abandoned',
    "Carol's cart is intact");

stop();
done_testing();
