#!/usr/bin/perl
# Failures are loud (issue 11): `remarket status` and GET /rm/health, the
# checks init, serve and tick run before they start (templates with
# file:line, partials, remarket.js, a real relay's links and sender), a
# tick that could not send exits 1 and lists its problems, held-out
# enrollments in the tick's summary, and `flows set` refusing what would
# break mail. A real relay (tests/lib/RMRelay.pm) and a dead port.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use File::Copy qw(copy);
use Cwd qw(abs_path);
use JSON::PP;
use lib dirname(abs_path($0)) . '/lib';
use RMRelay;
use RMTest qw(free_port);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make") unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
my $T0 = 1795000000;
my $due = $T0 + 3700;

my %base = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates",
	REMARKET_STATIC_DIR => "$root/static", REMARKET_SMTP_URL => '',
	REMARKET_CONFIG => '/dev/null', REMARKET_TICK_TOKEN => 'tok-123',
	REMARKET_SMTP_CONNECT_TIMEOUT => 2, REMARKET_SMTP_REPLY_TIMEOUT => 2);

sub slurp { my ($f) = @_; open my $fh, '<', $f or return ''; local $/; <$fh> // '' }

# rm(\%extra_env, @args) -> (exit code, stdout, stderr); _stdin in the env
sub rm {
	my ($extra, @args) = @_;
	my %e = (%base, %{ $extra || {} });
	my $stdin = delete $e{_stdin} // '';
	open my $fh, '>', "$tmp/stdin" or die;
	print $fh $stdin;
	close $fh;
	local %ENV = (%ENV, %e);
	delete local $ENV{$_} for grep { (/^REMARKET_/ || $_ eq 'GATEWAY_INTERFACE')
		&& !exists $e{$_} } keys %ENV;
	my $out = `'$bin' @args < '$tmp/stdin' 2>'$tmp/stderr'`;
	return ($? >> 8, $out, slurp("$tmp/stderr"));
}

sub sql {
	my ($q) = @_;
	open my $fh, '-|', 'sqlite3', '-batch', '-cmd', '.timeout 5000', "$tmp/rm.db", $q or die;
	local $/;
	my $o = <$fh> // '';
	close $fh;
	$o =~ s/\A\s+|\s+\z//g;
	return $o;
}

# One GET through the CGI front-end: (status line, headers, body).
sub cgi {
	my ($extra, $path, $query, $auth) = @_;
	my (undef, $out) = rm({ %{ $extra || {} }, GATEWAY_INTERFACE => 'CGI/1.1',
		REQUEST_METHOD => 'GET', PATH_INFO => $path, QUERY_STRING => $query // '',
		REMOTE_ADDR => '127.0.0.1', REMARKET_NOW => $due,
		($auth ? (HTTP_AUTHORIZATION => $auth) : ()) });
	my ($h, $b) = split /\r\n\r\n/, $out, 2;
	my ($status) = ($h // '') =~ /^Status: (\d+)/m;
	return ($status // 200, $h // '', $b // '');
}

sub check { my ($j, $name) = @_; (grep { $_->{name} eq $name } @{ $j->{checks} })[0] || {} }

sub carts {
	my ($n, $prefix) = @_;
	my @ev = map {
		qq({"type":"cart","email":"$prefix$_\@example.com","name":"S $_","consent":true,)
		. qq("cart_id":"$prefix-$_","currency":"EUR","ts":$T0,)
		. qq("items":[{"sku":"LAMP-1","name":"Rattan lamp","price":39.9,"qty":1}]})
	} 1 .. $n;
	my ($rc, undef, $err) = rm({ _stdin => '[' . join(',', @ev) . ']' }, 'event', '--now', $T0);
	die "event failed: $err" if $rc;
}

# ---- before init: status reads what there is, and says what is missing ----
my ($rc, $out, $err) = rm({}, 'status');
is($rc, 1, 'status before init: exit 1');
like($out, qr/^STOP  key\s+key_file \Q$tmp\E\/rm\.key: .*remarket init/m, '... the key is missing');
like($out, qr/^STOP  database\s+db \Q$tmp\E\/rm\.db: cannot open it/m, '... and the database');
ok(!-e "$tmp/rm.db", '... and status made no database');
($rc, $out) = rm({}, 'status', '--json');
my $j = eval { decode_json($out) };
ok($j && $j->{status} eq 'stop' && $j->{exit} == 1, 'status --json before init: valid JSON, stop')
	or diag $out;
($rc, $out, $err) = rm({}, 'status', '--bogus');
is($rc, 2, 'status with an unknown word: exit 2');

# ---- init and serve refuse to start without remarket.js or templates -------
($rc, $out, $err) = rm({ REMARKET_STATIC_DIR => "$tmp/nowhere" }, 'init');
is($rc, 1, 'init without remarket.js: exit 1');
like($err, qr{\Q$tmp\E/nowhere/remarket\.js: No such file or directory — set static_dir},
	'... naming the file and the key to set') or diag $err;
ok(!-e "$tmp/rm.key", '... and no key was made');
is((rm({}, 'init'))[0], 0, 'init with the files');
is((rm({}, 'flows', 'holdout', 'abandoned_cart', '0'))[0], 0, 'no holdout for now');

# a copy of the templates, one broken at line 12 as a person would break it
my $tpl = "$tmp/tpl";
mkdir $tpl;
opendir my $dh, "$root/templates" or die;
copy("$root/templates/$_", "$tpl/$_") for grep { !/^\./ } readdir $dh;
closedir $dh;
my @lines = split /\n/, slurp("$tpl/cart_reminder.html"), -1;
splice @lines, 11, 0, '<p>{{#first_name}}Hello {{first_name}}</p>';
open my $fh, '>', "$tpl/cart_reminder.html" or die;
print $fh join("\n", @lines);
close $fh;
my $where = "$tpl/cart_reminder.html:12: '{{#first_name}}' is never closed";
my %broken = (REMARKET_TEMPLATES => $tpl);

($rc, $out, $err) = rm(\%broken, 'init');
is($rc, 1, 'init with a broken template: exit 1');
like($err, qr/\Q$where\E \(abandoned_cart step 1\)/, '... naming file, line and tag') or diag $err;
{
	local $ENV{REMARKET_TEMPLATES};
	my $sock = "$tmp/serve.sock";
	($rc, $out, $err) = rm(\%broken, 'serve', $sock);
	is($rc, 1, 'serve with a broken template: exit 1, before listening');
	like($err, qr/\Q$where\E/, '... naming file and line');
	ok(!-e $sock, '... no socket made');
}

# ---- a tick that cannot send exits 1 and lists each problem ----------------
carts(3, 'a');
($rc, $out, $err) = rm(\%broken, 'status');
is($rc, 1, 'status with a broken template: exit 1');
like($out, qr/^STOP  templates .*\n\s+\Q$where\E/m, '... the problem under its check');
($rc, $out, $err) = rm(\%broken, 'tick', '--now', $due);
is($rc, 1, 'tick with a broken template: exit 1');
$j = eval { decode_json($out) };
ok($j && grep({ index($_, $where) == 0 } @{ $j->{problems} || [] }),
	'... its JSON lists the problem with file and line') or diag $out;
is($j && $j->{sent}, 0, '... nothing was sent');
is(sql("SELECT count(*) FROM messages"), 0, '... and nothing claimed or queued');
like($err, qr/tick refused: \Q$where\E/, '... and stderr says it');
($rc, $out) = rm({}, 'status', '--json');
$j = decode_json($out);
is(check($j, 'last_tick')->{level}, 'warn', 'status: the last tick had problems (a warning)');
like(check($j, 'last_tick')->{message}, qr/problems: \Q$where\E/, '... and names the first');

# fixed: the tick sends, exits 0, counts the held-out
is((rm({}, 'flows', 'holdout', 'abandoned_cart', '50'))[0], 0, 'a 50 % holdout');
carts(40, 'h');
($rc, $out, $err) = rm({}, 'tick', '--now', $due);
is($rc, 0, 'tick with good templates (outbox): exit 0') or diag $err;
$j = decode_json($out);
is_deeply($j->{problems}, [], '... no problem');
my $held = sql("SELECT count(*) FROM enrollments WHERE holdout = 1");
ok($held > 0, "the holdout kept $held of 43 out");
is($j->{held_out}, $held, '... and the tick summary counts them (held_out)');

# ---- a real relay: links, sender, no password, no mail --------------------
my $relay = RMRelay->start(dir => "$tmp/relay");
my %real = (REMARKET_SMTP_URL => $relay->url, REMARKET_NOW => $due);
($rc, $out, $err) = rm(\%real, 'status');
is($rc, 1, 'a real relay with the demo sender and http links: exit 1');
like($out, qr/^ok    relay\s+smtp:\/\/127\.0\.0\.1:$relay->{port} answers \(EHLO/m,
	'... the relay answers EHLO') or diag $out;
like($out, qr/^STOP  links .*\n\s+base_url http:\/\/127\.0\.0\.1:8080\/rm: not https/m, '... http links refused');
like($out, qr/postal_address is the demo's \(Maison Demo, 1 Example Street, 75001 Paris/,
	"... the demo postal address refused");
like($out, qr/from is the demo's/, '... and the demo sender');
($rc, $out, $err) = rm(\%real, 'tick', '--now', $due + 86400);
is($rc, 1, 'tick with the demo sender to a real relay: exit 1');
like($out, qr/"problems":\[.*postal_address is the demo's/, '... problems say why');
is(scalar($relay->messages), 0, 'the relay received no mail (status nor tick)');

my %good = (%real, REMARKET_FROM => 'Shop <shop@shop.example>',
	REMARKET_POSTAL_ADDRESS => '2 Real Road, 69001 Lyon');
($rc, $out) = rm({ %good, REMARKET_BASE_URL => 'https://localhost/rm',
	REMARKET_CART_URL => 'https://127.0.0.1/cart?restore={cart}' }, 'status');
like($out, qr/base_url https:\/\/localhost\/rm: points at this machine/, 'https to localhost: refused');
like($out, qr/cart_url https:\/\/127\.0\.0\.1\/cart\S*: points at this machine/, '... and to 127.0.0.1');
($rc, $out) = rm({ %good, REMARKET_ALLOW_INSECURE_LINKS => 'yes' }, 'status');
is($rc, 3, 'allow_insecure_links = yes, the rest good: a warning, exit 3') or diag $out;
like($out, qr/^warn  links/m, '... the links check warns');
my %public = (%good, REMARKET_BASE_URL => 'https://shop.example/rm',
	REMARKET_CART_URL => 'https://shop.example/cart?restore={cart}&code={code}');
($rc, $out) = rm(\%public, 'status', '--json');
$j = decode_json($out);
is(check($j, $_)->{level}, 'ok', "public https links, a real sender: $_ ok") for qw(links sender relay);
is(scalar($relay->messages), 0, 'still no mail at the relay');

# ---- a dead port: unreachable ----------------------------------------------
my $dead = free_port();
my %down = (%public, REMARKET_SMTP_URL => "smtp://shop:s3cr3t-pw\@127.0.0.1:$dead");
($rc, $out, $err) = rm(\%down, 'status');
is($rc, 1, 'a relay that is not there: exit 1');
like($out, qr/^STOP  relay\s+smtp:\/\/shop\@127\.0\.0\.1:$dead\/?: .*is the relay running/m,
	'... and says so, naming smtp_url without its password') or diag $out;
unlike($out . $err, qr/s3cr3t-pw/, '... the password is never shown');
($rc, $out) = rm(\%down, 'status', '--json');
unlike($out, qr/s3cr3t-pw/, '... nor in the JSON');
is((rm({}, 'flows', 'holdout', 'abandoned_cart', '0'))[0], 0, 'no holdout again');
carts(2, 'd');
my $t1 = $T0 + 5 * 86400;
sql("UPDATE carts SET updated = $t1 - 4000 WHERE cart_key LIKE 'd-%'");
($rc, $out, $err) = rm(\%down, 'tick', '--now', $t1);
is($rc, 1, 'a tick whose relay is unreachable: exit 1');
like($out, qr/"problems":\[".*relay is unavailable/, '... problems name the relay') or diag $out;
unlike($out, qr/s3cr3t-pw/, '... without the password');
($rc, $out) = rm({ %down, REMARKET_NOW => $t1 + 2 * 3600 }, 'status', '--json');
$j = decode_json($out);
my $queued = sql("SELECT count(*) FROM messages WHERE status = 'queued' AND next_try <= $t1 + 7200");
ok($queued >= 2, "$queued messages queued and due (the 2 the relay never took among them)");
is(check($j, 'backlog')->{data}{queued}, $queued, 'status: the backlog counts them') or diag $out;
ok(check($j, 'backlog')->{data}{due} >= $queued, '... in the messages due');
is(check($j, 'backlog')->{level}, 'warn', '... over an hour late: a warning');

# ---- /rm/health: ok for anyone, the checks for the operator ----------------
my ($st, $h, $b) = cgi(\%down, '/health');
is("$st $b", "200 ok\n", 'GET /health without a token: 200 ok');
($st, $h, $b) = cgi(\%down, '/health', undef, 'Bearer tok-123');
is($st, 503, 'GET /health with the tick token, relay down: 503');
$j = eval { decode_json($b) };
is($j && check($j, 'relay')->{level}, 'stop', '... and the checks as JSON');
(undef, my $link) = rm(\%public, 'report', '--link');
my ($t) = $link =~ /\?t=(\S+)/;
($st, $h, $b) = cgi(\%public, '/health', "t=$t");
is($st, 200, 'GET /health?t=<report link token>: 200') or diag $b;
$j = eval { decode_json($b) };
ok($j && @{ $j->{checks} } >= 13 && check($j, 'winback_waiting')->{level} eq 'ok',
	'... every check, as status --json');
($st, $h, $b) = cgi(\%public, '/health', 't=forged');
is("$st $b", "200 ok\n", '... a forged token gets the liveness answer only');

# ---- paused steps and failures in status -----------------------------------
sql("UPDATE steps SET paused_at = $due, paused_reason = 'the relay refused its content' "
	. "WHERE flow_id = 1 AND position = 2");
sql("UPDATE messages SET status = 'failed', error = 'smtp: 550 5.1.1 <recipient>: user unknown' "
	. "WHERE id = (SELECT min(id) FROM messages)");
($rc, $out) = rm({ REMARKET_NOW => $due }, 'status');
like($out, qr/^warn  paused .*\n\s+abandoned_cart step 2: the relay refused its content/m,
	'status: a paused step warns, with its reason');
like($out, qr/^ok    failures\s+1 message failed in 7 days, by reason:\n\s+1 × smtp: 550 5\.1\.1/m,
	'... failures by reason') or diag $out;

# ---- flows set refuses what would break mail --------------------------------
($rc, $out, $err) = rm({}, 'flows', 'set', 'abandoned_cart', '1', 'template=nope');
is($rc, 1, 'flows set template=nope: exit 1');
like($err, qr/template=nope: .*nope\.txt: No such file/, '... the template is not there');
($rc, $out, $err) = rm(\%broken, 'flows', 'set', 'abandoned_cart', '2', 'template=cart_reminder');
is($rc, 1, 'flows set to a broken template: exit 1');
like($err, qr/\Q$where\E/, '... with file and line');
($rc, $out, $err) = rm({}, 'flows', 'set', 'abandoned_cart', '3', 'delay=40d');
is($rc, 1, 'flows set delay=40d: exit 1');
like($err, qr/longer than the links live \(30 days\)/, '... longer than the links live');
is(sql("SELECT delay_s FROM steps WHERE flow_id = 1 AND position = 3"), 259200, '... nothing changed');
($rc, $out, $err) = rm({}, 'flows', 'set', 'abandoned_cart', '1', 'discount=10');
is($rc, 0, 'flows set a discount on a template without the code: done');
like($err, qr/warning: abandoned_cart step 1 gives 10 % off, but template cart_reminder shows no \{\{discount_code\}\}/,
	'... with a warning');
($rc, $out, $err) = rm({}, 'flows', 'set', 'abandoned_cart', '3', 'discount=15');
is("$rc $err", '0 ', 'a discount on cart_incentive (shows the code): no warning');

$relay->stop;
done_testing;
