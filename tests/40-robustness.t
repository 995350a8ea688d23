#!/usr/bin/perl
# Robustness of sending, with the real binary and real smtp-sink servers on
# loopback: two ticks at once, a crash in the middle of a tick (before and
# after the SMTP server took the message), a soft (4xx) and a hard (5xx)
# SMTP answer. The clock is moved with --now; nothing sleeps for time.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(sleep);
use lib dirname(abs_path($0)) . '/lib';
use RMRelay;

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin  = $ENV{REMARKET_BIN} || "$root/remarket";
my $sink_bin = '/usr/sbin/smtp-sink';
plan skip_all => "smtp-sink not installed (apt-get install postfix)" unless -x $sink_bin;
BAIL_OUT("$bin not built: run make check") unless -x $bin;

my $tmp = tempdir(CLEANUP => 1);
chmod 0755, $tmp;
my @sinks;
END { kill 'TERM', @sinks if @sinks; }

sub free_port {
	my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0)
	    or die "no free port: $!";
	my $p = $s->sockport;
	close $s;
	return $p;
}

# Starts smtp-sink dumping each message to a file in $dir; returns its port.
sub start_sink {
	my ($dir, @flags) = @_;
	mkdir $dir;
	chmod 0777, $dir;
	my $port = free_port();
	my $pid = fork // die "fork: $!";
	if (!$pid) {
		open STDOUT, '>', '/dev/null';
		exec $sink_bin, @flags, '-u', 'nobody', '-d', "$dir/m.", "127.0.0.1:$port", '64';
		exit 127;
	}
	push @sinks, $pid;
	for (1 .. 100) {
		my $c = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port");
		return $port if $c;
		sleep 0.05;
	}
	die "smtp-sink did not start on $port";
}

sub sink_messages {
	my ($dir) = @_;
	my @m;
	for my $f (sort glob("$dir/m.*")) {
		open my $fh, '<', $f or next;
		local $/;
		push @m, scalar <$fh>;
	}
	return @m;
}

sub message_ids { map { /^Message-ID:\s*(\S+)/mi ? $1 : () } @_ }

# A fresh remarket instance: its own database, key and outbox.
my $n_inst = 0;
sub instance {
	my (%o) = @_;
	my $d = "$tmp/i" . ++$n_inst;
	mkdir $d;
	my $env = {
		REMARKET_DB => "$d/rm.db", REMARKET_KEY_FILE => "$d/rm.key",
		REMARKET_OUTBOX => "$d/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
		# a real relay: a sender, an address and (loopback) links allowed
		REMARKET_FROM => "Maison Test <shop\@example.com>", REMARKET_POSTAL_ADDRESS => "1 Test Street, 75000 Paris",
		REMARKET_ALLOW_INSECURE_LINKS => "yes",
		REMARKET_SMTP_URL => $o{smtp} // '', REMARKET_FAULT => '',
	};
	my ($rc) = rm($env, undef, 'init');
	die "init failed" if $rc;
	# every enrollee must be messaged here: no 10 % holdout
	($rc) = rm($env, undef, 'flows', 'holdout', 'abandoned_cart', '0');
	die "flows holdout failed" if $rc;
	return { env => $env, dir => $d };
}

# Runs the binary; returns (exit code, stdout, stderr).
my $n_run = 0;
sub rm {
	my ($env, $stdin, @args) = @_;
	my $base = "$tmp/run" . ++$n_run;
	if (defined $stdin) {
		open my $fh, '>', "$base.in" or die;
		print $fh $stdin;
		close $fh;
	}
	my $pid = fork // die;
	if (!$pid) {
		$ENV{$_} = $env->{$_} for keys %$env;
		delete $ENV{$_} for grep { $env->{$_} eq '' && $_ eq 'REMARKET_FAULT' } keys %$env;
		open STDIN, '<', defined $stdin ? "$base.in" : '/dev/null';
		open STDOUT, '>', "$base.out";
		open STDERR, '>', "$base.err";
		exec $bin, @args;
		exit 127;
	}
	waitpid $pid, 0;
	my $rc = $? >> 8;
	return ($rc, slurp("$base.out"), slurp("$base.err"));
}

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }

sub sql {
	my ($inst, $q) = @_;
	my $out = `sqlite3 '$inst->{env}{REMARKET_DB}' "$q"`;
	chomp $out;
	return $out;
}

sub carts {
	my ($inst, $n, $t0) = @_;
	my @ev;
	for my $i (1 .. $n) {
		push @ev, qq({"type":"identify","email":"s$i\@example.com","name":"Shopper $i","consent":true,"ts":$t0});
		push @ev, qq({"type":"cart","email":"s$i\@example.com","cart_id":"c-$i","currency":"EUR","ts":$t0,)
		    . qq("items":[{"sku":"LAMP-1","name":"Rattan lamp","price":39.9,"qty":1,"url":"https://shop.example/p/lamp"}]});
	}
	my ($rc, $out, $err) = rm($inst->{env}, '[' . join(',', @ev) . ']', 'event', '--now', $t0);
	die "event load failed: $err" if $rc;
}

sub field { my ($json, $k) = @_; $json =~ /"$k":(\d+)/ ? $1 : -1 }

my $T0 = 1795000000;
my $due = $T0 + 3700;    # step 1 is due at +1 h

# ---- two ticks at once -----------------------------------------------
{
	my $sd = "$tmp/sink-race";
	my $port = start_sink($sd);
	my $in = instance(smtp => "smtp://127.0.0.1:$port");
	my $N = 120;
	carts($in, $N, $T0);
	my @pids;
	for my $k (1, 2) {
		my $pid = fork // die;
		if (!$pid) {
			$ENV{$_} = $in->{env}{$_} for keys %{ $in->{env} };
			delete $ENV{REMARKET_FAULT};
			open STDOUT, '>', "$tmp/race$k.out";
			open STDERR, '>', "$tmp/race$k.err";
			exec $bin, 'tick', '--now', $due;
			exit 127;
		}
		push @pids, $pid;
	}
	my $ok = 1;
	for (@pids) { waitpid $_, 0; $ok &&= ($? == 0) }
	ok($ok, 'two overlapping ticks both exit 0');
	my ($a, $b) = (slurp("$tmp/race1.out"), slurp("$tmp/race2.out"));
	is(field($a, 'sent') + field($b, 'sent'), $N, "the two ticks sent $N messages between them")
	    or diag("tick 1: $a\ntick 2: $b");
	my @m = sink_messages($sd);
	is(scalar @m, $N, "smtp-sink received exactly $N messages");
	my %ids = map { $_ => 1 } message_ids(@m);
	is(scalar keys %ids, $N, 'all Message-IDs are distinct: nothing sent twice');
	is(sql($in, "SELECT count(*) FROM messages WHERE status='sent'"), $N, "$N message rows are 'sent'");
}

# ---- a crash after claiming, before sending -----------------------------
{
	my $sd = "$tmp/sink-crash1";
	my $port = start_sink($sd);
	my $in = instance(smtp => "smtp://127.0.0.1:$port");
	carts($in, 5, $T0);
	my ($rc) = rm({ %{ $in->{env} }, REMARKET_FAULT => 'crash_after_claim' }, undef, 'tick', '--now', $due);
	is($rc, 70, 'the tick crashed (fault injected after the claim)');
	is(sql($in, "SELECT count(*) FROM messages WHERE status='sending'"), 5, 'five messages are left claimed');
	my (undef, $out) = rm($in->{env}, undef, 'tick', '--now', $due + 10);
	is(field($out, 'sent'), 0, 'a tick within the lease does not take them') or diag $out;
	(undef, $out) = rm($in->{env}, undef, 'tick', '--now', $due + 301);
	is(field($out, 'sent'), 5, 'after the lease expires the next tick sends them') or diag $out;
	is(scalar(sink_messages($sd)), 5, 'smtp-sink holds each message once: none lost, none doubled');
}

# ---- a crash after the outbox write, before recording --------------------
{
	my $in = instance();
	carts($in, 3, $T0);
	my ($rc) = rm({ %{ $in->{env} }, REMARKET_FAULT => 'crash_after_send' }, undef, 'tick', '--now', $due);
	is($rc, 70, 'the tick crashed after writing the first message');
	my @files = glob("$in->{env}{REMARKET_OUTBOX}/*.eml");
	is(scalar @files, 1, 'one message in the outbox at the crash');
	my (undef, $out) = rm($in->{env}, undef, 'tick', '--now', $due + 301);
	is(field($out, 'sent'), 3, 'the next tick after the lease sends all three') or diag $out;
	@files = glob("$in->{env}{REMARKET_OUTBOX}/*.eml");
	is(scalar @files, 3, 'the outbox holds three messages, not four: the retry replaced the file');
	my %to = map { (slurp($_) =~ /^To:.*?<?([^\s<>]+\@[^\s<>]+)>?\r?$/m)[0] => 1 } @files;
	is(scalar keys %to, 3, 'one message per shopper');
}

# ---- a crash after SMTP accepted, before recording ------------------------
# (one connection: one message in flight; on several, each one in flight
# at the crash is repeated the same way)
{
	my $sd = "$tmp/sink-crash2";
	my $port = start_sink($sd);
	my $in = instance(smtp => "smtp://127.0.0.1:$port");
	$in->{env}{REMARKET_SMTP_CONNECTIONS} = 1;
	carts($in, 3, $T0);
	my ($rc) = rm({ %{ $in->{env} }, REMARKET_FAULT => 'crash_after_send' }, undef, 'tick', '--now', $due);
	is($rc, 70, 'the tick crashed after the SMTP server accepted a message');
	my (undef, $out) = rm($in->{env}, undef, 'tick', '--now', $due + 301);
	is(field($out, 'sent'), 3, 'the retry sends the three claimed messages');
	my @m = sink_messages($sd);
	my @ids = message_ids(@m);
	my %n;
	$n{$_}++ for @ids;
	is(scalar keys %n, 3, 'three distinct messages reached the server');
	is(scalar(grep { $n{$_} == 2 } keys %n), 1,
	    'the one in flight at the crash was repeated with the same Message-ID (receivers dedupe on it)');
}

# ---- a soft (4xx) answer: retried with backoff, then sent once ---------------
{
	my $soft = start_sink("$tmp/sink-soft", '-r', 'RCPT');
	my $sd = "$tmp/sink-ok";
	my $good = start_sink($sd);
	my $in = instance(smtp => "smtp://127.0.0.1:$soft");
	carts($in, 2, $T0);
	my ($rc, $out, $err) = rm($in->{env}, undef, 'tick', '--now', $due);
	is($rc, 0, 'a tick meeting 4xx answers still exits 0');
	is(field($out, 'retry'), 2, 'both messages are queued for a retry') or diag $out;
	like($err, qr/smtp_url smtp:\/\/127\.0\.0\.1:$soft/, 'the log names the relay');
	is(sql($in, "SELECT count(*) FROM messages WHERE status='queued' AND next_try > $due"), 2,
	    'they wait for the backoff');
	my $env = { %{ $in->{env} }, REMARKET_SMTP_URL => "smtp://127.0.0.1:$good" };
	(undef, $out) = rm($env, undef, 'tick', '--now', $due + 60);
	is(field($out, 'sent'), 0, 'not before the backoff');
	(undef, $out) = rm($env, undef, 'tick', '--now', $due + 301);
	is(field($out, 'sent'), 2, 'sent once the backoff has passed') or diag $out;
	is(scalar(sink_messages($sd)), 2, 'each message arrived once');
}

# ---- a hard (5xx) answer: failed, suppressed, sequence ended -----------------
# (smtp_script.py answering 550 5.1.1 user unknown: smtp-sink's "500 5.3.0"
# to RCPT is a refusal of us, since review H4, tested below)
{
	my $hard = RMRelay->start(dir => "$tmp/relay-hard", fail => ['rcpt=550 5.1.1 user unknown']);
	my $in = instance(smtp => $hard->url);
	carts($in, 1, $T0);
	my (undef, $out) = rm($in->{env}, undef, 'tick', '--now', $due);
	is(field($out, 'failed'), 1, 'a 5xx marks the message failed') or diag $out;
	is(sql($in, "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL"), 1, 'the address is suppressed');
	is(sql($in, "SELECT exit_reason FROM enrollments"), 'bounce', 'the sequence ended with reason bounce');
	(undef, $out) = rm($in->{env}, undef, 'tick', '--now', $T0 + 86400 + 100);
	is(field($out, 'sent') + field($out, 'retry') + field($out, 'failed'), 0, 'nothing is tried again at +24 h')
	    or diag $out;
	$hard->stop;
}

# ---- smtp-sink's 500 5.3.0 to RCPT: the relay refuses us, nobody is suppressed --
{
	my $sys = start_sink("$tmp/sink-hard", '-f', 'RCPT');
	my $in = instance(smtp => "smtp://127.0.0.1:$sys");
	carts($in, 1, $T0);
	my ($rc, $out, $err) = rm($in->{env}, undef, 'tick', '--now', $due);
	is(field($out, 'failed'), 0, 'a 5.3.0 to RCPT fails nothing (review H4)') or diag $out;
	is(sql($in, "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL"), 0, '... suppresses nobody');
	like($err, qr/the relay refuses us/, '... and says the relay refuses us') or diag $err;
}

# ---- the relay refuses us (5xx to MAIL FROM): nobody is suppressed ----------
{
	my $bad = start_sink("$tmp/sink-sender", '-f', 'MAIL');
	my $in = instance(smtp => "smtp://127.0.0.1:$bad");
	carts($in, 3, $T0);
	my ($rc, $out, $err) = rm($in->{env}, undef, 'tick', '--now', $due);
	is($rc, 1, 'a tick whose relay refuses the sender exits 1 (it could not send)');
	like($out, qr/"problems":\[".*the relay refuses us/, '... its JSON lists the problem') or diag $out;
	like($err, qr/the relay refuses us: check smtp_user, smtp_password, from/, 'and says what to check');
	is(field($out, 'failed'), 0, 'nothing is marked failed') or diag $out;
	is(sql($in, "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL"), 0,
	    'no address is suppressed for a fault of ours');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 3,
	    'all three wait, no attempt counted, none left claimed');
	my $sd = "$tmp/sink-fixed";
	my $good = start_sink($sd);
	(undef, $out) = rm({ %{ $in->{env} }, REMARKET_SMTP_URL => "smtp://127.0.0.1:$good" }, undef,
	    'tick', '--now', $due + 901);
	is(field($out, 'sent'), 3, 'once the relay is fixed, all three go') or diag $out;
}

# ---- a tick slower than its lease keeps it: the next tick sends nothing twice --
{
	my $sd = "$tmp/sink-slow";
	my $port = start_sink($sd, '-w', '1');    # one second before each DATA answer
	my $in = instance(smtp => "smtp://127.0.0.1:$port");
	carts($in, 6, $T0);
	my %env = (%{ $in->{env} }, REMARKET_LEASE_SECONDS => 3);
	my $pid = fork // die;
	if (!$pid) {
		$ENV{$_} = $env{$_} for keys %env;
		delete $ENV{REMARKET_FAULT};
		open STDOUT, '>', "$tmp/slow-a.out";
		open STDERR, '>', "$tmp/slow-a.err";
		exec $bin, 'tick', '--now', $due;
		exit 127;
	}
	sleep 2.5;    # tick A is halfway; its first lease (due + 3) ran out for B
	my (undef, $out) = rm(\%env, undef, 'tick', '--now', $due + 4);
	waitpid $pid, 0;
	my $a = slurp("$tmp/slow-a.out");
	is(field($a, 'sent') + field($out, 'sent'), 6, 'six messages sent between the two ticks')
	    or diag("A: $a\nB: $out");
	my @m = sink_messages($sd);
	my %ids = map { $_ => 1 } message_ids(@m);
	is(scalar @m, 6, 'the relay received six messages: the slow tick renewed its lease');
	is(scalar keys %ids, 6, 'six distinct Message-IDs');
}

done_testing();
