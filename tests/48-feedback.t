#!/usr/bin/perl
# 48-feedback.t: feedback that arrives after a message left (issue 12).
# A real Postfix on a high loopback port, with its own configuration and
# queue in a temporary directory, is remarket's relay: mail to
# @bounce.test goes to its local(8), which knows no such user and bounces;
# the DSN goes to the message's VERP address bounces+<tag>@example.com,
# which a transport map pipes to `remarket feedback ${recipient}` (as the
# README's Postfix set-up does), and the contact is suppressed. Mail to
# any other domain is discarded (never leaves the machine). Then the
# samples of tests/data/feedback (RFC 3464, RFC 5965, a mailto reply)
# through `remarket feedback`, and POST /rm/feedback through nginx:
# remarket's signed format, Mailgun's signed webhook, Postmark's behind
# Basic auth, each with a valid and a forged credential; and the report's
# bounce and complaint rates. Without root or Postfix (or with
# RMTEST_NO_POSTFIX=1), the relay is smtp-sink and the Postfix part is
# skipped, saying so.
use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use Cwd qw(abs_path);
use Digest::SHA qw(hmac_sha256_hex hmac_sha512);
use MIME::Base64 qw(encode_base64);
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(sleep time);
use lib dirname(abs_path($0)) . '/lib';
use RMTest qw(:DEFAULT free_port tmp root bin sink_port %CONF $HOOK_SECRET);

my $root = root();
my $bin = bin();
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $J = JSON::PP->new->canonical;

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }
sub spit { open my $fh, '>', $_[0] or die "$_[0]: $!"; print $fh $_[1]; close $fh }

# ---- a private Postfix: own config dir, queue, log; loopback only ----
my $pf;          # its directory, while it runs
my $pf_why = $ENV{RMTEST_NO_POSTFIX} ? 'RMTEST_NO_POSTFIX is set'
	: $> != 0 ? 'not root (Postfix must start as root)'
	: !-x '/usr/sbin/postfix' || !-x '/usr/lib/postfix/sbin/master'
	? 'postfix is not installed (scripts/deps.sh test installs it)' : '';
my $pf_port = free_port();
END { system("postfix -c '$pf/etc' stop >/dev/null 2>&1") if $pf; }

sub postfix_start {
	my $d = tempdir('rm-postfix-XXXXXX', TMPDIR => 1, CLEANUP => 1);
	mkdir "$d/$_" for qw(etc queue data);
	chmod 0755, $d;
	# pipe(8) runs it as nobody: a copy where nobody may run it, wherever
	# the source tree is
	system('cp', $bin, "$d/remarket") == 0 or die "cp $bin: $!";
	chmod 0755, "$d/remarket";
	my $postfix_uid = getpwnam('postfix');
	chown $postfix_uid, -1, "$d/data" if defined $postfix_uid;
	spit("$d/etc/main.cf", <<"EOF");
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bounce.test
mydomain = bounce.test
myorigin = bounce.test
mydestination = bounce.test, example.com
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# accept any local recipient at RCPT, so that the bounce comes later as a DSN
local_recipient_maps =
alias_maps =
alias_database =
recipient_delimiter = +
# bounces+<tag>\@example.com goes to remarket (transport_maps ignores the +tag)
transport_maps = inline:{ bounces\@example.com=remarket: }
# nothing leaves this machine
default_transport = discard:
relay_transport = discard:
maillog_file = $d/maillog
maillog_file_prefixes = $d
biff = no
delay_warning_time = 0
EOF
	spit("$d/etc/master.cf", <<"EOF");
127.0.0.1:$pf_port inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
remarket unix - n n - - pipe flags=Rq user=nobody argv=$d/remarket -c $d/remarket.conf feedback \${recipient}
EOF
	my $t = time;
	my $out = `postfix -c '$d/etc' start 2>&1`;
	$pf = $d;
	my $end = time + 20;
	while (time < $end) {
		my $c = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $pf_port,
			Proto => 'tcp', Timeout => 1);
		if ($c) { close $c; diag(sprintf 'postfix up in %.1f s', time - $t); return 1 }
		sleep 0.1;
	}
	diag("postfix did not start: $out " . slurp("$d/maillog"));
	return 0;
}

my $with_postfix = !$pf_why && postfix_start();
$pf_why ||= 'postfix did not start' unless $with_postfix;

my %env = (REMARKET_BOUNCE_ADDRESS => 'bounces@example.com',
	REMARKET_UNSUBSCRIBE_MAILTO => 'unsubscribe@example.com',
	REMARKET_MAILGUN_SIGNING_KEY => 'key-mailgun-test',
	REMARKET_POSTMARK_WEBHOOK_AUTH => 'pm:s3cret');
$env{REMARKET_SMTP_URL} = "smtp://127.0.0.1:$pf_port" if $with_postfix;
start(smtp => !$with_postfix, env => \%env);
my $tmp = tmp();

# the pipe runs as nobody with a config file: the same settings as %CONF
if ($with_postfix) {
	my $conf = join '', map { my $k = lc substr($_, 9); "$k = $CONF{$_}\n" }
		grep { /^REMARKET_/ && $CONF{$_} ne '' } sort keys %CONF;
	spit("$pf/remarket.conf", $conf);
	chmod 0644, "$pf/remarket.conf";
	my $nobody = getpwnam('nobody');
	chown $nobody, -1, glob("$tmp/rm.db*"), "$tmp/rm.key";
	chmod 0777, $tmp; # SQLite makes its -wal and -shm files beside the database
}

my $key = slurp("$tmp/rm.key");
$key = substr($key, -32); # the newest key of the ring signs
sub verp { my ($id) = @_;
	sprintf 'bounces+%d.%s@example.com', $id,
		unpack('H16', hmac_sha512('verp:' . pack('q>', $id), $key)) }

my $T0 = time;
my @people = qw(nosuch1@bounce.test nosuch2@bounce.test carol@example.org
	dave@example.org erin@example.org frank@example.org);
my $i = 0;
for my $p (@people) {
	$i++;
	my $r = post_event($J->encode({type => 'cart', cart_id => "fb$i", email => $p,
		name => 'Shopper', consent => JSON::PP::true, currency => 'EUR',
		items => [{sku => 'LAMP-1', name => 'Lamp', price => 49.5, qty => 1}]}));
	die "cart event: $r->{status} $r->{content}" unless $r->{status} == 202;
}
my ($rc, $out, $err) = cli('tick', '--now', '+2h');
is($rc, 0, 'tick sends the first step to six contacts') or diag($err);
is(sql("SELECT count(*) FROM messages WHERE status = 'sent'"), 6, '... six sent');
my %msg = map { my ($e, $id, $mid) = split /\|/; ($e => {id => $id, mid => $mid}) }
	split /\n/, sql("SELECT c.email, m.id, m.message_id FROM messages m "
		. "JOIN contacts c ON c.id = m.contact_id");

SKIP: {
	skip "real Postfix: $pf_why", 5 unless $with_postfix;
	my $end = time + 60;
	my $n;
	while (time < $end) {
		$n = sql("SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL");
		last if $n == 2;
		sleep 0.2;
	}
	my $log = slurp("$pf/maillog");
	my $v1 = verp($msg{'nosuch1@bounce.test'}{id});
	like($log, qr/from=<\Q$v1\E>/, "postfix: the envelope sender is the VERP address ($v1)");
	like($log, qr/dsn=5\.1\.1, status=bounced/, 'postfix: local(8) bounced the unknown user');
	is($n, 2, sprintf 'postfix: its DSNs piped to remarket feedback suppress both '
		. '(%.1f s after the tick)', time - $T0) or diag($log);
	is(sql("SELECT count(*) FROM feedback WHERE kind = 'hard' AND status = '5.1.1' "
		. "AND source = 'mail' AND message IS NOT NULL"), 2,
		'postfix: each bounce recorded against its message');
	is(sql("SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL AND email "
		. "NOT LIKE '%\@bounce.test'"), 0, 'postfix: nobody else suppressed '
		. '(the discarded mail to example.org did not bounce)');
}
if (!$with_postfix) {
	my @m = grep { /bounces\+\d+\.[0-9a-f]{16}\@example\.com/ }
		sink_messages();
	is(scalar @m, 6, 'smtp-sink: every envelope sender is a VERP address');
}

# ---- the samples through `remarket feedback` ----
sub sample {
	my ($file, $who, %o) = @_;
	my $t = slurp("$root/tests/data/feedback/$file");
	my $m = $msg{$who};
	my $verp = $o{verp} // verp($m->{id});
	my $mid = $o{mid} // $m->{mid};
	$t =~ s/\@VERP\@/$verp/g;
	$t =~ s/\@RCPT\@/$who/g;
	$t =~ s/\@MSGID\@/$mid/g;
	$t =~ s/\@MAILTO\@/unsubscribe\@example.com/g;
	return cli('feedback', @{ $o{args} || [] }, {stdin => $t});
}

($rc, $out) = sample('dsn-rfc3464-soft.eml', 'carol@example.org');
is($rc, 0, 'RFC 3464 sample: exit 0');
like($out, qr/^remarket feedback: soft bounce 4\.0\.0: contact \d+ has 1 in 14 days \(message \d+\)$/,
	'RFC 3464 sample: a soft bounce, counted, not suppressed') or diag($out);
($rc, $out) = sample('dsn-delayed.eml', 'carol@example.org');
is($rc, 0, 'delay warning: exit 0');
like($out, qr/left alone: a DSN with Action: delayed/, 'delay warning: left alone, saying why');
($rc, $out) = sample('arf-rfc5965-abuse.eml', 'dave@example.org');
like($out, qr/complaint \(abuse\): contact \d+ unsubscribed and suppressed; step 1 paused/,
	'RFC 5965 sample: a complaint unsubscribes, suppresses, pauses the step') or diag($out);
is(sql("SELECT count(*) FROM contacts WHERE email = 'dave\@example.org' AND "
	. "unsubscribed_at IS NOT NULL AND suppress_reason = 'complaint'"), 1,
	'RFC 5965 sample: dave unsubscribed and suppressed');
like(sql("SELECT paused_reason FROM steps WHERE paused_at IS NOT NULL"),
	qr/^complaints: 1 of 6 sends in 7 days \(16\.67 %, over 0\.3 %\)$/,
	'RFC 5965 sample: the step is paused with its rate');
($rc, $out) = cli('flows', 'resume', 'abandoned_cart', '1');
is($rc, 0, '... and `flows resume` lifts the pause');
($rc, $out) = sample('mailto-unsubscribe.eml', 'erin@example.org', args => ['unsubscribe@example.com']);
like($out, qr/unsubscribe by mailto: contact \d+ unsubscribed/, 'mailto reply: unsubscribes');
is(sql("SELECT count(*) FROM contacts WHERE email = 'erin\@example.org' AND "
	. "unsubscribed_at IS NOT NULL AND suppressed_at IS NULL"), 1,
	'mailto reply: erin unsubscribed, not suppressed');
my $forged = verp($msg{'frank@example.org'}{id});
$forged =~ s/\.(.)/'.' . ($1 eq 'a' ? 'b' : 'a')/e;
($rc, $out) = sample('dsn-postfix-hard.eml', 'frank@example.org', verp => $forged,
	mid => '<someone-else@example.net>');
is($rc, 0, 'forged VERP tag: exit 0');
like($out, qr/left alone: it names no message of ours/, 'forged VERP tag: left alone');
is(sql("SELECT count(*) FROM contacts WHERE email = 'frank\@example.org' AND "
	. "suppressed_at IS NOT NULL"), 0, 'forged VERP tag: frank is not suppressed');
($rc, $out) = sample('dsn-postfix-hard.eml', 'frank@example.org', verp => 'bounces@example.com');
like($out, qr/hard bounce 5\.1\.1: contact \d+ suppressed/,
	'no tag, but our Message-ID in the returned message: the bounce is applied') or diag($out);
($rc, $out) = cli('feedback', {stdin => "From: a\@example.net\nSubject: hi\n\nhello\n"});
is($rc, 0, 'an unrelated mail: exit 0');
like($out, qr/^remarket feedback: left alone: not a delivery status notification/,
	'an unrelated mail: a line saying why');

# ---- POST /rm/feedback through nginx ----
sub post_fb {
	my ($path, $body, %h) = @_;
	return http('POST', "/rm/$path", $body, {'Content-Type' => 'application/json', %h});
}
my $body = $J->encode([{type => 'soft_bounce', email => 'carol@example.org', status => '4.2.2'}]);
my $r = post_fb('feedback', $body, 'X-Remarket-Signature' => sign($body, time, 'wrong'));
is($r->{status}, 401, 'POST /rm/feedback: a forged signature is 401');
$r = post_fb('feedback', $body, 'X-Remarket-Signature' => sign($body));
is($r->{status}, 200, 'POST /rm/feedback: remarket format, signed as /events: 200');
is($r->{content}, '{"applied":0,"left_alone":1}',
	"... left alone: carol's last message has its soft bounce already");
$body = $J->encode({type => 'complaint', email => 'carol@example.org'});
$r = post_fb('feedback', $body, 'X-Remarket-Signature' => sign($body));
is($r->{content}, '{"applied":1,"left_alone":0}', 'POST /rm/feedback: a complaint applied');

my ($ts, $tok) = (time, 'tok-' . int(rand(1e9)));
my $mg = {signature => {timestamp => "$ts", token => $tok,
	signature => hmac_sha256_hex("$ts$tok", 'key-mailgun-test')},
	'event-data' => {event => 'failed', severity => 'permanent',
		recipient => 'nosuch1@bounce.test',
		message => {headers => {'message-id' => substr($msg{'nosuch2@bounce.test'}{mid}, 1, -1)}},
		'delivery-status' => {code => 550}}};
$r = post_fb('feedback/mailgun', $J->encode($mg));
is($r->{status}, 200, 'mailgun: a signed event is 200');
is($r->{content}, $with_postfix ? '{"applied":0,"left_alone":1}' : '{"applied":1,"left_alone":0}',
	'mailgun: applied to the message found by its Message-ID (left alone if '
	. 'Postfix bounced it already)');
$mg->{signature}{signature} =~ tr/0-9a-f/1-9a-f0/;
$r = post_fb('feedback/mailgun', $J->encode($mg));
is($r->{status}, 403, 'mailgun: a forged signature is 403');

my $pm = $J->encode({RecordType => 'Bounce', Type => 'HardBounce', TypeCode => 1,
	Email => 'erin@example.org', Description => 'The server was unable to deliver'});
$r = post_fb('feedback/postmark', $pm);
is($r->{status}, 401, 'postmark: no credentials is 401');
$r = post_fb('feedback/postmark', $pm, Authorization => 'Basic ' . encode_base64('pm:nope', ''));
is($r->{status}, 403, 'postmark: a wrong password is 403');
$r = post_fb('feedback/postmark', $pm, Authorization => 'Basic ' . encode_base64('pm:s3cret', ''));
is($r->{status}, 200, 'postmark: Basic auth right: 200');
is(sql("SELECT suppress_reason FROM contacts WHERE email = 'erin\@example.org'"),
	'bounce HardBounce', 'postmark: a HardBounce suppresses');

# ---- the report ----
($rc, $out) = cli('report', '--json', '--now', '+1d');
my $rep = eval { $J->decode($out) } || {};
my ($s1) = grep { $_->{position} == 1 } @{ $rep->{flows}[0]{steps} || [] };
ok($s1 && $s1->{complaint_rate} > 0.3 && $s1->{complaint_rate} < 0.34,
	'report: step 1 complaint rate 2 of 6') or diag($out);
ok($s1 && $s1->{bounce_rate} > 0, 'report: step 1 bounce rate') or diag($out);
done_testing();
