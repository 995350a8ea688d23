package RMScenario;
# RMScenario: the abandoned-cart scenario of the integration tests, shared
# by tests/20-integration.t (through nginx, with three more scenarios) and
# tests/25-webservers.t (through Apache and lighttpd), and the helpers the
# scenarios are written with.
#
# server_scenario($server) starts a world with RMTest behind that web
# server, runs ann's story end to end (health, signed identify+cart, POST
# /rm/tick with the bearer token, the +1 h reminder through smtp-sink, the
# recovery link, a forged link, the open pixel, an order that ends the
# flow, nothing at +24 h), then the rest of what every web server must pass
# through unchanged (POST /rm/collect, a bad signature, a 405 with Allow,
# bodies over remarket's 64 KiB and over the web server's own limit, the
# one-click unsubscribe POST), and stops the world.
#
# Anything the server signs or verifies against its own clock (webhook
# signatures, link tokens) uses real time; the flow engine's clock is moved
# with `remarket tick --now T`, which shares the database with the server.
use strict;
use warnings;
use Exporter 'import';
use Test::More;
use JSON::PP ();
use Time::HiRes ();
use HTTP::Tiny ();
use RMTest qw(:DEFAULT http_port $TICK_TOKEN);

our @EXPORT = qw(server_scenario rel tick_at wait_tick cart_event item shopper check_mail
  contact_sql $J $T0 $PORT);

# $T0: the scenario's start (real time); $PORT: the web server's port.
our $J = JSON::PP->new->canonical;
our ($T0, $PORT);

sub rel { my $t = shift; my $d = $t - $T0; return $d >= 0 ? "T0+$d" : "T0$d" }

# Polls GET /rm/tick/$id until the run is no longer running (at most
# $timeout seconds, default 30); returns the decoded state (or {}).
sub wait_tick {
    my ($id, $timeout) = @_;
    my $end = Time::HiRes::time() + ($timeout // 30);
    my $j = {};
    while (1) {
        my $r = http('GET', "/rm/tick/" . ($id // 'latest'), undef,
            { Authorization => "Bearer $TICK_TOKEN" });
        $j = decode_json_or_undef($r->{content}) || { status => $r->{status} };
        last if ($j->{state} // 'running') ne 'running' || Time::HiRes::time() > $end;
        Time::HiRes::sleep(0.05);
    }
    return $j;
}

# Run `remarket tick --now $now`; returns the decoded summary (or {}).
sub tick_at {
    my ($now, %o) = @_;
    my ($rc, $out, $err) = cli('tick', '--now', $now, { env => $o{env} });
    my $what = 'remarket tick --now ' . rel($now) . ($o{what} ? " ($o{what})" : '');
    my $want = $o{rc} // 0; # 1: a tick that could not send
    is($rc, $want, "$what exits $want") or diag "stderr: $err\nstdout: $out";
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
# ann abandons, gets one reminder, clicks, orders; then the requests every
# web server in front of remarket must pass through unchanged.
sub server_scenario {
    my ($server) = @_;
    start(server => $server);
    $PORT = http_port();
    $T0 = time();

    my $r = http('GET', '/rm/health');
    is($r->{status}, 200, 'GET /rm/health -> 200');
    like($r->{content}, qr/\Aok\n?\z/, '... body ok');

    shopper('ann@example.com', 'Ann', 'c-19',
        item('LAMP-1', 'Rattan lamp', 39.9), item('CUSH-2', 'Linen cushion', 39.9));
    is(contact_sql('name', 'ann@example.com'), 'Ann', 'contact ann recorded with her name');

    # POST /tick answers at once (202, the run's id); the run's summary
    # is read from GET /tick/<id> once it has finished
    $r = http('POST', '/rm/tick', '', { Authorization => "Bearer $TICK_TOKEN" });
    is($r->{status}, 202, 'POST /rm/tick with the bearer token -> 202')
        or diag "body: $r->{content}";
    like($r->{headers}{'content-type'} // '', qr{^application/json}, '... JSON');
    my $j = decode_json_or_undef($r->{content}) || {};
    like($j->{tick} // '', qr/^[1-9][0-9]*\z/, '... with the id of the run') or diag $r->{content};
    $j = wait_tick($j->{tick});
    is($j->{state}, 'finished', 'GET /rm/tick/<id>: the run finished') or diag $J->encode($j);
    is($j->{sent}, 0, '... sent 0 at real time (nothing due)') or diag $J->encode($j);

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

    # --- what the web server must pass through unchanged -------------------
    $r = http('POST', '/rm/collect', $J->encode({ type => 'view', visitor_id => 'v-1',
        url => "http://127.0.0.1:$PORT/p/lamp-1" }), { 'Content-Type' => 'text/plain' });
    is($r->{status}, 204, 'POST /rm/collect (a view) -> 204') or diag "body: $r->{content}";

    my $fp = table_fingerprint();
    my $ident = $J->encode({ type => 'identify', email => 'zoe@example.com', name => 'Zoe',
        consent => JSON::PP::true });
    $r = post_event($ident, secret => 'not-the-secret');
    json_error($r, 401, 'identify signed with the wrong secret');

    $r = http('GET', '/rm/events');
    json_error($r, 405, 'GET /rm/events');
    like($r->{headers}{allow} // '', qr/\bPOST\b/, '... Allow: POST');

    my $over = $ident . (' ' x (100_000 - length $ident));
    $r = post_event($over);
    json_error($r, 413, 'signed body of 100 000 bytes (over max_body, under the server limit)');
    $r = post_event($ident . (' ' x (200_000 - length $ident)));
    is($r->{status}, 413, "signed body of 200 000 bytes (over the limit of ${server}) -> 413")
        or diag "body: " . substr($r->{content}, 0, 300);
    is(table_fingerprint(), $fp, '... and none of these recorded anything');

    my $unsub = $mail->{links}{unsub};
    SKIP: {
        skip 'no List-Unsubscribe URL', 3 unless $unsub;
        is(contact_sql('unsubscribed_at', 'ann@example.com'), '', 'ann not unsubscribed yet');
        $r = http('POST', $unsub, 'List-Unsubscribe=One-Click',
            { 'Content-Type' => 'application/x-www-form-urlencoded' });
        is($r->{status}, 200, 'one-click POST to the List-Unsubscribe URL -> 200')
            or diag "body: $r->{content}";
        isnt(contact_sql('unsubscribed_at', 'ann@example.com'), '',
            'contacts.unsubscribed_at is set for ann');
    }
    report_gate($server);
    stop();
}

# The example's deny-by-default /rm/report: from another address (here
# 127.0.0.2, which is not this machine's 127.0.0.1 or ::1 as far as the web
# server's rule goes) only a report link gets through, whatever the token
# or the spelling of the path; from 127.0.0.1 the tick_token still works.
sub report_gate {
    my ($server) = @_;
    my $other = sub {
        my ($path, $hdr) = @_;
        my $ua = HTTP::Tiny->new(max_redirect => 0, timeout => 20, keep_alive => 0,
            local_address => '127.0.0.2');
        my $r = $ua->request('GET', "http://127.0.0.1:$PORT$path", { headers => $hdr || {} });
        return { status => $r->{status}, content => $r->{content} // '' };
    };
    my $bearer = { Authorization => "Bearer $TICK_TOKEN" };
    is($other->('/rm/health')->{status}, 200, "$server: 127.0.0.2 reaches /rm/health");
    for my $path ('/rm/report', '/rm/report.json', '/rm//report', '/rm/%72eport.json',
        '/rm/report/carts', '/rm/report/contact?c=1', '/rm//report/carts?page=2',
        '/rm/./report', '/rm/report?x=t=1', '/rm/report.json?T=1') {
        my $r = $other->($path, $bearer);
        is($r->{status}, 403, "$server: GET $path from 127.0.0.2 with the tick_token -> 403")
            or diag "body: " . substr($r->{content}, 0, 300);
    }
    my ($rc, $link) = cli('report', '--link');
    chomp $link;
    my ($q) = $link =~ m{(\?t=[A-Za-z0-9_-]+)\z};
    ok($q, 'remarket report --link prints a link') or diag $link;
    my $r = $other->("/rm/report$q");
    is($r->{status}, 200, "$server: the report link opens the report from 127.0.0.2")
        or diag "body: " . substr($r->{content}, 0, 300);
    like($r->{content}, qr/<html/i, '... an HTML page');
    is($other->("/rm/report.json$q")->{status}, 200, '... and report.json');
    is($other->('/rm/report.json?t=forged', $bearer)->{status}, 401,
        "$server: a forged ?t= with the tick_token from 127.0.0.2 -> 401 (judged by the link)");
    is(http('GET', '/rm/report.json', undef, $bearer)->{status}, 200,
        "$server: from 127.0.0.1 the tick_token opens report.json");
    is(http('GET', '/rm/report.json')->{status}, 401, '... and without it -> 401');
}

# An error answer from remarket: the status, JSON, {"error": "..."}.
sub json_error {
    my ($r, $status, $what) = @_;
    is($r->{status}, $status, "$what -> $status") or diag "body: " . substr($r->{content}, 0, 300);
    like($r->{headers}{'content-type'} // '', qr{^application/json}, '... application/json');
    my $j = decode_json_or_undef($r->{content});
    ok(ref $j eq 'HASH' && defined $j->{error} && length $j->{error}, '... {"error":"..."}')
        or diag "body: " . substr($r->{content}, 0, 300);
}

1;
