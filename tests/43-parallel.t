#!/usr/bin/perl
# 43-parallel.t: sending on several SMTP connections at once
# (smtp_connections), against the scriptable relay on loopback
# (tests/lib/smtp_script.py, which logs how many connections are open at
# once): every message exactly once, also with two ticks at once; the
# held refusals, a relay that goes away and crashes keep their rules with
# several senders. The clock is moved with --now.
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

sub slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }

# A fresh instance sending to URL on 4 connections unless told otherwise.
my $n_inst = 0;
sub instance {
	my ($url, %env) = @_;
	my $d = "$tmp/i" . ++$n_inst;
	mkdir $d;
	my $in = { dir => $d, env => {
		REMARKET_DB => "$d/rm.db", REMARKET_KEY_FILE => "$d/rm.key",
		REMARKET_OUTBOX => "$d/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
		# a real relay: a sender, an address and (loopback) links allowed
		REMARKET_FROM => "Maison Test <shop\@example.com>", REMARKET_POSTAL_ADDRESS => "1 Test Street, 75000 Paris",
		REMARKET_ALLOW_INSECURE_LINKS => "yes",
		REMARKET_SMTP_URL => $url, REMARKET_SMTP_CONNECTIONS => 4, %env } };
	my ($rc, undef, $err) = rm($in, 'init');
	die "init failed: $err" if $rc;
	($rc) = rm($in, 'flows', 'holdout', 'abandoned_cart', '0');
	die "flows holdout failed" if $rc;
	return $in;
}

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
		{ exec $bin, @args }
		POSIX::_exit(127);
	}
	return ($pid, $base);
}

sub finish {
	my ($pid, $base) = @_;
	waitpid $pid, 0;
	my $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
	return ($rc, slurp("$base.out"), slurp("$base.err"));
}

sub rm {
	my ($in, @args) = @_;
	my %extra = ref $args[0] eq 'HASH' ? %{ shift @args } : ();
	my $stdin = delete $extra{_stdin};
	return finish(spawn($in, $stdin, \%extra, @args));
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
my $due = $T0 + 3700;

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

# The most connections the relay had open at once.
sub most_open { my $m = 0; for ($_[0]->log_lines) { $m = $1 if /^open (\d+)/ && $1 > $m } $m }

# Each Message-ID and recipient the relays accepted, and how often.
sub accepted {
	my %id;
	my %to;
	for my $r (@_) {
		for ($r->messages) {
			$id{$1}++ if /^Message-ID:\s*(\S+)/mi;
			$to{$1}++ if /^To:.*?([\w.]+\@example\.com)/mi;
		}
	}
	return (\%id, \%to);
}

sub all_once {
	my ($h, $n) = @_;
	return scalar(keys %$h) == $n && !grep { $_ != 1 } values %$h;
}

my $suppressed = "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL";

# ---- 4 connections: N messages, each exactly once, more than one connection open ----
{
	my $N = 40;
	my $relay = RMRelay->start(dir => "$tmp/relay-par", delay => ['eod=0.05']);
	my $in = instance($relay->url);
	carts($in, $N);
	my $t = time;
	my ($rc, $out, $err) = rm($in, 'tick', '--now', $due);
	my $secs = time - $t;
	is($rc, 0, '4 connections: the tick exits 0') or diag $err;
	is(field($out, 'sent'), $N, "... its summary counts $N sent") or diag "$out\n$err";
	my ($ids, $to) = accepted($relay);
	ok(all_once($ids, $N), "... the relay accepted $N distinct Message-IDs, each once")
	    or diag explain $ids;
	ok(all_once($to, $N), "... one mail to each of the $N recipients") or diag explain $to;
	cmp_ok(most_open($relay), '>', 1, '... on more than one connection at once')
	    or diag join("\n", $relay->log_lines);
	cmp_ok(most_open($relay), '<=', 4, '... and at most smtp_connections (4)');
	cmp_ok($secs, '<', $N * 0.05, "... faster than one connection can be ($secs s for $N at 50 ms)");
	is(sql($in, "SELECT count(*) || ' ' || sum(attempts) FROM messages WHERE status = 'sent'"), "$N $N",
	   '... all recorded sent, one attempt each');
	$relay->stop;
}

# ---- smtp_connections = 1 keeps one connection ---------------------------------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-one");
	my $in = instance($relay->url, REMARKET_SMTP_CONNECTIONS => 1);
	carts($in, 10);
	my (undef, $out) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 10, 'smtp_connections = 1: all ten sent') or diag $out;
	is(most_open($relay), 1, '... on one connection, kept open across them')
	    or diag join("\n", $relay->log_lines);
	$relay->stop;
	my ($rc, undef, $err) = rm($in, { REMARKET_SMTP_CONNECTIONS => 17 }, 'tick', '--now', $due);
	isnt($rc, 0, 'smtp_connections = 17: refused');
	like($err, qr/smtp_connections: 17 must be 1 to 16/, '... saying the range') or diag $err;
}

# ---- two ticks at once, 4 connections each: never a message twice ---------------------
{
	my $N = 60;
	my $relay = RMRelay->start(dir => "$tmp/relay-two", delay => ['eod=0.03']);
	my $in = instance($relay->url);
	carts($in, $N);
	my @p = (spawn($in, undef, {}, 'tick', '--now', $due), spawn($in, undef, {}, 'tick', '--now', $due));
	my @r1 = finish(@p[0, 1]);
	my @r2 = finish(@p[2, 3]);
	is("$r1[0] $r2[0]", '0 0', 'two ticks at once: both exit 0') or diag "$r1[2]\n$r2[2]";
	is(field($r1[1], 'sent') + field($r2[1], 'sent'), $N, "... their summaries add up to $N sent")
	    or diag "$r1[1]\n$r2[1]";
	my ($ids, $to) = accepted($relay);
	ok(all_once($ids, $N), "... the relay accepted $N distinct Message-IDs, each once")
	    or diag explain $ids;
	ok(all_once($to, $N), '... one mail to each recipient') or diag explain $to;
	cmp_ok(most_open($relay), '>', 2, '... on more than one connection each');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sent' AND attempts = 1"), $N,
	   '... all recorded sent, one attempt each');
	$relay->stop;
}

# ---- content refused for everyone: the step pauses as with one connection ---------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-eod", fail => ['eod=554'], delay => ['eod=0.05']);
	my $in = instance($relay->url);
	carts($in, 12);
	my ($rc, $out, $err) = rm($in, 'tick', '--now', $due);
	is($rc, 1, '4 connections, content refused for everyone: the tick exits 1 (a step paused)');
	is(field($out, 'sent') + field($out, 'failed'), 0, '... nothing sent, nothing failed') or diag $out;
	like($out, qr/"stopped":"abandoned_cart step 1 paused: the relay refused its content for \d+ different recipients/,
	    '... the step is paused, the tick says so') or diag $out;
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 12,
	    '... all twelve wait, no attempt counted (those on their way too)')
	    or diag sql($in, "SELECT id, status, attempts, error FROM messages");
	my $good = RMRelay->start(dir => "$tmp/relay-eod-good");
	rm($in, 'flows', 'resume', 'abandoned_cart', '1');
	(undef, $out) = rm($in, { REMARKET_SMTP_URL => $good->url }, 'tick', '--now', $due + 60);
	is(field($out, 'sent'), 12, '... resumed, the next tick sends all twelve') or diag $out;
	my ($ids) = accepted($good);
	ok(all_once($ids, 12), '... each once');
	$relay->stop;
	$good->stop;
}

# ---- a refusal still on its way when the row paused the step waits with the row --------
# (s1 goes first and its relay answers 1 s late; s2..s4 are refused at once)
{
	my $relay = RMRelay->start(dir => "$tmp/relay-late", fail => ['eod=554'], delay => ['eod=1'],
				   delay_for => '^s1@');
	my $in = instance($relay->url);
	carts($in, 4);
	my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
	like($out, qr/"stopped":"abandoned_cart step 1 paused/, 'late refusal: the step is paused') or diag $out;
	is(field($out, 'retry'), 0, '... the one refused after the pause is no retry') or diag "$out\n$err";
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 4,
	    '... all four wait, no attempt counted, the late one too')
	    or diag sql($in, "SELECT id, status, attempts, error FROM messages");
	like(sql($in, "SELECT error FROM messages WHERE id = 1"), qr/paused: the relay refused its content/,
	     '... and it says why');
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	$relay->stop;
}
{
	my $relay = RMRelay->start(dir => "$tmp/relay-late-rcpt", fail => ['rcpt=550 recipient rejected'],
				   delay => ['rcpt=1'], delay_for => '^s1@');
	my $in = instance($relay->url);
	carts($in, 4);
	my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
	like($out, qr/"stopped":".*the relay refuses us/, 'late RCPT refusal: the tick stops, the relay refuses us')
	    or diag $out;
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 4,
	    '... all four wait, no attempt counted, the late one too')
	    or diag sql($in, "SELECT id, status, attempts, error FROM messages");
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	$relay->stop;
}

# ---- content refused for one recipient while the same content goes to others -----------
# (s2's refusal comes 0.5 s late, after the relay took the same step for
# everyone else on the other connections: nothing is sent after it)
{
	my $relay = RMRelay->start(dir => "$tmp/relay-eod1", fail => ['eod=550'], fail_for => '^s2@',
				   delay => ['eod=0.5'], delay_for => '^s2@');
	my $in = instance($relay->url);
	carts($in, 8);
	my (undef, $out, $err) = rm($in, 'tick', '--now', $due);
	is(field($out, 'sent'), 7, '4 connections, end of DATA 550 for one recipient: the others are sent')
	    or diag "$out\n$err";
	is(field($out, 'failed'), 1, '... that one failed: the relay took the same content meanwhile')
	    or diag "$out\n$err";
	is(sql($in, "SELECT group_concat(email) FROM contacts WHERE suppressed_at IS NOT NULL"),
	    's2@example.com', '... only that address is suppressed');
	is(sql($in, "SELECT count(*) FROM steps WHERE paused_at IS NOT NULL"), 0, '... no step is paused');
	$relay->stop;
}

# ---- RCPT refused without an enhanced code for everyone: ours, as with one -------------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-rcpt", fail => ['rcpt=550 recipient rejected'],
				   delay => ['rcpt=0.05']);
	my $in = instance($relay->url);
	carts($in, 10);
	my (undef, $out) = rm($in, 'tick', '--now', $due);
	like($out, qr/"stopped":".*the relay refuses us/, '4 connections, RCPT refused for everyone: the tick stops')
	    or diag $out;
	is(sql($in, $suppressed), 0, '... nobody is suppressed');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'queued' AND attempts = 0"), 10,
	    '... all ten wait, no attempt counted') or diag sql($in, "SELECT id, status, attempts FROM messages");
	$relay->stop;
}

# ---- the relay goes away mid-tick: every sender stops, nothing lost or doubled ---------
{
	my $N = 40;
	my $relay = RMRelay->start(dir => "$tmp/relay-gone", delay => ['eod=0.05']);
	my $in = instance($relay->url);
	carts($in, $N);
	my ($pid, $base) = spawn($in, undef, {}, 'tick', '--now', $due);
	my $end = time + 20;
	sleep 0.01 until scalar($relay->messages) >= 8 || time > $end;
	$relay->stop;
	my ($rc, $out, $err) = finish($pid, $base);
	is($rc, 1, 'relay gone mid-tick: the tick exits 1 (it could not send all)') or diag $err;
	like($out, qr/"stopped":".*relay is unavailable/, '... and says the relay is unavailable') or diag $out;
	my $sent = field($out, 'sent');
	cmp_ok($sent, '<', $N, "... it sent $sent before, the others wait");
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'failed'"), 0, '... none failed');
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sending'"), 0,
	   '... none left claimed: every sender stopped and gave its messages back');
	my $up = RMRelay->start(dir => "$tmp/relay-back");
	my $now = $due + 301;
	for (1 .. 3) {
		(undef, $out) = rm($in, { REMARKET_SMTP_URL => $up->url }, 'tick', '--now', $now);
		$now += 3600;
	}
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sent' AND step = 1"), $N,
	   "the relay back: all $N sent: 0 lost") or diag sql($in, "SELECT id, status, attempts, error FROM messages");
	my ($ids) = accepted($relay, $up);
	is(scalar(grep { $ids->{$_} > 1 } keys %$ids), 0, '... 0 doubled across both relays') or diag explain $ids;
	$up->stop;
}

# ---- kill -9 while the relay holds a message on each of the 4 connections ------------
# (the relay answers each 0.5 s after it arrived: killed when all four are
# held, no answer has gone out yet, so a kill can only cut transactions;
# one killed between an answer and its record would go again, with its
# Message-ID, on one connection as on four)
{
	my $N = 24;
	my $KILLS = 6;
	my $relay = RMRelay->start(dir => "$tmp/relay-kill", delay => ['eod=0.5']);
	my $in = instance($relay->url);
	carts($in, $N);
	my $killed = 0;
	my $now = $due;
	for my $k (1 .. $KILLS) {
		my $before = grep { /^wait/ } $relay->log_lines;
		my ($pid) = spawn($in, undef, {}, 'tick', '--now', $now);
		my $end = time + 20;
		while (time < $end) {
			last if (grep { /^wait/ } $relay->log_lines) >= $before + 4;
			last if waitpid($pid, POSIX::WNOHANG()) == $pid;
			sleep 0.005;
		}
		$killed += kill 'KILL', $pid;
		waitpid $pid, 0;
		$now += 301;
	}
	is($killed, $KILLS, "4 connections: $KILLS ticks killed with SIGKILL while the relay held 4 messages");
	is(scalar($relay->messages), 0, '... (it had accepted none)');
	for (1 .. 5) {
		rm($in, 'tick', '--now', $now);
		$now += 301;
		last if sql($in, "SELECT count(*) FROM messages WHERE status IN ('queued','sending')") == 0;
	}
	is(sql($in, "SELECT count(*) FROM messages WHERE status = 'sent'"), $N, "then all $N are sent: 0 lost")
	    or diag sql($in, "SELECT status, attempts, crashes, error FROM messages WHERE status <> 'sent'");
	my ($ids) = accepted($relay);
	ok(all_once($ids, $N), "... the relay accepted each of the $N once: 0 doubled") or diag explain $ids;
	my $dropped = grep { /dropped/ } $relay->log_lines;
	cmp_ok($dropped, '>=', 4 * $KILLS, "... (the relay dropped $dropped transactions cut by the kills)");
	$relay->stop;
}

# ---- a message that kills the tick while prepared beside others: given up alone ---------
{
	my $relay = RMRelay->start(dir => "$tmp/relay-poison", delay => ['eod=0.3']);
	my $in = instance($relay->url);
	carts($in, 8);
	my $now = $due;
	my @rc;
	for (1 .. 5) {    # CRASH_MAX deaths while preparing message 3
		my ($rc) = rm($in, { REMARKET_FAULT => 'crash_while_preparing:3' }, 'tick', '--now', $now);
		push @rc, $rc;
		$now += 301;
	}
	is("@rc", '70 70 70 70 70', 'poison on 4 connections: five ticks die while preparing message 3');
	is(sql($in, "SELECT crashes FROM messages WHERE id = 3"), 5, '... its deaths are counted');
	cmp_ok(sql($in, "SELECT max(crashes) FROM messages WHERE id <> 3"), '<=', 1,
	       '... the others prepared beside it are charged once at most, then prepared alone')
	    or diag sql($in, "SELECT id, crashes, attempts FROM messages");
	my (undef, $out) = rm($in, 'tick', '--now', $now);
	is(field($out, 'sent'), 7, '... the next tick gives it up and sends the other seven') or diag $out;
	like(sql($in, "SELECT status || ': ' || error FROM messages WHERE id = 3"),
	    qr/^failed: given up: the tick died 5 times while preparing it/, '... it alone is given up');
	my ($ids) = accepted($relay);
	ok(all_once($ids, 7), '... the relay accepted the seven once each') or diag explain $ids;
	$relay->stop;
}

done_testing();
