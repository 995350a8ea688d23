#!/usr/bin/perl
# The operator's flow commands: list, set, enable/disable, holdout,
# variant; bad settings answered with exit 2 and a message; and a change
# that applies to the steps not yet sent of people already enrolled.
use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $root = abs_path(dirname(abs_path($0)) . '/..');
my $bin = $ENV{REMARKET_BIN} || "$root/remarket";
BAIL_OUT("$bin not built: run make check") unless -x $bin;
my $tmp = tempdir(CLEANUP => 1);
my %env = (REMARKET_DB => "$tmp/rm.db", REMARKET_KEY_FILE => "$tmp/rm.key",
	REMARKET_OUTBOX => "$tmp/outbox", REMARKET_TEMPLATES => "$root/templates", REMARKET_STATIC_DIR => "$root/static",
	REMARKET_SMTP_URL => '');

sub rm {
	my ($stdin, @args) = @_;
	local %ENV = (%ENV, %env);
	open my $fh, '>', "$tmp/in" or die;
	print $fh ($stdin // '');
	close $fh;
	my $out = `'$bin' @args < '$tmp/in' 2>'$tmp/err'`;
	return ($? >> 8, $out, do { local (@ARGV, $/) = "$tmp/err"; <> // '' });
}
sub sql { my $q = shift; my $o = `sqlite3 '$env{REMARKET_DB}' "$q"`; chomp $o; $o }

is((rm('', 'init'))[0], 0, 'init');
my ($rc, $out, $err) = rm('', 'flows');
is($rc, 0, 'flows lists');
like($out, qr/^abandoned_cart \(enabled, 10 % held out\)$/m, 'the cart flow, on, 10 % held out');
like($out, qr/step 3\s+\+3d\s+cart_incentive\s+10% off, valid 2d/, 'its 72 h step with 10 % off for 48 h');
like($out, qr/^post_purchase \(disabled/m, 'post-purchase is off by default');
like($out, qr/winback_vip\s+only for vip/, 'segment-targeted steps are shown');

($rc, $out) = rm('', qw(flows set abandoned_cart 2 delay=48h template=social_proof));
is($rc, 0, 'set a delay and a template');
like($out, qr/step 2\s+\+2d\s+social_proof/, '... shown at once');
($rc, $out, $err) = rm('', qw(flows set abandoned_cart 3 discount=95));
is($rc, 2, 'a discount of 95 % is refused (exit 2)');
like($err, qr/bad setting 'discount=95' \(delay=24h/, '... saying what is allowed');
($rc, undef, $err) = rm('', qw(flows set abandoned_cart 9 delay=1h));
is($rc, 1, 'a step that does not exist: exit 1');
like($err, qr/no step 9 of flow abandoned_cart/, '... named');
($rc, undef, $err) = rm('', qw(flows set abandoned_cart 1 colour=red));
is($rc, 2, 'an unknown key: exit 2');
is(sql('SELECT delay_s FROM steps WHERE flow_id = 1 AND position = 1'), 3600, '... nothing changed');
($rc, $out) = rm('', qw(flows holdout abandoned_cart 0));
like($out, qr/abandoned_cart \(enabled, 0 % held out\)/, 'holdout 0');
is((rm('', qw(flows holdout abandoned_cart 60)))[0], 1, 'a holdout over 50 % is refused');
($rc, $out) = rm('', qw(flows variant abandoned_cart 3 discount=15 share=50));
like($out, qr/variant B of step 3 for 50 % of contacts: discount 15%/, 'a variant B of step 3');
($rc, $out) = rm('', qw(flows variant abandoned_cart 3 off));
unlike($out, qr/variant B/, '... and off again');
($rc, $out) = rm('', qw(flows disable post_purchase));
like($out, qr/post_purchase \(disabled/, 'disable');

# a change reaches people already enrolled, for the steps they have not had
my $T0 = 1795000000;
my $ev = join ',', map {
	qq({"type":"cart","email":"f$_\@example.com","consent":true,"cart_id":"f$_",)
	    . qq("ts":$T0,"items":[{"sku":"A","name":"Lamp","price":20}]})
} 1 .. 3;
is((rm("[$ev]", 'event', '--now', $T0))[0], 0, 'three carts');
($rc, $out) = rm('', 'tick', '--now', $T0 + 3700);
like($out, qr/"sent":3/, 'step 1 to the three');
is((rm('', qw(flows set abandoned_cart 3 discount=20 delay=96h)))[0], 0,
    'the incentive becomes 20 % at 96 h');
($rc, $out) = rm('', 'tick', '--now', $T0 + 2 * 86400 + 100);
like($out, qr/"sent":3/, 'step 2 at its new delay of 48 h');
($rc, $out) = rm('', 'tick', '--now', $T0 + 72 * 3600 + 100);
like($out, qr/"sent":0/, 'nothing at 72 h any more');
($rc, $out) = rm('', 'tick', '--now', $T0 + 96 * 3600 + 100);
like($out, qr/"sent":3/, 'step 3 at 96 h');
is(sql('SELECT count(*) FROM discounts WHERE percent = 20'), 3, 'with 20 % codes');
is((rm('', qw(flows disable abandoned_cart)))[0], 0, 'the cart flow off');
is((rm('[' . (qq({"type":"cart","email":"g\@example.com","consent":true,"cart_id":"g1",)
	. qq("ts":$T0,"items":[{"sku":"A","name":"Lamp","price":20}]})) . ']', 'event', '--now', $T0))[0], 0,
    'another cart');
($rc, $out) = rm('', 'tick', '--now', $T0 + 3700);
like($out, qr/"enrolled":0/, 'a disabled flow enrolls nobody');

done_testing();
