#!/usr/bin/perl
# 42-sending.t: the sending pipeline against a scriptable relay on loopback
# (tests/lib/smtp_script.py): a relay that refuses us at any stage
# suppresses nobody; a relay refusing the content for several recipients in
# a row pauses the step; kill -9 in the middle of a batch loses nothing and
# doubles nothing; a disk that fills while a message is sent neither loses
# nor repeats it. The clock is moved with --now.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use POSIX ();
use Time::HiRes qw(sleep time);
use lib dirname(abs_path($0)) . '/lib';
use RMRelay;

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin  = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
plan skip_all => 'python3 not installed' unless grep { -x "$_/python3" } split /:/, $ENV{PATH};

my $tmp = tempdir(CLEANUP => 1);
chmod 0755, $tmp;
our $MOUNTED;    # a tmpfs of ours, unmounted whatever happens
END { system('umount', $MOUNTED) if $MOUNTED; }

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }

# A fresh remarket instance: its own database and key, mail to URL.
my $n_inst = 0;
sub instance {
	my ($url, %env) = @_;
	my $d = $env{dir} // "$tmp/i" . ++$n_inst;
	delete $env{dir};
	mkdir $d;
	my $in = { dir => $d, env => {
		REMARKET_DB => "$d/rm.db", REMARKET_KEY_FILE => "$d/rm.key",
		REMARKET_OUTBOX => "$d/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
		# a real relay: a sender, an address and (loopback) links allowed
		REMARKET_FROM => "Maison Test <shop\@example.com>", REMARKET_POSTAL_ADDRESS => "1 Test Street, 75000 Paris",
		REMARKET_ALLOW_INSECURE_LINKS => "yes",
		REMARKET_SMTP_URL => $url, %env } };
	my ($rc, undef, $err) = rm($in, 'init');
	die "init failed: $err" if $rc;
	($rc) = rm($in, 'flows', 'holdout', 'abandoned_cart', '0');
	die "flows holdout failed" if $rc;
	return $in;
}

# Starts the binary; returns (pid, base of its output files).
my $n_run = 0;
sub spawn {
	my ($in, $stdin, $extra, @args) = @_;
	my $base = "$tmp/run" . ++$n_run;
	open my $fh, '>', "$base.in" or die;
	print $fh $stdin // '';
	close $fh;
	my $pid = fork // die;
	if (!$pid) {
		delete @ENV{ grep { /^REMARKET_/ } keys %ENV };
		my %e = (%{ $in->{env} }, %{ $extra || {} });
		$ENV{$_} = $e{$_} for keys %e;
		open STDIN, '<', "$base.in";
		open STDOUT, '>', "$base.out";
		open STDERR, '>', "$base.err";
		{ exec $bin, @args }   # a block: perl knows the exit below is meant
		POSIX::_exit(127);
	}
	return ($pid, $base);
}

# rm($in, [{VAR => value, _stdin => text}], @args)
sub rm {
	my ($in, @args) = @_;
	my %extra = ref $args[0] eq 'HASH' ? %{ shift @args } : ();
	my $stdin = delete $extra{_stdin};
	my ($pid, $base) = spawn($in, $stdin, \%extra, @args);
	waitpid $pid, 0;
	my $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
	return ($rc, slurp("$base.out"), slurp("$base.err"));
}

sub sql {
	my ($in, $q) = @_;
	open my $fh, '-|', 'sqlite3', '-batch', '-cmd', '.timeout 5000', $in->{env}{REMARKET_DB}, $q
	    or die "sqlite3: $!";
	local $/;
	my $o = <$fh> // '';
	close $fh;
	$o =~ s/\A\s+|\s+\z//g;
	return $o;
}

my $T0 = 1795000000;
my $due = $T0 + 3700;    # step 1 is due at +1 h

# N shoppers s1..sN with a cart each at T0, through signed-hook-like CLI events.
sub carts {
	my ($in, $n) = @_;
	my @ev;
	for my $i (1 .. $n) {
		push @ev, qq({"type":"cart","email":"s$i\@example.com","name":"Shopper $i","consent":true,)
		    . qq("cart_id":"c-$i","currency":"EUR","ts":$T0,)
		    . qq("items":[{"sku":"LAMP-1","name":"Rattan lamp","price":39.9,"qty":1}]});
	}
	my ($rc, $out, $err) = rm($in, { _stdin => '[' . join(',', @ev) . ']' }, 'event', '--now', $T0);
	die "event load failed: $err" if $rc;
}

sub field { my ($json, $k) = @_; $json =~ /"$k":(\d+)/ ? $1 : -1 }

my $suppressed = "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL";

# ---- the relay refuses us before RCPT: nobody is suppressed -----------------
for my $case (['greeting', '554', 'a blocklisted IP: 554 at the greeting'],
	      ['ehlo', '550', 'EHLO refused'],
	      ['auth', '535', 'the login refused', smtp_user => 'shop', smtp_password => 'wrong'],
	      ['mail', '553', 'the sender refused (MAIL FROM)'],
	      ['data', '554', 'the DATA command refused']) {
	my ($stage, $code, $what, %auth) = @$case;
	my $relay = RMRelay->start(dir => "$tmp/relay-$stage", fail => ["$stage=$code"]);
	my %env = map { ('REMARKET_' . uc $_ => $auth{$_}) } keys %auth;
	my $in = instance($relay->url, %env);
	carts($in, 3);
	my ($rc, $out, $err) = rm($in, 'tick', '--now', $due);
	is($rc, 1, "$what: the tick exits 1 (it could not send)");
	like($out, qr/"problems":\[".*the relay refuses us/, "$what: the tick's problems say why")
	    or diag $out;
	like($err, qr/the relay refuses us/, "$what: the log says the relay refuses us")
	    or diag $err;
	is(sql($in, $suppressed), 0, "$what: nobody is suppressed");
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 3,
	    "$what: all three wait, no attempt counted") or diag sql($in, "SELECT * FROM messages");
	like($out, qr/"stopped":".*the relay refuses us/, "$what: the tick's JSON says why it stopped")
	    or diag $out;
	is(sql($in, "SELECT count(*) FROM enrollments WHERE status = 'active'"), 3,
	    "$what: every sequence goes on");
	$relay->stop;
}

# ---- the relay unavailable (review M4): no attempt counted, the tick stops ---------
# connection refused or a 4xx at the greeting: the messages wait with no
# attempt counted; after a 26 h outage nothing failed, nothing is lost, and
# nothing bursts (the step 26 h late is stale, the next one goes on time).
for my $case (['refused', 'the connection refused'], ['greeting', 'a 421 at the greeting']) {
	my ($kind, $what) = @$case;
	my $down = $kind eq 'greeting' ? RMRelay->start(dir => "$tmp/relay-down-$kind",
							 fail => ['greeting=421']) : undef;
	my $down_url = $down ? $down->url : 'smtp://127.0.0.1:1';
	my $in = instance($down_url);
	carts($in, 5);
	my ($out, $stale);
	my @stops;
	# step 1 is due at 1 h; from 12.5 h on (half the gap to step 2) it is
	# stale, recorded without an attempt; step 2 is due at 24 h
	for my $h (0, 1, 2, 3, 4, 6, 9, 14, 20, 26) {
		(undef, $out) = rm($in, 'tick', '--now', $due + $h * 3600);
		push @stops, $out =~ /"stopped":".*?relay is unavailable/ ? 1 : 0;
		$stale += field($out, 'stale');
	}
	is("@stops", '1 1 1 1 1 1 1 0 0 1', "$what: every tick of a 26 h outage with a message due "
	   . "stops at its first, saying the relay is unavailable") or diag $out;
	is($stale, 5, "$what: step 1, 12.5 h late, is stale for all five, not sent in a burst later");
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0 AND step = 2"), 5,
	    "$what: after 26 h step 2 waits for all five, no attempt counted")
	    or diag sql($in, "SELECT id, status, attempts, error FROM messages");
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'failed' OR attempts > 0"), 0,
	   "$what: none failed, no attempt counted");
	$down->stop if $down;
	my $up = RMRelay->start(dir => "$tmp/relay-up-$kind");
	my $now = $due + 27 * 3600;    # the relay back an hour later
	($_, $out) = rm($in, { REMARKET_SMTP_URL => $up->url }, 'tick', '--now', $now);
	is(field($out, 'sent') . '/' . field($out, 'failed'), '5/0',
	    "$what: the relay back: step 2 sent to all five, none failed") or diag $out;
	my %per;
	$per{$_}++ for map { /^To:.*?([\w.]+\@example\.com)/mi ? $1 : () } $up->messages;
	is(join(',', map { $per{$_} } sort keys %per), '1,1,1,1,1', "$what: nothing burst: one mail each");
	(undef, $out) = rm($in, { REMARKET_SMTP_URL => $up->url }, 'tick', '--now', $T0 + 72 * 3600 + 60);
	is(field($out, 'sent'), 5, "$what: step 3 goes on time: nothing lost") or diag $out;
	is(sql($in, "SELECT count(*) FROM enrollments WHERE status = 'done'"), 5, "$what: every sequence is done");
	$up->stop;
}

# ---- a message given up ends its sequence (review M4) ------------------------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-450", fail => ['rcpt=450 4.2.0 try later'],
				   fail_for => '^s1@');
	my $in = instance($relay->url);
	carts($in, 2);
	my $now = $due;
	for my $k (1 .. 8) {    # 8 attempts of a 4xx at RCPT, each after its backoff
		rm($in, 'tick', '--now', $now);
		$now += (300 << ($k - 1)) + 1;
	}
	is(sql($in, "SELECT status || ' ' || attempts FROM messages WHERE contact_id = 1"), 'failed 8',
	    'a 4xx at RCPT 8 times: given up after 8 attempts') or diag sql($in, "SELECT * FROM messages");
	is(sql($in, "SELECT status || ' ' || exit_reason FROM enrollments WHERE contact_id = 1"), 'exited failed',
	    '... and its sequence ends, reason failed');
	is(sql($in, "SELECT status FROM enrollments WHERE contact_id = 2"), 'active', '... the other goes on');
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	$relay->stop;
}

# ---- RCPT 5xx: that recipient only ----------------------------------------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-rcpt", fail => ['rcpt=550 5.1.1 user unknown'],
				   fail_for => '^s2@');
	my $in = instance($relay->url);
	carts($in, 3);
	my (undef, $out) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 2, 'RCPT 550 for one recipient: the others are sent') or diag $out;
	is(field($out, 'failed'), 1, '... that one failed');
	is(sql($in, "SELECT group_concat(email) FROM contacts WHERE suppressed_at IS NOT NULL"),
	    's2@example.com', '... and only that address is suppressed');
	$relay->stop;
}

# ---- RCPT 5xx by its enhanced status code (review H4) -----------------------------
# 5.7.x, 5.3.x, 5.5.x are about us (a blocked client, relay denied, the sender
# not authorised): nobody is suppressed and the tick stops; 5.1.x and 5.2.x are
# about the recipient; no enhanced code: 3 different recipients refused in a row
# with no acceptance in between are about us.
for my $case (['554 5.7.1 Client host [127.0.0.1] blocked', 'a blocked client (5.7.1)'],
	      ['554 5.7.1 <{rcpt}>: Relay access denied', 'relay access denied (5.7.1)'],
	      ['550 5.3.0 system not accepting mail', 'a system refusal (5.3.0)'],
	      ['553 5.5.1 sender address rejected', 'a protocol refusal (5.5.1)'],
	      ['550 recipient rejected', 'no enhanced code, for everyone']) {
	my ($line, $what) = @$case;
	my $relay = RMRelay->start(dir => "$tmp/relay-rcpt-us", fail => ["rcpt=$line"]);
	my $in = instance($relay->url);
	carts($in, 5);
	my ($rc, $out, $err) = rm($in, 'tick', '--now', $due);
	is($rc, 1, "RCPT $what: the tick exits 1 (it could not send)");
	is(sql($in, $suppressed), 0, "RCPT $what: nobody is suppressed") or diag $out;
	is(field($out, 'failed'), 0, "RCPT $what: nothing failed") or diag $out;
	like($out, qr/"stopped":".*the relay refuses us/, "RCPT $what: the tick stops and says why")
	    or diag $out;
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 5,
	    "RCPT $what: all five wait, no attempt counted") or diag sql($in, "SELECT * FROM messages");
	is(sql($in, "SELECT count(*) FROM enrollments WHERE status = 'active'"), 5,
	    "RCPT $what: every sequence goes on");
	$relay->stop;
	system('rm', '-rf', "$tmp/relay-rcpt-us");
}
for my $case (['550 5.1.1 user unknown', 'user unknown (5.1.1)'],
	      ['552 5.2.2 mailbox full', 'mailbox full (5.2.2)'],
	      ['550 no such user', 'no enhanced code, one recipient']) {
	my ($line, $what) = @$case;
	my $relay = RMRelay->start(dir => "$tmp/relay-rcpt-them", fail => ["rcpt=$line"],
				   fail_for => '^s2@');
	my $in = instance($relay->url);
	carts($in, 3);
	my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 2, "RCPT $what for one recipient: the others are sent") or diag "$out $err";
	is(field($out, 'failed'), 1, "RCPT $what: that one failed");
	is(sql($in, "SELECT group_concat(email) FROM contacts WHERE suppressed_at IS NOT NULL"),
	    's2@example.com', "RCPT $what: only that address is suppressed");
	$relay->stop;
	system('rm', '-rf', "$tmp/relay-rcpt-them");
}

# ---- the relay's reply names the address: not in the log unless log_pii = yes (L1) ---
for my $pii ('', 'yes') {
	my $what = $pii ? 'log_pii=yes' : 'log_pii unset';
	for my $case (['rcpt=550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown', '^s2@', '5.1.1'],
		      ['rcpt=554 5.7.1 <{rcpt}>: Relay access denied', undef, '5.7.1']) {
		my ($fail, $for, $code) = @$case;
		my $relay = RMRelay->start(dir => "$tmp/relay-pii", fail => [$fail],
					   defined $for ? (fail_for => $for) : ());
		my $in = instance($relay->url, $pii ? (REMARKET_LOG_PII => 'yes') : ());
		carts($in, 3);
		my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
		my $stored = join("\n", sql($in, "SELECT coalesce(error, '') FROM messages"),
				  sql($in, "SELECT coalesce(suppress_reason, '') FROM contacts"),
				  sql($in, "SELECT coalesce(summary, '') FROM ticks"));
		like($err . $stored, qr/\Q$code\E/, "$what, RCPT $code naming the address: the reply is kept")
		    or diag "$out\n$err\n$stored";
		if ($pii) {
			like($err, qr/s\d\@example\.com/, "$what, RCPT $code: the log names the address");
		} else {
			unlike($err . $out, qr/\@example\.com/,
			       "$what, RCPT $code: neither the log nor the tick's JSON names an address")
			    or diag "$out\n$err";
			unlike($stored, qr/\@example\.com/,
			       "$what, RCPT $code: nor messages.error, the suppression or the ticks table")
			    or diag $stored;
			like($err . $stored, qr/<recipient>/, "$what, RCPT $code: <recipient> in its place");
		}
		$relay->stop;
		system('rm', '-rf', "$tmp/relay-pii");
	}
}

# ---- 5xx at the end of DATA for one recipient: that recipient ---------------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-eod1", fail => ['eod=550'], fail_for => '^s2@');
	my $in = instance($relay->url);
	carts($in, 3);
	my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 2, 'end of DATA 550 for one recipient: the others are sent') or diag "$out\n$err";
	is(field($out, 'failed'), 1, '... that one failed, once the same content went to another');
	is(sql($in, "SELECT group_concat(email) FROM contacts WHERE suppressed_at IS NOT NULL"),
	    's2@example.com', '... only that address is suppressed');
	is(sql($in, "SELECT count(*) FROM steps WHERE paused_at IS NOT NULL"), 0, '... no step is paused');
	$relay->stop;
}

# ---- 5xx at the end of DATA, the last of the tick: undecided, retried ---------------
# (one connection: "the last" is the last sent; on several, see 43-parallel.t)
{
	my $relay = RMRelay->start(dir => "$tmp/relay-eod-last", fail => ['eod=554'], fail_for => '^s3@');
	my $in = instance($relay->url, REMARKET_SMTP_CONNECTIONS => 1);
	carts($in, 3);
	my (undef, $out) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 2, 'end of DATA 554 for the last message: the others are sent') or diag $out;
	is(field($out, 'retry'), 1, '... it is retried later (nothing after it told whose fault it was)');
	is(sql($in, $suppressed), 0, '... and nobody is suppressed');
	$relay->stop;
}

# ---- 5xx at the end of DATA for everyone: the step pauses, nobody suppressed ----------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-eod", fail => ['eod=554']);
	my $in = instance($relay->url);
	carts($in, 6);
	my ($rc, $out, $err) = rm($in, 'tick', '--now', $due);
	is($rc, 1, 'content refused for everyone: the tick exits 1 (a step paused)');
	is(field($out, 'sent') + field($out, 'failed'), 0, '... nothing sent, nothing failed') or diag $out;
	like($out, qr/"stopped":"abandoned_cart step 1 paused: the relay refused its content for 3 different recipients/,
	    '... the tick stopped after three recipients in a row and says so') or diag $out;
	like($err, qr/remarket flows resume abandoned_cart 1/, '... the log says how to resume');
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 6,
	    '... all six wait, no attempt counted') or diag sql($in, "SELECT * FROM messages");
	is(scalar(grep { /dropped/ } $relay->log_lines), 0, '... (the relay dropped nothing)');
	my (undef, $flows) = rm($in, 'flows');
	like($flows, qr/^PAUSED abandoned_cart step 1 since \d+: /m, '`remarket flows` shows the paused step');
	$relay->stop;
	my $good = RMRelay->start(dir => "$tmp/relay-eod-fixed");
	(undef, $out) = rm($in, { REMARKET_SMTP_URL => $good->url }, 'tick', '--now', $due + 60);
	is(field($out, 'sent'), 0, 'a paused step sends nothing, even to a good relay') or diag $out;
	my ($rc2, undef, $e2) = rm($in, 'flows', 'resume', 'abandoned_cart', '1');
	is($rc2, 0, '`remarket flows resume abandoned_cart 1` resumes it') or diag $e2;
	(undef, $out) = rm($in, { REMARKET_SMTP_URL => $good->url }, 'tick', '--now', $due + 120);
	is(field($out, 'sent'), 6, '... and the next tick sends all six') or diag $out;
	is(scalar($good->messages), 6, '... each once');
	$good->stop;
}

# ---- kill -9 in the middle of batches against a slow relay -----------------------
{
	my $N = 120;
	my $KILLS = 40;
	my $relay = RMRelay->start(dir => "$tmp/relay-slow", delay => ['eod=0.15']);
	my $in = instance($relay->url);
	carts($in, $N);
	srand(8);
	my $killed = 0;
	my $now = $due;
	for my $k (1 .. $KILLS) {
		my $before = grep { /^wait/ } $relay->log_lines;
		my $after = 1 + int(rand(3));    # kill while the relay holds the 1st..3rd message
		my ($pid) = spawn($in, undef, {}, 'tick', '--now', $now);
		my $end = time + 20;
		while (time < $end) {
			last if (grep { /^wait/ } $relay->log_lines) >= $before + $after;
			last if waitpid($pid, POSIX::WNOHANG()) == $pid;
			sleep 0.005;
		}
		$killed += kill 'KILL', $pid;
		waitpid $pid, 0;
		$now += 301;    # past the lease of the killed tick
	}
	is($killed, $KILLS, "$KILLS ticks killed with SIGKILL while the relay held a message");
	my $out = '';
	for (1 .. 5) {
		(undef, $out) = rm($in, 'tick', '--now', $now);
		$now += 301;
		last if sql($in, "SELECT count(*) FROM messages WHERE status IN ('queued','sending')") == 0;
	}
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sent'"), $N, "then all $N are sent: 0 lost")
	    or diag sql($in, "SELECT status, attempts, crashes, error FROM messages WHERE status <> 'sent'");
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'failed'"), 0, '... none given up');
	my @ids = $relay->message_ids;
	my %n;
	$n{$_}++ for @ids;
	is(scalar keys %n, $N, "the relay accepted $N distinct messages");
	is(scalar @ids, $N, '... each exactly once: 0 doubled');
	my $dropped = grep { /dropped/ } $relay->log_lines;
	cmp_ok($dropped, '>=', $KILLS, "... (the relay dropped $dropped transactions cut by the kills)");
	$relay->stop;
}


# ---- a lease runs from when it is taken, not from the tick's start (review L3) -----
# Confirmation mails to a slow relay take the tick's first seconds; the
# batch claimed after them is leased for lease_seconds from then (the tick
# is killed right after the claim, so the leases stay as written).
{
	my $relay = RMRelay->start(dir => "$tmp/relay-lease", delay => ['eod=1']);
	my $in = instance($relay->url, REMARKET_BROWSER_CONSENT => 'confirm');
	carts($in, 2);
	for my $i (1 .. 3) {
		my $body = qq({"type":"identify","email":"cf$i\@example.org","consent":true});
		my ($rc, $out) = rm($in, { GATEWAY_INTERFACE => 'CGI/1.1', REQUEST_METHOD => 'POST',
			PATH_INFO => '/collect', CONTENT_LENGTH => length $body,
			CONTENT_TYPE => 'application/json', REMOTE_ADDR => '10.0.0.1',
			HTTP_COOKIE => "rm_vid=vLEASE000$i", REMARKET_NOW => $T0, _stdin => $body });
		die "collect: $out" unless $out =~ /^Status: 204/m;
	}
	my $t = time;
	my ($rc) = rm($in, { REMARKET_FAULT => 'crash_after_claim' }, 'tick', '--now', $due);
	my $spent = int(time - $t);
	is($rc, 70, 'lease: the tick dies right after its claim, after 3 confirmation mails');
	cmp_ok($spent, '>=', 3, "... which took $spent s");
	my $until = sql($in, "SELECT min(lease_until) FROM messages WHERE status = 'sending'");
	cmp_ok($until, '>=', $due + 2 + 300,
	       "lease: the claim after 2+ s of the tick is leased 300 s from then, not from its start")
	    or diag sql($in, "SELECT id, status, lease_until FROM messages");
	$relay->stop;
}

# ---- a message that kills the tick every time: given up, alone ------------------
# (one connection: the others claimed with it are never prepared; on several,
# see 43-parallel.t)
{
	my $relay = RMRelay->start(dir => "$tmp/relay-poison");
	my $in = instance($relay->url, REMARKET_SMTP_CONNECTIONS => 1);
	carts($in, 3);
	my $now = $due;
	my @rc;
	for (1 .. 5) {    # CRASH_MAX deaths while preparing message 1
		my ($rc) = rm($in, { REMARKET_FAULT => 'crash_while_preparing' }, 'tick', '--now', $now);
		push @rc, $rc;
		$now += 301;
	}
	is("@rc", '70 70 70 70 70', 'poison: five ticks die while preparing the same message');
	is(sql($in, "SELECT crashes FROM messages WHERE id = 1"), 5, '... its deaths are counted');
	is(sql($in, "SELECT sum(crashes) + sum(attempts) FROM messages WHERE id > 1"), 0,
	    '... and nothing is counted for the messages claimed with it');
	my (undef, $out) = rm($in, 'tick', '--now', $now);
	is(field($out, 'sent'), 2, '... the next tick gives it up and sends the other two') or diag $out;
	like(sql($in, "SELECT status || ': ' || error FROM messages WHERE id = 1"),
	    qr/^failed: given up: the tick died 5 times while preparing it/, '... saying why');
	is(sql($in, "SELECT status || ' ' || exit_reason FROM enrollments WHERE id = "
		. "(SELECT enrollment_id FROM messages WHERE id = 1)"), 'exited failed',
	    '... and its sequence ends, reason failed (review M4)');
	$relay->stop;
}

# ---- a hook cart dated 10 days back: stale, not a burst of three mails ------------
{
	my $in = instance('');
	my $now = $T0 + 30 * 86400;
	my $ev = qq({"type":"cart","email":"old\@example.com","consent":true,"cart_id":"old-1",)
	    . qq("ts":@{[$now - 10 * 86400]},"items":[{"sku":"LAMP-1","name":"Rattan lamp","price":39.9}]});
	my ($rc, undef, $err) = rm($in, { _stdin => $ev }, 'event', '--now', $now);
	is($rc, 0, 'stale: a cart dated 10 days back is recorded') or diag $err;
	my ($sent, $stale) = (0, 0);
	for my $k (0 .. 2) {
		my (undef, $out) = rm($in, 'tick', '--now', $now + 60 * $k);
		$sent += field($out, 'sent');
		$stale += field($out, 'stale') if field($out, 'stale') > 0;
	}
	is($sent, 0, 'stale: three one-minute ticks send none of its three steps');
	is($stale, 3, '... the ticks count 3 stale steps');
	is(scalar(() = glob("$in->{dir}/outbox/*.eml")), 0, '... the outbox is empty');
	my (undef, $rep) = rm($in, 'report', '--json', '--now', $now + 3600);
	like($rep, qr/"stale_steps":3\b/, '... and the report counts them');
}

# ---- the disk fills while a message is sent: nothing lost, nothing doubled ----------
SKIP: {
	skip 'mounting a small tmpfs needs root', 5 unless $> == 0;
	my $mnt = "$tmp/disk";
	mkdir $mnt;
	skip 'cannot mount a tmpfs here', 5
	    unless system('mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', $mnt) == 0;
	$MOUNTED = $mnt;
	# the relay fills the file system under remarket's database while it
	# holds the first message, then answers 250
	my $relay = RMRelay->start(dir => "$tmp/relay-full", fill => "$mnt/filler");
	my $in = instance($relay->url, dir => "$mnt/db");
	carts($in, 3);
	my @out;
	for my $k (0 .. 4) {
		unlink "$mnt/filler" if $k == 4;    # room again for the last tick
		my ($rc, $out, $err) = rm($in, 'tick', '--now', $due + 301 * $k);
		push @out, "tick $k: rc $rc $out $err";
	}
	my @ids = $relay->message_ids;
	my %n;
	$n{$_}++ for @ids;
	is(scalar keys %n, 3, 'disk full: the relay got all three messages') or diag @out;
	is(scalar @ids, 3, '... each once: none sent again by a later tick') or diag @out;
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sent'"), 3, '... all three recorded sent');
	is(sql($in, "SELECT sum(attempts) FROM messages"), 3, '... one attempt each');
	ok(-e "$mnt/db/rm.db", '... (the database lived on the full file system)');
	$relay->stop;
	system('umount', $MOUNTED) == 0 and undef $MOUNTED;
}

done_testing();
