#!/usr/bin/perl
# Issue 14: the report must not take credit for natural returns. A
# win-back with a 50 % holdout, run by the real binary with an injected
# clock: some held-out and some messaged customers order again, and
# `remarket report` (JSON and text) shows the flow's enrolled and held
# out, each group's conversion and reactivation, and calls only their
# difference "caused by remarket".
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use JSON::PP ();

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
my $DAY = 86400;
my $T0 = 1795000000;
my %env = (
	REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '', REMARKET_FROM => 'Maison Test <shop@example.com>',
	REMARKET_CONFIG => '/dev/null',
);

sub rm {
	my ($stdin, @args) = @_;
	local %ENV = (%ENV, %env);
	delete local $ENV{GATEWAY_INTERFACE};
	open my $fh, '>', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql { my $q = shift; my $o = `sqlite3 '$env{REMARKET_DB}' "$q"`; chomp $o; $o }
sub order {
	my ($id, $email, $ts) = @_;
	return qq({"type":"order","order_id":"$id","email":"$email","consent":true,)
	    . qq("ts":$ts,"total":40,"items":[{"sku":"A","name":"Lamp","price":40}]});
}

is((rm('', 'init'))[0], 0, 'init');
is((rm('', qw(flows holdout winback 50)))[0], 0, 'win-back holds out 50 %');
my @old = map { order("w$_", "w$_\@example.com", $T0 - 100 * $DAY) } 1 .. 60;
my ($rc, $out, $err) = rm('[' . join(',', @old) . ']', 'event', '--now', $T0 - 100 * $DAY);
is($rc, 0, '60 customers ordered 100 days ago') or diag $err;
($rc, $out, $err) = rm('', 'tick', '--now', $T0);
is($rc, 0, 'the tick enrolls them in win-back') or diag $err;

my @held = split /\n/, sql("SELECT c.email FROM enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 1 ORDER BY c.id");
my @msgd = split /\n/, sql("SELECT c.email FROM enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 0 ORDER BY c.id");
ok(@held >= 10 && @msgd >= 10 && @held + @msgd == 60, scalar(@held) . ' held out, ' . scalar(@msgd) . ' messaged');

# 4 held out and 7 messaged order again 5 days later
my $n = 0;
my @back = map { order('back' . $n++, $_, $T0 + 5 * $DAY) } @held[0 .. 3], @msgd[0 .. 6];
($rc, undef, $err) = rm('[' . join(',', @back) . ']', 'event', '--now', $T0 + 5 * $DAY);
is($rc, 0, '11 of them order again') or diag $err;
rm('', 'tick', '--now', $T0 + 6 * $DAY);

my $now = $T0 + 40 * $DAY;
(undef, my $json) = rm('', qw(report --json --since), $T0 - $DAY, '--now', $now);
my $j = eval { JSON::PP->new->decode($json) } || {};
my ($wb) = grep { $_->{name} eq 'winback' } @{ $j->{flows} || [] };
ok($wb, 'the report has the win-back flow') or diag $json;
$wb ||= {};
is($wb->{enrolled}, scalar @msgd, 'flow winback: enrolled = the messaged');
is($wb->{holdout}, scalar @held, 'flow winback: held out counted (was 0: the query joined carts)');
is($wb->{converted}, 7, 'flow winback: 7 messaged converted');
is($wb->{holdout_converted}, 4, 'flow winback: 4 held out converted anyway');
my ($s1) = grep { $_->{position} == 1 } @{ $wb->{steps} || [] };
is($s1 && $s1->{converted}, 7, 'step 1: 7 converted (was always 0)');
my $w = $j->{winback} || {};
is($w->{contacted}, scalar @msgd, 'win-back: contacted');
is($w->{reactivated_30d}, 7, 'win-back: 7 reactivated within 30 days');
is($w->{held_out}, scalar @held, 'win-back: the held-out baseline group');
is($w->{held_out_reactivated_30d}, 4, 'win-back: 4 of them reactivated anyway');
my $diff = 7 / @msgd - 4 / @held;
ok(abs($w->{caused_by_remarket} - $diff) < 0.0001, sprintf('win-back: caused by remarket = %.4f, the difference', $diff));

(undef, my $text) = rm('', qw(report --since), $T0 - $DAY, '--now', $now);
my $flow = sprintf('flow winback: %d enrolled, %d held out; converted %.1f %% messaged vs %.1f %% held out: caused by remarket %+.1f points',
	scalar @msgd, scalar @held, 700 / @msgd, 400 / @held, 100 * (7 / @msgd - 4 / @held));
ok(index($text, $flow) >= 0, 'text: the flow line with both groups and the difference') or diag "want $flow\n$text";
my $line = sprintf('%d reactivated within 30 days (%.1f %%)', 7, 700 / @msgd);
ok(index($text, $line) >= 0, 'text: the messaged reactivation') or diag $text;
my $base = sprintf('win-back held out  %d, 4 ordered again within 30 days anyway (%.1f %%): caused by remarket %+.1f points',
	scalar @held, 400 / @held, 100 * $diff);
ok(index($text, $base) >= 0, 'text: the held-out baseline and only the difference as caused') or diag "want $base\n$text";
done_testing();
