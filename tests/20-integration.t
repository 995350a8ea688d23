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
#      open pixel, order stops the flow; then /collect, a bad signature,
#      a 405, bodies too large, one-click unsubscribe. This one lives in
#      lib/RMScenario.pm (server_scenario), shared with 25-webservers.t,
#      which runs it through Apache and lighttpd.
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
use RMScenario;    # the helpers below, $T0, $PORT, $J and scenario 1

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

# ---------------------------------------------------------------------------
subtest 'scenario 1: ann abandons, gets one reminder, clicks, orders' => sub {
    server_scenario('nginx');
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
        what => 'SMTP refused', rc => 1);
    like($j->{problems}[0] // '', qr/relay is unavailable/, "the tick's problems say the relay is down");
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
