#!/usr/bin/perl
# 49-push.t: web push (issue 13) end to end, through nginx. `remarket
# keygen --vapid` makes the key; GET /rm/push/key serves its public half
# and /rm/sw.js the service worker (Service-Worker-Allowed: /); a browser
# known by its rm_vid cookie posts its PushSubscription to
# /rm/push/subscribe (bad ones refused with a clear status); `remarket
# push-test EMAIL` sends to a local stand-in of the push service
# (tests/lib/push_service.py), which verifies the VAPID JWT's ES256
# signature and decrypts the aes128gcm body with python3-cryptography, as
# a push service and a browser would; a 410 from it deletes the
# subscription, and `forget` deletes the rest.
use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use Cwd qw(abs_path);
use JSON::PP ();
use Time::HiRes qw(sleep time);
use POSIX qw(:sys_wait_h);
use lib dirname(abs_path($0)) . '/lib';
use RMTest qw(:DEFAULT root free_port);

plan skip_all => 'python3 with python3-cryptography is needed '
	. '(scripts/deps.sh test installs it)'
	unless system('python3 -c "import cryptography" 2>/dev/null') == 0;

my $J = JSON::PP->new->canonical;
my $dir = tempdir('rm-push-XXXXXX', TMPDIR => 1, CLEANUP => 1);
sub slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }

start(env => { REMARKET_VAPID_KEY_FILE => "$dir/vapid.pem",
	REMARKET_VAPID_SUBJECT => 'mailto:shop@example.com',
	REMARKET_STORE_NAME => 'Maison Test' });

# ---- the stand-in push service; stopped whatever happens ----
my $port = free_port();
my $ps = fork // die "fork: $!";
if (!$ps) {
	exec 'python3', root() . '/tests/lib/push_service.py', $port, $dir;
	exit 127;
}
END { local $?; if ($ps) { kill "TERM", $ps; waitpid $ps, 0 } }
my $end = time + 10;
sleep 0.05 until -f "$dir/keys.json" || time > $end;
my $keys = $J->decode(slurp("$dir/keys.json") || '{}');
ok($keys->{p256dh} && $keys->{auth}, 'the push service stand-in is up');
my $push = "http://127.0.0.1:$port";

# ---- keygen --vapid ----
my ($rc, $out, $err) = cli('keygen', '--vapid');
is($rc, 0, 'keygen --vapid exits 0') or diag $err;
chomp(my $pub = $out);
like($pub, qr/^B[A-Za-z0-9_-]{86}$/, 'it prints the public key: an uncompressed P-256 point, base64url');
is((stat "$dir/vapid.pem")[2] & 0777, 0600, 'the key file is mode 0600');
like(slurp("$dir/vapid.pem"), qr/^-----BEGIN PRIVATE KEY-----/, '... PEM');
($rc, $out, $err) = cli('keygen', '--vapid');
is($rc, 1, 'a second keygen --vapid refuses to replace the key');
like($err, qr/exists/, '... and says why');

# ---- what the storefront loads ----
my $r = http('GET', '/rm/push/key');
is($r->{status}, 200, 'GET /rm/push/key: 200');
is(eval { $J->decode($r->{content})->{key} } // '', $pub, '... the public key');
$r = http('GET', '/rm/sw.js');
is($r->{status}, 200, 'GET /rm/sw.js: 200');
is($r->{headers}{'service-worker-allowed'}, '/', '... with Service-Worker-Allowed: / (scope / works)');
like($r->{headers}{'content-type'} // '', qr{^application/javascript}, '... as JavaScript');
is($r->{content}, slurp(root() . '/static/sw.js'), '... the file of static_dir');

# ---- a known browser subscribes ----
my $vid = 'vPushTest0000000000000a';
$r = post_event($J->encode({ type => 'identify', email => 'ann@example.com',
	consent => JSON::PP::true, visitor_id => $vid }), path => '/rm/collect',
	sig => undef, ctype => 'text/plain');
is($r->{status}, 204, 'the browser names its contact through /collect');
sub subscribe {
	my ($body, %h) = @_;
	return http('POST', '/rm/push/subscribe', ref $body ? $J->encode($body) : $body,
		{ 'Content-Type' => 'application/json', Cookie => "rm_vid=$vid", %h });
}
my $sub = { endpoint => "$push/push/ann", expirationTime => undef, keys => $keys };
$r = subscribe($sub);
is($r->{status}, 204, 'POST /rm/push/subscribe: 204') or diag $r->{content};
is(sql("SELECT s.endpoint || '|' || c.email FROM push_subscriptions s JOIN contacts c "
	. "ON c.id = s.contact_id"), "$push/push/ann|ann\@example.com",
	'the subscription is stored, tied to the contact of the rm_vid');
is(subscribe($sub)->{status}, 204, 'the same subscription again: 204');
is(sql('SELECT count(*) FROM push_subscriptions'), 1, '... still one row');

# bad subscriptions, each refused with its status; nothing stored
my %bad = (
	'no cookie' => [400, $sub, Cookie => ''],
	'not JSON' => [400, '{"endpoint":'],
	'keys missing' => [400, { endpoint => "$push/x" }],
	'a number for a key' => [400, { endpoint => "$push/x", keys => { p256dh => 5, auth => $keys->{auth} } }],
	'a short p256dh' => [400, { endpoint => "$push/x", keys => { p256dh => 'BAAA', auth => $keys->{auth} } }],
	'a point off the curve' => [400, { endpoint => "$push/x", keys => { p256dh => 'B' . ('A' x 86), auth => $keys->{auth} } }],
	'a long auth' => [400, { endpoint => "$push/x", keys => { %$keys, auth => $keys->{p256dh} } }],
	'a javascript: endpoint' => [400, { endpoint => 'javascript:alert(1)', keys => $keys }],
	'a file: endpoint' => [400, { endpoint => 'file:///etc/passwd', keys => $keys }],
	'another origin' => [403, $sub, Origin => 'https://evil.example'],
	'a form post' => [415, $sub, 'Content-Type' => 'application/x-www-form-urlencoded'],
);
for my $why (sort keys %bad) {
	my ($want, $body, %h) = @{ $bad{$why} };
	$r = subscribe($body, %h);
	is($r->{status}, $want, "$why: $want") or diag $r->{content};
}
is(sql('SELECT count(*) FROM push_subscriptions'), 1, 'no bad subscription was stored');

# ---- push-test: encrypted, signed, delivered ----
($rc, $out, $err) = cli('push-test', 'ann@example.com');
is($rc, 0, 'push-test exits 0') or diag "$out$err";
like($out, qr/^subscription \d+: sent$/m, '... and says it was sent');
my @req = map { $J->decode($_) } split /\n/, slurp("$dir/requests.jsonl");
is(scalar @req, 1, 'the push service got one request');
my $q = $req[0] || {};
is($q->{vapid}, 'ok', 'its VAPID JWT verifies (ES256) with aud = the push service origin') or diag $q->{vapid};
is($q->{k}, $pub, '... and k= is the key keygen printed');
is($q->{claims}{sub}, 'mailto:shop@example.com', '... sub is vapid_subject');
is($q->{encoding}, 'aes128gcm', 'Content-Encoding: aes128gcm');
like($q->{ttl} // '', qr/^\d+$/, 'a TTL header');
is($q->{decrypt}, undef, 'the body decrypts with the browser\'s key (RFC 8291)') or diag $q->{decrypt};
is($q->{payload}{title}, '[TEST] Maison Test', '... the title');
is($q->{payload}{url}, $RMTest::CONF{REMARKET_STORE_URL}, '... the url');
like($q->{payload}{body} // '', qr/Web push works/, '... the body');
ok(sql('SELECT last_status FROM push_subscriptions') == 201, 'the send is recorded (201)');

# ---- a browser that left: 410 deletes its subscription ----
is(subscribe({ %$sub, endpoint => "$push/push/gone" })->{status}, 204, 'a second browser subscribes');
is(subscribe({ %$sub, endpoint => "$push/push/missing" })->{status}, 204, 'and a third');
($rc, $out, $err) = cli('push-test', 'ann@example.com');
is($rc, 0, 'push-test: exit 0 when one was sent');
like($out, qr/410 .*deleted/, 'the 410 is reported') or diag $out;
like($out, qr/404 .*deleted/, 'the 404 is reported') or diag $out;
is(sql('SELECT group_concat(endpoint) FROM push_subscriptions'), "$push/push/ann",
	'the subscriptions the push service answered 410 and 404 are deleted');

# ---- a due cart step by channel=push,email goes by push ----
my $T0 = 1795000000;
cli('flows', 'holdout', 'abandoned_cart', 0);
($rc, $out, $err) = cli('flows', 'set', 'abandoned_cart', 1, 'channel=push,email');
is($rc, 0, 'flows set abandoned_cart 1 channel=push,email') or diag $err;
like($out, qr/by push,email/, '... listed with its channels') or diag $out;
sub push_check {
	my (undef, $o) = cli('status', '--json');
	my ($c) = grep { $_->{name} eq 'push' } @{ (eval { $J->decode($o) } || {})->{checks} || [] };
	return $c || {};
}
is(push_check()->{level}, 'ok', 'status: the push step is ready') or diag explain push_check();
like(push_check()->{message} // push_check()->{text} // '', qr/1 step can go by push/, '... and says so')
	or diag explain push_check();
rename "$dir/vapid.pem", "$dir/vapid.off";
is(push_check()->{level}, 'warn', 'status: without the VAPID key, a warning');
rename "$dir/vapid.off", "$dir/vapid.pem";
($rc, $out, $err) = cli('event', '--now', $T0, { stdin => '{"type":"cart",'
	. '"email":"ann@example.com","cart_id":"c-ann","consent":true,"name":"Ann Lee",'
	. '"currency":"EUR","items":[{"sku":"A","name":"A","price":30,"qty":1}],'
	. "\"total\":30,\"ts\":$T0}" });
is($rc, 0, 'ann leaves a cart') or diag $err;
($rc, $out, $err) = cli('tick', '--now', $T0 + 3700);
is($rc, 0, 'the tick exits 0') or diag "$out$err";
@req = map { $J->decode($_) } split /\n/, slurp("$dir/requests.jsonl");
$q = $req[-1] || {};
is($q->{path}, '/push/ann', 'the step went to ann\'s browser');
is($q->{vapid}, 'ok', '... signed (VAPID)') or diag $q->{vapid};
is($q->{decrypt}, undef, '... and it decrypts') or diag $q->{decrypt};
is($q->{payload}{title}, 'Ann, your cart is waiting', 'its title: the first line of cart_reminder.push');
like($q->{payload}{body} // '', qr/^It is saved for you at Maison Test \(.*30\.00\)/,
	'its body: the second line, with the cart\'s total');
like($q->{payload}{url} // '', qr{^\Q$RMTest::CONF{REMARKET_BASE_URL}\E/?R/}i,
	'its url: the signed cart link') or diag $q->{payload}{url};
is(sql("SELECT channel || ' ' || status FROM messages"), 'push sent',
	'the message is recorded: channel push, sent');
($rc, $out, $err) = cli('report', '--json', '--now', $T0 + 7200);
is($rc, 0, 'report --json') or diag $err;
my $rep = eval { $J->decode($out) } || {};
is_deeply([map { "$_->{name} $_->{sent}" } @{ $rep->{channels} || [] }], ['push 1'],
	'the report counts one push sent') or diag $out;

# ---- a contact with none; forget ----
($rc, $out, $err) = cli('push-test', 'nobody@example.com');
is($rc, 1, 'push-test for a contact without subscriptions: exit 1');
like($err, qr/no push subscription/, '... saying so');
($rc, $out, $err) = cli('forget', 'ann@example.com');
is($rc, 0, 'forget') or diag $err;
is(sql('SELECT count(*) FROM push_subscriptions'), 0, 'forget deletes the contact\'s subscriptions');

done_testing();
