#!/usr/bin/perl
# 20-integration.t: the abandoned-cart scenario end to end, through the real
# nginx (nginx.conf.example) and a real SMTP server (postfix's smtp-sink).
#
# Anything the server signs or verifies against its own clock (webhook
# signatures, link tokens) uses real time; the flow engine's clock is moved
# with `remarket tick --now T`, which shares the database with the server.
#
# Four independent worlds, each started fresh:
#   1. ann: mail at +1 h, no double send, recovery link, forged link,
#      open pixel, order stops the flow.
#   2. bob: one-click unsubscribe from the List-Unsubscribe header stops
#      the flow; the GET page has a form.
#   3. carol: cart emptied after abandonment: no further mail.
#   4. dave: SMTP down -> retry, then sent exactly once; steps 2 and 3,
#      step 3 carries a discount code that the recovery link passes on.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use RMTest qw(:DEFAULT http_port free_port bin $TICK_TOKEN);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

my $J = JSON::PP->new->canonical;
my ($T0, $PORT);

sub rel { my $t = shift; my $d = $t - $T0; return $d >= 0 ? "T0+$d" : "T0$d" }

# Run `remarket tick --now $now`; returns the decoded summary (or {}).
sub tick_at {
    my ($now, %o) = @_;
    my ($rc, $out, $err) = cli('tick', '--now', $now, { env => $o{env} });
    my $what = 'remarket tick --now ' . rel($now) . ($o{what} ? " ($o{what})" : '');
    is($rc, 0, "$what exits 0") or diag "stderr: $err\nstdout: $out";
    my $j = decode_json_or_undef($out);
    ok(ref $j eq 'HASH', "$what prints a JSON object") or diag "stdout: $out\nstderr: $err";
    return ref $j eq 'HASH' ? $j : {};
}

sub cart_event {
    my ($email, $cart, $ts, @items) = @_;
    my $total = 0;
    $total += $_->{price} * $_->{qty} for @items;
    return { type => 'cart', email => $email, cart_id => $cart, currency => 'EUR',
        ts => $ts, items => \@items, total => 0 + sprintf('%.2f', $total) };
}

sub item {
    my ($sku, $name, $price) = @_;
    return { sku => $sku, name => $name, price => $price, qty => 1,
        url => "http://127.0.0.1:$PORT/p/" . lc $sku,
        image => "http://127.0.0.1:$PORT/img/" . lc($sku) . '.jpg' };
}

# Identify + cart for one contact at $T0, signed, checked.
sub shopper {
    my ($email, $name, $cart, @items) = @_;
    my $body = $J->encode([
        { type => 'identify', email => $email, name => $name, consent => JSON::PP::true },
        cart_event($email, $cart, $T0, @items) ]);
    my $r = post_event($body);
    is($r->{status}, 202, "signed identify+cart for $email -> 202")
        or diag "body: $r->{content}";
    my $j = decode_json_or_undef($r->{content});
    is(ref $j eq 'HASH' ? $j->{accepted} : undef, 2, '... answers {"accepted":2}')
        or diag "body: $r->{content}";
    return $r;
}

# The mail checks shared by every scenario; returns the parsed mail and the
# links found in it.
sub check_mail {
    my ($raw, $to, $names) = @_;
    my $m = parse_mail($raw);
    my $h = $m->{header};
    my %l;
    like($h->('From') // '', qr/shop\@example\.com/, 'From is the configured sender');
    like($h->('From') // '', qr/Maison Test/, 'From carries the store name');
    like($h->('To') // '', qr/\Q$to\E/, "To is $to");
    like($h->('X-Rcpt-Args') // '', qr/<\Q$to\E>/, "SMTP envelope recipient is $to");
    ok(defined $h->('Subject') && $h->('Subject') =~ /\S/, 'Subject is not empty')
        or diag 'Subject: ' . ($h->('Subject') // 'undef');
    like($h->('Date') // '', qr/^(?:\w{3}, )?\d{1,2} \w{3} \d{4} \d\d:\d\d(?::\d\d)? [+-]\d{4}/,
        'Date is an RFC 5322 date');
    like($h->('Message-ID') // '', qr/^<[^<>\s\@]+\@[^<>\s]+>$/, 'Message-ID is <id@host>');
    like($h->('MIME-Version') // '', qr/^1\.0\b/, 'MIME-Version: 1.0');
    like($h->('Content-Type') // '', qr{^multipart/alternative\b}i,
        'Content-Type is multipart/alternative');
    my $lu = $h->('List-Unsubscribe') // '';
    like($lu, qr{<http://127\.0\.0\.1:$PORT/rm/u/[^>\s]+>}, 'List-Unsubscribe has the /rm/u/ URL')
        or diag "List-Unsubscribe: $lu";
    ($l{unsub}) = $lu =~ m{<(http://127\.0\.0\.1:$PORT/rm/u/[^>\s]+)>};
    is($h->('List-Unsubscribe-Post') // '', 'List-Unsubscribe=One-Click',
        'List-Unsubscribe-Post: List-Unsubscribe=One-Click');
    ok(defined $m->{text}, 'there is a text/plain part') or diag "mail:\n$raw";
    ok(defined $m->{html}, 'there is a text/html part');
    my $text = $m->{text} // '';
    my $html = $m->{html} // '';
    for my $n (@$names) {
        like($text, qr/\Q$n\E/, "text part names the item '$n'");
    }
    like($text, qr/1 Test Street, 75000 Paris/, 'text part carries the postal address');
    ($l{recover}) = $text =~ m{(http://127\.0\.0\.1:$PORT/rm/r/[A-Za-z0-9_\-.~%]+)};
    ok($l{recover}, 'text part has the recovery link /rm/r/TOKEN') or diag "text part:\n$text";
    if ($l{recover}) {
        (my $esc = $l{recover}) =~ s/&/&amp;/g;
        ok(index($html, $esc) >= 0, 'html part has the same recovery link')
            or diag "html part:\n$html";
    }
    ($l{open}) = $html =~ m{(http://127\.0\.0\.1:$PORT/rm/o/[A-Za-z0-9_\-.~%]+?\.gif)};
    ok($l{open}, 'html part has the open pixel /rm/o/TOKEN.gif') or diag "html part:\n$html";
    $m->{links} = \%l;
    return $m;
}

sub contact_sql {
    my ($col, $email) = @_;
    return sql("SELECT $col FROM contacts WHERE email='$email'");
}

# ---------------------------------------------------------------------------
subtest 'scenario 1: ann abandons, gets one reminder, clicks, orders' => sub {
    start();
    $PORT = http_port();
    $T0 = time();

    my $r = http('GET', '/rm/health');
    is($r->{status}, 200, 'GET /rm/health -> 200');
    like($r->{content}, qr/\Aok\n?\z/, '... body ok');

    shopper('ann@example.com', 'Ann', 'c-19',
        item('LAMP-1', 'Rattan lamp', 39.9), item('CUSH-2', 'Linen cushion', 39.9));
    is(contact_sql('name', 'ann@example.com'), 'Ann', 'contact ann recorded with her name');

    $r = http('POST', '/rm/tick', '', { Authorization => "Bearer $TICK_TOKEN" });
    is($r->{status}, 200, 'POST /rm/tick with the bearer token -> 200')
        or diag "body: $r->{content}";
    like($r->{headers}{'content-type'} // '', qr{^application/json}, '... JSON');
    my $j = decode_json_or_undef($r->{content}) || {};
    is($j->{sent}, 0, '... sent 0 at real time (nothing due)') or diag $r->{content};

    $j = tick_at($T0 + 30 * 60);
    is($j->{sent}, 0, 'tick at +30 min sends nothing') or diag $J->encode($j);
    is(scalar(sink_messages()), 0, 'sink is empty');

    $j = tick_at($T0 + 3700);
    is($j->{now}, $T0 + 3700, 'summary now = --now');
    is($j->{abandoned}, 1, 'summary abandoned 1') or diag $J->encode($j);
    is($j->{enrolled}, 1, 'summary enrolled 1');
    is($j->{sent}, 1, 'summary sent 1');
    is($j->{$_}, 0, "summary $_ 0") for qw(retry failed);
    my @m = wait_sink(1);
    is(scalar @m, 1, 'exactly one message in the sink') or diag join "\n----\n", @m;
    my $mail = check_mail($m[0] // '', 'ann@example.com', [ 'Rattan lamp', 'Linen cushion' ]);
    is(sql("SELECT count(*) FROM messages WHERE status='sent'"), 1, 'messages: one row sent');

    $j = tick_at($T0 + 3700, what => 'again');
    is($j->{sent}, 0, 'the same tick again sends nothing');
    @m = wait_sink(2, 0.5);
    is(scalar @m, 1, 'still exactly one message in the sink');

    my $rec = $mail->{links}{recover};
    SKIP: {
        skip 'no recovery link in the mail', 6 unless $rec;
        my $ev = counts()->{events};
        $r = http('GET', $rec);
        is($r->{status}, 302, 'GET recovery link -> 302') or diag "body: $r->{content}";
        is($r->{headers}{location}, "http://127.0.0.1:$PORT/cart?restore=c-19&code=",
            '... Location is cart_url with the cart and an empty code');

        my ($tok) = $rec =~ m{/rm/r/(.+)$};
        my $i = int(length($tok) / 2);
        $i++ while $i < length($tok) - 1 && substr($tok, $i, 1) !~ /[A-Za-z0-9]/;
        my $c = substr($tok, $i, 1);
        substr($tok, $i, 1) = $c eq 'A' ? 'B' : 'A';
        my $fp = table_fingerprint();
        $r = http('GET', "/rm/r/$tok");
        is($r->{status}, 400, 'recovery token with one character changed -> 400')
            or diag "GET /rm/r/$tok: $r->{content}";
        like($r->{headers}{'content-type'} // '', qr{^text/html}, '... an HTML page');
        is(table_fingerprint(), $fp, '... and nothing recorded (row counts of every table unchanged)');
        cmp_ok(counts()->{events}, '>=', $ev, 'events not lost');
    }

    SKIP: {
        skip 'no open pixel in the mail', 3 unless $mail->{links}{open};
        $r = http('GET', $mail->{links}{open});
        is($r->{status}, 200, 'GET open pixel -> 200');
        like($r->{headers}{'content-type'} // '', qr{^image/gif}, '... image/gif');
        like($r->{content}, qr/\AGIF8[79]a/, '... a GIF');
    }

    my $order = $J->encode({ type => 'order', order_id => 'o-7', email => 'ann@example.com',
        cart_id => 'c-19', total => 79.8, currency => 'EUR',
        items => [ item('LAMP-1', 'Rattan lamp', 39.9), item('CUSH-2', 'Linen cushion', 39.9) ] });
    $r = post_event($order);
    is($r->{status}, 202, 'signed order event -> 202') or diag "body: $r->{content}";
    $j = decode_json_or_undef($r->{content});
    is(ref $j eq 'HASH' ? $j->{accepted} : undef, 1, '... {"accepted":1}');
    is(sql("SELECT status FROM carts WHERE cart_key='c-19'"), 'ordered', "carts.status for c-19 is 'ordered'");
    is(sql("SELECT count(*) FROM orders WHERE order_key='o-7'"), 1, 'orders has o-7');

    $j = tick_at($T0 + 24 * 3600 + 100);
    is($j->{sent}, 0, 'tick at +24 h sends nothing after the order') or diag $J->encode($j);
    @m = wait_sink(2, 0.5);
    is(scalar @m, 1, 'sink still holds one message');
    is(sql("SELECT e.exit_reason FROM enrollments e JOIN contacts c ON c.id=e.contact_id "
        . "WHERE c.email='ann\@example.com'"), 'order', "enrollment exit_reason 'order'");
    stop();
};

# ---------------------------------------------------------------------------
subtest 'scenario 2: bob unsubscribes with one click' => sub {
    start();
    $PORT = http_port();
    $T0 = time();
    shopper('bob@example.com', 'Bob', 'c-20', item('VASE-3', 'Stoneware vase', 25));

    my $j = tick_at($T0 + 3700);
    is($j->{sent}, 1, 'tick at +1 h sends one mail') or diag $J->encode($j);
    my @m = wait_sink(1);
    is(scalar @m, 1, 'one message in the sink');
    my $mail = check_mail($m[0] // '', 'bob@example.com', ['Stoneware vase']);
    my $unsub = $mail->{links}{unsub};

    SKIP: {
        skip 'no List-Unsubscribe URL', 10 unless $unsub;
        is(contact_sql('unsubscribed_at', 'bob@example.com'), '', 'bob not unsubscribed yet');
        # A link scanner's GET must not unsubscribe; the page asks for a click.
        my $r = http('GET', $unsub);
        is($r->{status}, 200, 'GET the unsubscribe page before clicking -> 200');
        is(contact_sql('unsubscribed_at', 'bob@example.com'), '', '... and GET alone does not unsubscribe');
        $r = http('POST', $unsub, 'List-Unsubscribe=One-Click',
            { 'Content-Type' => 'application/x-www-form-urlencoded' });
        is($r->{status}, 200, 'one-click POST to the List-Unsubscribe URL -> 200')
            or diag "body: $r->{content}";
        isnt(contact_sql('unsubscribed_at', 'bob@example.com'), '',
            'contacts.unsubscribed_at is set for bob');

        $j = tick_at($T0 + 24 * 3600 + 100);
        is($j->{sent}, 0, 'tick at +24 h sends nothing to bob') or diag $J->encode($j);
        @m = wait_sink(2, 0.5);
        is(scalar @m, 1, 'sink still holds one message');
        diag 'bob enrollment: ' . sql("SELECT status||'/'||ifnull(exit_reason,'') FROM enrollments");

        $r = http('GET', $unsub);
        is($r->{status}, 200, 'GET the unsubscribe page -> 200');
        like($r->{headers}{'content-type'} // '', qr{^text/html}, '... HTML');
        like($r->{content}, qr/<form\b[^>]*\bmethod\s*=\s*["']?post\b/i, '... with a <form method="post">')
            or diag $r->{content};
    }
    stop();
};

# ---------------------------------------------------------------------------
subtest 'scenario 3: carol empties her cart after abandonment' => sub {
    start();
    $PORT = http_port();
    $T0 = time();
    shopper('carol@example.com', 'Carol', 'c-21', item('RUG-4', 'Jute rug', 120));

    my $j = tick_at($T0 + 3700);
    is($j->{sent}, 1, 'tick at +1 h sends one mail') or diag $J->encode($j);
    is(scalar(wait_sink(1)), 1, 'one message in the sink');

    my $empty = $J->encode({ type => 'cart', email => 'carol@example.com', cart_id => 'c-21',
        currency => 'EUR', items => [], total => 0, ts => $T0 + 4000 });
    my ($rc, $out, $err) = cli('event', '--now', $T0 + 4000, { stdin => $empty });
    is($rc, 0, 'remarket event (empty cart at +4000 s) exits 0') or diag "stderr: $err";
    ok(defined decode_json_or_undef($out), '... prints JSON') or diag "stdout: $out";
    diag 'carol cart: ' . sql("SELECT status||' items='||ifnull(items,'') FROM carts WHERE cart_key='c-21'");

    $j = tick_at($T0 + 24 * 3600 + 100);
    is($j->{sent}, 0, 'tick at +24 h sends nothing') or diag $J->encode($j);
    $j = tick_at($T0 + 72 * 3600 + 100);
    is($j->{sent}, 0, 'tick at +72 h sends nothing') or diag $J->encode($j);
    my @m = wait_sink(2, 0.5);
    is(scalar @m, 1, 'sink still holds one message');
    diag 'carol enrollment: ' . sql("SELECT status||'/'||ifnull(exit_reason,'') FROM enrollments");
    stop();
};

# ---------------------------------------------------------------------------
subtest 'scenario 4: SMTP down, retried, sent once; steps 2 and 3' => sub {
    start();
    $PORT = http_port();
    $T0 = time();
    shopper('dave@example.com', 'Dave', 'c-22', item('BOWL-5', 'Olive wood bowl', 30));

    my $closed = free_port();
    my $j = tick_at($T0 + 3700, env => { REMARKET_SMTP_URL => "smtp://127.0.0.1:$closed" },
        what => 'SMTP refused');
    is($j->{sent}, 0, 'nothing sent while SMTP is down') or diag $J->encode($j);
    is($j->{retry}, 1, 'summary retry 1');
    is($j->{failed}, 0, 'summary failed 0');
    like(sql('SELECT group_concat(status) FROM messages'), qr/^(?:queued|retry)$/,
        "the message stays queued (status 'queued' or 'retry')");
    is(scalar(wait_sink(1, 0.5)), 0, 'sink is empty');

    $j = tick_at($T0 + 3700 + 600, what => 'SMTP back');
    is($j->{sent}, 1, 'a tick 10 min later sends it') or diag $J->encode($j);
    $j = tick_at($T0 + 3700 + 600, what => 'again');
    is($j->{sent}, 0, '... and the same tick again sends nothing');
    my @m = wait_sink(2, 0.5);
    is(scalar @m, 1, 'exactly one message in the sink');
    check_mail($m[0] // '', 'dave@example.com', ['Olive wood bowl']);
    is(sql("SELECT count(*) FROM messages WHERE status='sent'"), 1, 'one message row sent');

    $j = tick_at($T0 + 24 * 3600 + 100, what => 'step 2');
    is($j->{sent}, 1, 'step 2 goes out at +24 h') or diag $J->encode($j);
    @m = wait_sink(2);
    is(scalar @m, 2, 'two messages in the sink');

    $j = tick_at($T0 + 48 * 3600, what => 'between steps');
    is($j->{sent}, 0, 'nothing at +48 h') or diag $J->encode($j);

    $j = tick_at($T0 + 72 * 3600 + 100, what => 'step 3');
    is($j->{sent}, 1, 'step 3 goes out at +72 h') or diag $J->encode($j);
    @m = wait_sink(3);
    is(scalar @m, 3, 'three messages in the sink');
    my ($last) = grep { /RM-[A-Z2-9]{4}-[A-Z2-9]{4}/ } map { parse_mail($_)->{text} // '' } @m;
    my ($code) = ($last // '') =~ /(RM-[A-Z2-9]{4}-[A-Z2-9]{4})/;
    ok($code, 'step 3 text carries a code RM-XXXX-XXXX') or diag "last mail:\n" . ($m[-1] // '');
    SKIP: {
        skip 'no code', 4 unless $code;
        is(sql("SELECT count(*) FROM discounts WHERE code='$code' AND redeemed_at IS NULL"), 1,
            'the code is in discounts, unredeemed');
        # The step-3 link may be the recovery link (/r/) or the discount
        # link (/d/); either must land on the cart with the code applied.
        my ($rec) = $last =~ m{(http://127\.0\.0\.1:$PORT/rm/d/[A-Za-z0-9_\-.~%]+)};
        ($rec) = $last =~ m{(http://127\.0\.0\.1:$PORT/rm/r/[A-Za-z0-9_\-.~%]+)} unless $rec;
        ok($rec, "step 3's text has a /rm/d/ or /rm/r/ link") or diag $last;
        my $r = $rec ? http('GET', $rec) : { status => 0, headers => {} };
        is($r->{status}, 302, "step 3's link -> 302") or diag "GET $rec: $r->{content}";
        is($r->{headers}{location}, "http://127.0.0.1:$PORT/cart?restore=c-22&code=$code",
            '... Location carries the cart and the code');
    }
    stop();
};

done_testing();
