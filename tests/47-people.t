#!/usr/bin/perl
# 47-people.t: the tools for a person (issue 11), through the real binary
# and the injected clock, mail to the outbox: `contact` shows what was
# sent; `unsubscribe` and `suppress add` stop the next tick's mail and
# `suppress remove` lets it go again; `export` is JSON with the events'
# bodies; after `forget` the address is in no table, no dump of the
# database and no outbox file, the report's orders and revenue are the
# same, and a new event or import naming the address does not mail them.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
plan skip_all => "$bin not built: run make" unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
my %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null',
	REMARKET_BASE_URL => 'http://127.0.0.1:9/rm',
	REMARKET_STORE_URL => 'http://127.0.0.1:9',
	REMARKET_CART_URL => 'http://127.0.0.1:9/cart?restore={cart}',
	REMARKET_FROM => 'Shop <shop@example.com>',
	REMARKET_POSTAL_ADDRESS => '1 Test Street, 75000 Paris');
my $J = JSON::PP->new->canonical;
my $T0 = 1795000000;

sub rm {
	my ($stdin, @args) = @_;
	local %ENV = (%ENV, %env);
	delete local $ENV{GATEWAY_INTERFACE};
	open my $in, '>', "$tmp/in" or die;
	print $in $stdin;
	close $in;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql {
	my ($q) = @_;
	my $o = `sqlite3 -batch '$tmp/rm.db' "$q"`;
	$o =~ s/\s+\z//;
	return $o;
}
sub cart {
	my ($who, $t, $cart) = @_;
	$cart //= "c-$who";
	return qq({"type":"cart","email":"$who\@example.com","cart_id":"$cart",)
		. qq("consent":true,"name":"Name $who","currency":"EUR",)
		. qq("items":[{"sku":"A","name":"A","price":30,"qty":1}],"total":30,"ts":$t});
}
sub tick {
	my ($t) = @_;
	my ($rc, $out, $err) = rm('', 'tick', '--now', $t);
	my $j = eval { $J->decode($out) } || {};
	diag("tick: $rc $out $err") unless $rc == 0;
	return $j->{sent} // -1;
}
sub outbox_all {
	opendir my $d, "$tmp/outbox" or return '';
	my $s = '';
	for (grep { /\.eml$/ } readdir $d) {
		local (@ARGV, $/) = "$tmp/outbox/$_";
		$s .= <>;
	}
	return $s;
}

my ($rc, $out, $err) = rm('', 'init');
is($rc, 0, 'init') or diag($err);
rm('', 'flows', 'holdout', $_, 0) for qw(abandoned_cart winback post_purchase);

# five shoppers abandon a cart; ann orders too (the report's order)
my @who = qw(ann bob cid dee eve);
($rc, $out, $err) = rm('[' . join(',', map { cart($_, $T0) } @who) . ']',
	'event', '--now', $T0);
is($rc, 0, 'five carts recorded') or diag($err);
is(tick($T0 + 3700), 5, 'the reminders go to all five');
($rc, $out, $err) = rm(qq({"type":"order","order_id":"o-ann","email":"ann\@example.com",)
	. qq("cart_id":"c-ann","total":30,"currency":"EUR","ts":) . ($T0 + 4000) . '}',
	'event', '--now', $T0 + 4000);
is($rc, 0, 'ann orders') or diag($err);

# contact: what was sent
($rc, $out, $err) = rm('', 'contact', 'bob@example.com');
is($rc, 0, 'contact exits 0') or diag($err);
like($out, qr/^messages\[0\]\.status\s+sent$/m, 'contact: the reminder, sent');
like($out, qr/^messages\[0\]\.flow\s+abandoned_cart$/m, '... its flow');
like($out, qr/^carts\[0\]\.status\s+abandoned$/m, '... the cart and its status');
like($out, qr/^events\[0\]\.type\s+cart$/m, '... the event');
($rc, $out) = rm('', 'contact', '--json', 'bob@example.com');
my $c = eval { $J->decode($out) };
is($c && $c->{messages}[0]{step}, 1, 'contact --json: the message and its step');
($rc, undef, $err) = rm('', 'contact', 'nobody@example.com');
is($rc, 1, 'contact of an unknown address: exit 1');
like($err, qr/no contact 'nobody\@example.com'/, '... named');

# unsubscribe / suppress change what the next tick sends
($rc, $out, $err) = rm('', 'unsubscribe', 'bob@example.com');
is($rc, 0, 'unsubscribe') or diag($err);
($rc, $out, $err) = rm('', 'suppress', 'add', 'cid@example.com');
is($rc, 0, 'suppress add') or diag($err);
($rc, $out, $err) = rm('', 'suppress', 'list');
like($out, qr/^cid\@example.com\t\d+\tmanual$/m, 'suppress list names cid');
unlike($out, qr/bob/, '... not bob (unsubscribed, not suppressed)');
is(tick($T0 + 86400 + 100), 2, 'at +24 h: only dee and eve (ann ordered, bob '
	. 'unsubscribed, cid suppressed)');
is(sql("SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
	. "WHERE c.email IN ('bob\@example.com','cid\@example.com') AND m.step = 2 "
	. "AND m.status = 'sent'"), 0, '... none to bob nor cid');
($rc, $out, $err) = rm('', 'suppress', 'remove', 'cid@example.com');
is($rc, 0, 'suppress remove') or diag($err);
is(sql("SELECT suppressed_at IS NULL FROM contacts WHERE email = 'cid\@example.com'"),
	1, '... lifts the suppression');

# export: JSON with the events' bodies
($rc, $out, $err) = rm('', 'export', 'eve@example.com');
is($rc, 0, 'export') or diag($err);
my $x = eval { $J->decode($out) };
ok($x, 'export is JSON') or diag($out);
is($x && $x->{events}[0]{body}{cart_id}, 'c-eve', '... with the event bodies');
is($x && $x->{name}, 'Name eve', '... and the name');

# forget
my $rep = sub { my (undef, $o) = rm('', 'report', '--json', '--since', 0, '--now', $T0 + 90000);
	my $r = eval { $J->decode($o) } || {}; join ' ', map { $_ // '?' } @{$r}{qw(orders revenue)} };
my $before = $rep->();
ok(outbox_all() =~ /eve\@example.com/, 'the outbox holds mail to eve');
($rc, $out, $err) = rm('', 'forget', 'eve@example.com');
is($rc, 0, 'forget') or diag($err);
($rc, $out, $err) = rm('', 'export', 'eve@example.com');
is($rc, 1, 'after forget, export finds nothing');
my $dump = `sqlite3 '$tmp/rm.db' .dump`;
unlike($dump, qr/eve\@example/i, 'the address is in no table (sqlite3 .dump)');
unlike($dump, qr/Name eve/, '... nor the name');
unlike(outbox_all(), qr/eve\@example.com/, '... nor in an outbox file');
is($rep->(), $before, "the report's orders and revenue are unchanged ($before)");
($rc, $out, $err) = rm('', 'forget', 'ann@example.com');
is($rep->(), $before, '... also after forgetting the buyer');

# coming back (after a key rotation: the hash was made with the old key):
# a new cart with consent does not mail them
($rc, $out, $err) = rm('', 'keygen', '--rotate');
is($rc, 0, 'keygen --rotate') or diag($err);
($rc, $out, $err) = rm(cart('eve', $T0 + 100000, 'c-eve-2'), 'event', '--now', $T0 + 100000);
is($rc, 0, 'eve comes back with a new cart') or diag($err);
is(sql("SELECT suppress_reason FROM contacts WHERE email = 'eve\@example.com'"),
	'forgotten', '... and starts suppressed');
is(tick($T0 + 100000 + 3700), 0, '... nothing is sent to her');
is(sql("SELECT count(*) FROM segments s JOIN contacts c ON c.id = s.contact_id "
	. "WHERE c.email LIKE '#forgotten%'"), 0, 'forgotten contacts are in no segment');

# retention_days: the tick deletes the raw events older than that
my $events = sql("SELECT count(*) FROM events");
($rc, $out, $err) = rm('', 'tick', '--now', $T0 + 100000 + 3800);
is(sql("SELECT count(*) FROM events"), $events, 'retention_days 0 (default): every event kept');
{
	local $env{REMARKET_RETENTION_DAYS} = 1;
	($rc, $out, $err) = rm('', 'tick', '--now', $T0 + 100000 + 3900);
	is($rc, 0, 'a tick with retention_days = 1') or diag($err);
}
is(sql("SELECT count(*) FROM events WHERE received < $T0 + 100000 + 3900 - 86400"), 0,
	'... deleted the events older than a day');
is(sql("SELECT count(*) FROM events"), 1, '... and kept the newer one');
done_testing();
