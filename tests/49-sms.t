#!/usr/bin/perl
# 49-sms.t: SMS as a step's channel (issue 13), through the real binary,
# the injected clock and a local stand-in of the provider's API
# (tests/lib/sms_provider.py, recording every request). A due cart step
# with channel=sms,email goes by SMS to a contact with a phone and SMS
# consent (Twilio's form API: To, From, Body with the store's name, STOP
# to opt out and a signed /r/ link; Basic auth) and by mail to one
# without; the message rows record their channel. A number the provider
# refuses (400, code 21211) fails that message only (no suppression);
# a 503 is retried. The JSON webhook is signed as our hooks are.
# A phone that is not E.164 is refused by the event validators.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();
use Digest::SHA qw(hmac_sha256_hex);
use MIME::Base64 ();
use Encode ();

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
plan skip_all => "$bin not built: run make" unless -x $bin;
plan skip_all => 'python3 needed for the provider stand-in'
	unless system('python3 -c 1 2>/dev/null') == 0;
my $tmp = tempdir(CLEANUP => 1);

# the stand-in of the provider, stopped whatever happens
my $pid = fork // die;
if (!$pid) {
	exec 'python3', "$root/tests/lib/sms_provider.py", "$tmp/sms.log", "$tmp/port";
	exit 127;
}
END { kill 'TERM', $pid if $pid; }
for (1 .. 100) { last if -s "$tmp/port"; select undef, undef, undef, 0.05 }
my $port = do { local (@ARGV, $/) = "$tmp/port"; <> } or BAIL_OUT('stand-in did not start');

my %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_CONFIG => '/dev/null',
	REMARKET_BASE_URL => 'http://127.0.0.1:9/rm',
	REMARKET_STORE_URL => 'http://127.0.0.1:9',
	REMARKET_CART_URL => 'http://127.0.0.1:9/cart?restore={cart}',
	REMARKET_FROM => 'Shop <shop@example.com>',
	REMARKET_STORE_NAME => 'Maison Test',
	REMARKET_POSTAL_ADDRESS => '1 Test Street, 75000 Paris',
	REMARKET_SMS_PROVIDER => 'twilio',
	REMARKET_TWILIO_ACCOUNT_SID => 'AC123',
	REMARKET_TWILIO_AUTH_TOKEN => 'secret-token',
	REMARKET_SMS_FROM => '+15005550006',
	REMARKET_TWILIO_API_URL => "http://127.0.0.1:$port");
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
	my $o = `sqlite3 -batch '$tmp/rm.db' "$_[0]"`;
	$o =~ s/\s+\z//;
	return $o;
}
sub requests {
	open my $f, '<', "$tmp/sms.log" or return ();
	return map { $J->decode($_) } <$f>;
}
sub cart {
	my ($who, $t, $extra) = @_;
	return qq({"type":"cart","email":"$who\@example.com","cart_id":"c-$who",)
		. qq("consent":true,"name":"Name $who","currency":"EUR",)
		. qq("items":[{"sku":"A","name":"A","price":30,"qty":1}],"total":30,"ts":$t$extra});
}
sub tick {
	my ($rc, $out, $err) = rm('', 'tick', '--now', $_[0]);
	diag("tick: $rc $out $err") unless $rc == 0;
	return eval { $J->decode($out) } || {};
}

my ($rc, $out, $err) = rm('', 'init');
is($rc, 0, 'init') or diag($err);
rm('', 'flows', 'holdout', 'abandoned_cart', 0);
($rc, $out, $err) = rm('', 'flows', 'set', 'abandoned_cart', 1, 'channel=sms,email');
is($rc, 0, 'flows set channel=sms,email') or diag($err);
like($out, qr/step 1 .* by sms,email/, '... listed with its channels');
($rc, undef, $err) = rm('', 'flows', 'set', 'abandoned_cart', 1, 'channel=fax');
is($rc, 2, 'an unknown channel is refused');

# status: the SMS steps, their provider and templates
sub sms_check {
	my ($rc, $out) = rm('', 'status', '--json', '--now', $T0);
	my $j = eval { $J->decode($out) } || {};
	my ($c) = grep { $_->{name} eq 'sms' } @{ $j->{checks} || [] };
	return $c || {};
}
is(sms_check()->{level}, 'ok', 'status: sms ok with the provider set up');
{
	local $env{REMARKET_SMS_PROVIDER} = '';
	my $c = sms_check();
	is($c->{level}, 'warn', 'status: sms steps without a provider: a warning');
	like($c->{message} // $c->{msg} // '', qr/1 step can go by SMS, but sms_provider/, '... saying so');
}

# the validators: a phone must be E.164
($rc, undef, $err) = rm(cart('bad', $T0, ',"phone":"0612345678"'), 'event', '--now', $T0);
is($rc, 1, 'a phone without +country is refused') or diag($err);
like($err, qr/phone: must be an E\.164 number/, '... saying why');
($rc, undef, $err) = rm(cart('bad', $T0, ',"sms_consent":"yes"'), 'event', '--now', $T0);
like($err, qr/sms_consent: must be true or false/, 'sms_consent must be a boolean');

# sam: phone and SMS consent; eli: a phone, no SMS consent (mail consent
# only: never implied); nix: refused number; tmp: a 503 number
($rc, undef, $err) = rm('[' . join(',',
	cart('sam', $T0, ',"phone":"+14155550100","sms_consent":true'),
	cart('eli', $T0, ',"phone":"+14155550111"'),
	cart('nix', $T0, ',"phone":"+15005550001","sms_consent":true'),
	cart('tmp', $T0, ',"phone":"+15005550009","sms_consent":true')) . ']',
	'event', '--now', $T0);
is($rc, 0, 'four carts recorded') or diag($err);
($rc, $out) = rm('', 'contact', 'sam@example.com');
like($out, qr/^phone\s+\+14155550100$/m, 'contact shows the phone');
like($out, qr/^"sms_consent"\s+1$/m, '... the SMS consent');
like($out, qr/^"sms_consent_source"\s+cli$/m, '... its source');
like($out, qr/^"sms_consent_at"\s+$T0$/m, '... and its time');
($rc, $out) = rm('', 'contact', 'eli@example.com');
like($out, qr/^"sms_consent"\s+0$/m, 'mail consent does not imply SMS consent');

my $s = tick($T0 + 3700);
my @r = requests();
is(scalar @r, 3, 'three SMS requests reached the provider (sam, nix, tmp)')
	or diag(join "\n", map { $_->{body} } @r);
my ($sam) = grep { $_->{body} =~ /To=%2B14155550100/ } @r;
ok($sam, 'sam got an SMS');
is($sam && $sam->{path}, '/2010-04-01/Accounts/AC123/Messages.json', "... at Twilio's path");
is($sam && $sam->{content_type}, 'application/x-www-form-urlencoded', '... as a form');
is($sam && $sam->{authorization}, 'Basic ' . MIME::Base64::encode_base64('AC123:secret-token', ''),
	'... with Basic auth of the SID and token');
my %f = map { my ($k, $v) = split /=/, $_, 2; $v =~ tr/+/ /; $v =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge; ($k, Encode::decode_utf8($v)) }
	split /&/, ($sam ? $sam->{body} : '');
is($f{From}, '+15005550006', '... from sms_from');
like($f{Body} // '', qr/^Maison Test: Name, your cart \(\x{20ac}30\.00\) is saved for you: /, '... the store name first');
like($f{Body} // '', qr{http://127\.0\.0\.1:9/rm/r/[A-Za-z0-9_-]+}, '... a signed /r/ link');
like($f{Body} // '', qr/STOP to opt out\.$/, '... and STOP to opt out');
unlike($f{Body} // '', qr/\n/, '... on one line');
is(sql("SELECT m.channel || ' ' || m.status FROM messages m JOIN contacts c "
	. "ON c.id = m.contact_id WHERE c.email = 'sam\@example.com'"), 'sms sent',
	"sam's message: channel sms, sent");
is(sql("SELECT m.channel || ' ' || m.status FROM messages m JOIN contacts c "
	. "ON c.id = m.contact_id WHERE c.email = 'eli\@example.com'"), 'email sent',
	"eli's message: channel email, sent");
my @eml = glob("$tmp/outbox/*.eml");
is(scalar @eml, 1, 'one mail in the outbox (eli)');
is(sql("SELECT m.status || ' ' || coalesce(c.suppressed_at, 'not-suppressed') "
	. "FROM messages m JOIN contacts c ON c.id = m.contact_id "
	. "WHERE c.email = 'nix\@example.com'"), 'failed not-suppressed',
	'a number refused (400, 21211): that message failed, the contact not suppressed');
like(sql("SELECT error FROM messages m JOIN contacts c ON c.id = m.contact_id "
	. "WHERE c.email = 'nix\@example.com'"), qr/400.*21211/, '... the answer recorded');
is(sql("SELECT e.next_step || ' ' || e.status FROM enrollments e JOIN contacts c "
	. "ON c.id = e.contact_id WHERE c.email = 'nix\@example.com'"), '2 active',
	'... and the sequence goes on to step 2');
is(sql("SELECT m.status || ' ' || m.attempts FROM messages m JOIN contacts c "
	. "ON c.id = m.contact_id WHERE c.email = 'tmp\@example.com'"), 'queued 1',
	'a 503: queued for a retry, one attempt counted');
is($s->{sent}, 2, 'the tick counts two sent');

# the retry goes after its back-off, once
$s = tick($T0 + 3700 + 301);
is(scalar(requests()), 4, 'the 503 is retried after its back-off');

# no consent at all for an sms-only step: the step is skipped, not sent
rm('', 'flows', 'set', 'abandoned_cart', 2, 'channel=sms');
$s = tick($T0 + 86400 + 10);
is(sql("SELECT m.status || ' ' || m.channel FROM messages m JOIN contacts c "
	. "ON c.id = m.contact_id WHERE c.email = 'eli\@example.com' AND m.step = 2"),
	'skipped email', 'an sms-only step for a contact without SMS consent: skipped');
like(sql("SELECT error FROM messages m JOIN contacts c ON c.id = m.contact_id "
	. "WHERE c.email = 'eli\@example.com' AND m.step = 2"), qr/^channel: sms/, '... saying why');
is(sql("SELECT group_concat(c.email || ' ' || m.status, ', ') FROM messages m "
	. "JOIN contacts c ON c.id = m.contact_id WHERE m.step = 2 AND m.channel = 'sms' "
	. "AND c.email IN ('sam\@example.com', 'nix\@example.com') ORDER BY c.email"),
	'nix@example.com failed, sam@example.com sent',
	'... while sam gets it by SMS (nix: the number refused again)');

# a number that sent STOP to the provider (21610): its consent ends too
rm(cart('opt', $T0 + 90000, ',"phone":"+15005550002","sms_consent":true'),
	'event', '--now', $T0 + 90000);
tick($T0 + 90000 + 3700);
is(sql("SELECT m.status || ' ' || c.sms_consent || ' ' || c.sms_consent_source "
	. "FROM messages m JOIN contacts c ON c.id = m.contact_id "
	. "WHERE c.email = 'opt\@example.com'"), 'failed 0 provider: opted out (21610)',
	'Twilio 21610 (the number opted out there): the message failed, SMS consent off');

# forget erases the phone and its consent
($rc, undef, $err) = rm('', 'forget', 'sam@example.com');
is($rc, 0, 'forget sam') or diag($err);
is(sql("SELECT count(*) FROM contacts WHERE phone = '+14155550100' OR (email LIKE '#forgotten-%' "
	. "AND (phone IS NOT NULL OR sms_consent_at IS NOT NULL))"), 0,
	'forget: the phone and SMS consent are gone');

# the generic webhook, signed like the store's hooks
$env{REMARKET_SMS_PROVIDER} = 'webhook';
$env{REMARKET_SMS_URL} = "http://127.0.0.1:$port/sms";
$env{REMARKET_SMS_SECRET} = 'hook-secret';
rm(cart('web', $T0 + 100000, ',"phone":"+14155550122","sms_consent":true'),
	'event', '--now', $T0 + 100000);
tick($T0 + 100000 + 3700);
my @w = grep { $_->{content_type} =~ /json/ && $_->{body} =~ /14155550122/ } requests();
is(scalar @w, 1, 'webhook: one request');
my $w = $w[0] || {};
is($w->{path}, '/sms', '... to sms_url');
my $b = eval { $J->decode($w->{body}) } || {};
is($b->{to}, '+14155550122', '... JSON with to');
like($b->{text} // '', qr/^Maison Test: .*STOP to opt out\.$/, '... and the text');
my ($t, $v1) = ($w->{signature} // '') =~ /^t=(\d+),v1=([0-9a-f]{64})$/;
ok($t && $v1 eq hmac_sha256_hex(Encode::encode_utf8("$t.$w->{body}"), 'hook-secret'),
	'... signed: X-Remarket-Signature, HMAC-SHA256 of "<t>.<body>" with sms_secret');

# preview of a .sms: the line and how it travels
($rc, $out, $err) = rm('', 'preview', 'cart_reminder.sms');
is($rc, 0, 'preview cart_reminder.sms') or diag($err);
like($out, qr/^Maison Test: Sample, your cart .* Reply STOP to opt out\.\n-- GSM-7: \d+ septets, 1 segment /,
	'... the line, then GSM-7 and its segment count');
($rc, $out, $err) = rm('', 'preview', 'nothing_here.sms', '--trigger', 'cart_abandoned');
is($rc, 1, 'preview of a missing .sms: exit 1');
like($err, qr/nothing_here\.sms: cannot read it/, '... naming the file');

done_testing();
