#!/usr/bin/perl
# 60-browser.t: the shopper's side, in a real browser (headless Chromium
# through chromedriver's WebDriver API), against the demo shop served on one
# origin with remarket (demo/nginx-demo.conf: the shop at /, its backend at
# /api/, remarket at /rm/).
#
#   1. A visitor adds two products, types an email (consent ticked) on the
#      cart page and leaves: remarket knows the contact, the 2-item cart and
#      the visitor (the snippet's rm_vid cookie) behind it.
#   2. tick +1 h sends the reminder; its recovery link, opened in the same
#      browser, restores the cart from the shop backend (screenshot).
#   3. Back on the shop, the on-site banner says the cart is saved
#      (screenshot); dismissed, it stays away for the visit.
#   4. Paying records the order, ends the sequence: tick +24 h sends none.
#   5. With remarket down (502s), the shop still works and the snippet
#      throws nothing into the page, whether it was cached or cannot load.
# Screenshots go to tests/artifacts/ (git-ignored). No page may log an
# uncaught JavaScript error.
use strict;
use warnings;
use utf8;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use HTTP::Tiny;
use JSON::PP ();
use Encode qw(decode);
use RMTest qw(:DEFAULT bin);
use RMBrowser;

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();
if (my $why = RMBrowser::missing()) {
    plan skip_all => "no browser: $why";
}

my $ART = "$FindBin::Bin/artifacts";
mkdir $ART;
my $EMAIL = 'ann@example.com';

start(smtp => 0, env => { RMBrowser::shop_env() });
RMBrowser::start_shop();
my $b = RMBrowser::browser();
my $T0 = time;

# Every page gets an error collector before its own scripts run.
$b->cdp('Page.addScriptToEvaluateOnNewDocument', { source => <<'JS' });
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) {
  window.__errors.push('unhandled rejection: ' + (e.reason && e.reason.message || e.reason));
});
JS

my (@uncaught, @console);    # "Uncaught" console lines from every page; the rest
sub page_clean {
    my ($what) = @_;
    my $errs = eval { $b->js('return window.__errors || []') } || ['(no collector)'];
    my @log = $b->browser_log;
    push @uncaught, grep { /Uncaught/ } @log;
    push @console, @log;
    is_deeply($errs, [], "$what: no JavaScript error on the page")
        or diag join "\n", @$errs, @log;
}

sub snippet_loaded {
    return $b->wait_until(sub { $b->js('return !!(window.remarket && window.remarket.loaded)') }, 10);
}

sub cart_synced {
    return $b->wait_until(sub {
        $b->js('return document.documentElement.getAttribute("data-sync") === "idle"'
            . ' && !!shop.load().cart_id');
    }, 10);
}

sub poll_sql {
    my ($q, $want, $secs) = @_;
    my $got;
    my $end = time + ($secs // 5);
    while (1) {
        $got = sql($q);
        return $got if $got eq $want || time > $end;
        select undef, undef, undef, 0.1;
    }
}

sub tick_at {
    my ($now) = @_;
    my ($rc, $out, $err) = cli('tick', '--now', $now);
    is($rc, 0, 'remarket tick --now T0+' . ($now - $T0) . ' exits 0') or diag $err;
    return decode_json_or_undef($out) || {};
}

# ---- 1. browse, fill the cart, give an email, leave ----
$b->get('/');
ok(snippet_loaded(), 'the snippet loads from /rm/remarket.js and replaces the queue stub');
my $vid = $b->cookie('rm_vid') // '';
like($vid, qr/^v[A-Za-z0-9.-]{22}$/, "the snippet sets a first-party rm_vid cookie ($vid)");
$b->click('#LAMP-1 details summary');    # a product view
$b->click('button.add[data-sku="LAMP-1"]');
$b->click('button.add[data-sku="VASE-2"]');
ok(cart_synced(), 'the cart reaches the shop backend');
is($b->text('[data-cart-count]'), '2', 'the header shows 2 items');
page_clean('shop');

$b->click('#cart-link');
ok($b->wait_until(sub { $b->count('#lines li.line') == 2 }), 'the cart page lists 2 items');
$b->click('#consent');
$b->type('#name', 'Ann');
$b->type('#email', $EMAIL . "\x{E004}");    # Tab: change + blur
# The browser names an address with the checkbox's consent, never a name
# (issue 8: everything a mail prints comes from a signed source).
is(poll_sql("SELECT consent || '|' || name FROM contacts WHERE email = '$EMAIL'", '1|'),
    '1|', 'captureEmail identifies the visitor with consent, and the name typed is not kept');
page_clean('cart');
$b->get('/');                                 # leaves without paying
snippet_loaded();

my $contact = sql("SELECT id FROM contacts WHERE email = '$EMAIL'");
is(sql("SELECT contact_id FROM visitors WHERE vid = '$vid'"), $contact,
    'the visitor (rm_vid) is linked to the contact');
my $cart_key = $b->js('return shop.load().cart_id');
is(sql("SELECT item_count || '|' || status || '|' || contact_id || '|' || visitor_id FROM carts"
        . " WHERE cart_key = '$cart_key'"), "2|open|$contact|$vid",
    "remarket has the cart $cart_key: 2 items, open, of this contact and visitor");
is(sql("SELECT count(*) FROM events WHERE source = 'browser' AND type = 'view'"), 1,
    'the product view was collected');
is(sql("SELECT count(*) FROM events WHERE source = 'hook' AND type = 'cart'"), 2,
    'the backend sent 2 signed cart events');
is($b->count('.rm-onsite'), 0, 'no on-site banner while the cart is open');

# ---- 2. the reminder, its link, the cart back ----
my $t = tick_at($T0 + 3700);
is($t->{sent}, 1, 'tick +1 h sends the reminder') or diag explain $t;
my @mail = outbox_messages();
is(scalar @mail, 1, 'one .eml in the outbox');
my $m = parse_mail($mail[0] // '');
is($m->{header}->('To'), $EMAIL, 'to the shopper');
my ($link) = ($m->{text} // '') =~ m{(http://\S+/rm/r/[A-Za-z0-9_-]+)};
ok($link, 'the (quoted-printable) text part has the recovery link') or diag $m->{text};
like($link // '', qr{^\Q${\ RMBrowser::shop_url('/rm/r/')}\E}, 'on the shop origin');

$b->js('localStorage.clear()');               # the cart must come from the backend
$b->get($link);
ok($b->wait_until(sub { $b->url =~ m{/cart\?restore=\Q$cart_key\E(&|$)} }),
    'the link lands on /cart?restore=<cart_id>') or diag $b->url;
ok($b->wait_until(sub { $b->count('#lines li.line') == 2 }), 'the restored cart shows 2 items');
like($b->text('#lines') // '', qr/Rattan pendant lamp.*Stoneware vase, sand/s, 'the same two products');
like($b->text('#notice') // '', qr/restored/, 'with a welcome-back notice');
is($b->cookie('rm_vid'), $vid, 'the browser keeps its visitor id');
sleep 1;
is($b->count('.rm-onsite'), 0, 'no banner on the cart page itself');
ok($b->screenshot("$ART/restored-cart.png") > 1000, 'screenshot tests/artifacts/restored-cart.png');
page_clean('restored cart');
is(sql("SELECT count(*) FROM interactions WHERE kind = 'click'"), 1, 'the click is recorded');

# ---- 3. the on-site message ----
$b->get('/');
ok($b->wait_until(sub { $b->count('.rm-onsite[role="status"]') == 1 }), 'the shop shows the on-site banner');
is($b->text('.rm-onsite span'), 'Your cart is saved — 2 items', 'saying the cart is saved');
like($b->js('return document.querySelector(".rm-onsite a").href'), qr{/cart\?restore=\Q$cart_key\E},
    'linking to the cart');
ok($b->find('.rm-onsite button[aria-label]'), 'with a labelled close button');
ok($b->screenshot("$ART/banner.png") > 1000, 'screenshot tests/artifacts/banner.png');
$b->click('.rm-onsite button');
is($b->count('.rm-onsite'), 0, 'dismissed, it goes');
$b->refresh;
snippet_loaded();
sleep 1;
is($b->count('.rm-onsite'), 0, 'and does not come back in this visit');
page_clean('shop with banner');

# ---- 4. the order ends the sequence ----
$b->get('/cart');
ok($b->wait_until(sub { $b->count('#lines li.line') == 2 }), 'the cart is still there');
$b->type('#email', $EMAIL);
$b->click('#pay');
ok($b->wait_until(sub { $b->js('return !document.getElementById("thanks").hidden') }),
    'paying shows the confirmation');
my $order = $b->text('#order-id') // '';
like($order, qr/^o-[0-9a-f]+$/, "order $order");
is(poll_sql("SELECT count(*) FROM orders WHERE order_key = '$order'", '1'), 1, 'remarket has the order');
is(sql("SELECT status FROM carts WHERE cart_key = '$cart_key'"), 'ordered', 'the cart is ordered');
is(sql("SELECT status || '|' || exit_reason FROM enrollments"), 'exited|order',
    'the sequence ended because of the order');
is(sql("SELECT o.contact_id = c.contact_id FROM orders o JOIN carts c ON c.id = o.cart_id"
        . " WHERE o.order_key = '$order'"), 1, 'the order belongs to the recovered cart');
page_clean('order');
$t = tick_at($T0 + 86400 + 100);
is($t->{sent}, 0, 'tick +24 h sends nothing more') or diag explain $t;
is(scalar(outbox_messages()), 1, 'still one mail in the outbox');

# The demo's outbox viewer shows that mail, sandboxed, and moves the clock.
$b->get('/outbox');
ok($b->wait_until(sub { $b->count('#msgs button') == 1 }), 'the outbox viewer lists the mail');
is($b->text('#msgs .subj'), decode('MIME-Header', $m->{header}->('Subject') // ''),
    'with its (decoded) subject');
is($b->js('return document.getElementById("frame").getAttribute("sandbox")'),
    'allow-popups allow-popups-to-escape-sandbox', 'in an iframe sandboxed without scripts');
like($b->js('return document.getElementById("frame").srcdoc'), qr{/rm/r/}, 'showing its HTML part');
ok($b->screenshot("$ART/outbox.png") > 1000, 'screenshot tests/artifacts/outbox.png');
$b->click('button[data-advance="3600"]');
ok($b->wait_until(sub { ($b->text('#log') // '') =~ /"sent":0/ }), 'advance +1 h runs a tick (nothing due)')
    or diag $b->text('#log');
page_clean('outbox');

# ---- 5. remarket down: the shop works, the snippet stays quiet ----
$b->delete_cookies;
$b->js('localStorage.clear(); sessionStorage.clear()');
$b->get('/');
snippet_loaded();
RMTest::stop();                                # remarket serve and RMTest's nginx
is(HTTP::Tiny->new(timeout => 5)->get(RMBrowser::shop_url('/rm/health'))->{status}, 502, 'remarket is down: /rm/ answers 502');
$b->js('sessionStorage.clear()');
$b->click('button.add[data-sku="THROW-3"]');
ok(cart_synced(), 'adding to the cart still works (the backend shrugs off remarket)');
$b->js('remarket("view", {sku: "THROW-3"}); remarket("identify", {email: "x@example.com"});'
    . ' remarket("bogus"); remarket();');
$b->get('/');                                  # onsite check against a 502
$b->get('/cart');
ok($b->wait_until(sub { $b->count('#lines li.line') == 1 }), 'the cart page works');
$b->click('#consent');
$b->type('#email', "bea\@example.com\x{E004}");
$b->click('#pay');
ok($b->wait_until(sub { $b->js('return !document.getElementById("thanks").hidden') }),
    'and so does paying');
sleep 0.5;
page_clean('remarket down');
ok((grep { m{/rm/(collect|onsite)\S* .*\b502\b} } @console),
    'the snippet (from the HTTP cache) did meet 502s from /collect and /onsite')
    or diag join "\n", @console;

# The snippet itself cannot load: the queue stub takes the calls, the page works.
$b->cdp('Network.enable');
$b->cdp('Network.setCacheDisabled', { cacheDisabled => JSON::PP::true() });
$b->get('/');
$b->click('button.add[data-sku="MIRROR-4"]');
ok(cart_synced(), 'without remarket.js (502), adding to the cart works');
$b->click('#MIRROR-4 details summary');
# <details> fires its toggle event as a task of its own: wait for it
my $queued = 'return [!!window.remarket.loaded, (window.remarket.q || []).length].join()';
$b->wait_until(sub { $b->js($queued) eq 'false,2' });
is($b->js($queued), 'false,2', 'the stub queued the calls (config, view) and nothing broke');
page_clean('remarket.js missing');
is_deeply(\@uncaught, [], 'no "Uncaught" error in the browser console, on any page');

RMBrowser::stop();
done_testing;
