#!/usr/bin/perl
# 22-group-commit.t: `remarket serve` stores the events of concurrent
# requests through one writer thread, several requests a commit (group
# commit, issue 10). Through the real nginx: many signed hooks at once,
# with requests refused by validation (400) and at apply time (403) among
# them, are each answered for themselves, and every event answered 202 is
# in the database; then SIGTERM in the middle of a load loses no event
# that was answered 202. (The batching itself is proven deterministically
# by test_group_commit in tests/unit.c.)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX ();
use Time::HiRes qw(sleep time);
use RMTest qw(:DEFAULT bin tmp);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

start();
my $tmp = tmp();

sub cart_json {
    my ($id) = @_;
    return qq([{"type":"cart","email":"$id\@example.com","cart_id":"$id","currency":"EUR",)
        . qq("items":[{"sku":"A","name":"A","price":1,"qty":1}],"total":1}]);
}

# Runs $code->($k) in $n children at once; each returns lines
# "<what> <status>" written to $tmp/$tag.$k. Returns all lines.
sub in_children {
    my ($tag, $n, $code) = @_;
    my @pids;
    for my $k (1 .. $n) {
        my $pid = fork // die "fork: $!";
        if (!$pid) {
            open my $fh, '>', "$tmp/$tag.$k" or POSIX::_exit(1);
            $fh->autoflush(1);
            $code->($k, $fh);
            close $fh;
            POSIX::_exit(0);
        }
        push @pids, $pid;
    }
    return @pids;
}

sub lines_of {
    my ($tag, $n) = @_;
    my @l;
    for my $k (1 .. $n) {
        open my $fh, '<', "$tmp/$tag.$k" or next;
        push @l, map { chomp; $_ } <$fh>;
        close $fh;
    }
    return @l;
}

# A cart the store's backend made: a browser may not touch it (403).
is(post_event(cart_json('backend-1'))->{status}, 202, 'the backend makes a cart');

# ---- many requests at once, good and bad mixed --------------------------
my ($K, $M) = (8, 25);
my @pids = in_children('p1', $K + 2, sub {
    my ($k, $fh) = @_;
    for my $i (1 .. $M) {
        if ($k <= $K) {
            my $r = post_event(cart_json("p1-$k-$i"));
            print $fh "p1-$k-$i $r->{status} $r->{content}\n";
        } elsif ($k == $K + 1) { # refused by validation
            my $r = post_event('[{"type":"cart","email":"not-an-address"}]');
            print $fh "bad $r->{status} $r->{content}\n";
        } elsif ($i <= 10) { # refused at apply time, its view with it
            my $r = http('POST', '/rm/collect',
                '[{"type":"view","sku":"A","visitor_id":"v-evil"},'
                . '{"type":"cart","cart_id":"backend-1","visitor_id":"v-evil","items":[]}]',
                { 'Content-Type' => 'application/json' });
            print $fh "evil $r->{status} $r->{content}\n";
        }
    }
});
waitpid $_, 0 for @pids;
my @l = lines_of('p1', $K + 2);
my @good = grep { /^p1-/ } @l;
is(scalar @good, $K * $M, "$K clients posted $M signed hooks each, at once");
is(scalar(grep { / 202 \{"accepted":1,"duplicates":0\}$/ } @good), $K * $M,
    '... every one answered 202 {"accepted":1,"duplicates":0}')
    or diag(join "\n", grep { !/ 202 / } @good);
my @bad = grep { /^bad / } @l;
is(scalar(grep { / 400 .*email/ } @bad), $M, 'the invalid ones mixed in: each its own 400, naming the field')
    or diag(join "\n", @bad[0 .. 2]);
my @evil = grep { /^evil / } @l;
is(scalar(grep { / 403 .*not this visitor's/ } @evil), 10,
    "the browser's requests for the backend's cart: each its own 403")
    or diag(join "\n", @evil[0 .. 2]);
my %db = map { $_ => 1 } split /\n/, sql("SELECT cart_key FROM carts WHERE cart_key LIKE 'p1-%'");
is(scalar(grep { my ($c) = split / /; $db{$c} } @good), $K * $M, 'every cart answered 202 is in the database');
is(sql("SELECT count(*) FROM events WHERE source = 'hook'"), $K * $M + 1,
    '... one event each, and no other');
is(sql("SELECT count(*) FROM events WHERE type = 'view'"), 0,
    "... the refused browser requests' views were rolled back with them");
is(sql("SELECT item_count FROM carts WHERE cart_key = 'backend-1'"), 1, "... the backend's cart is intact");

# ---- SIGTERM under load ---------------------------------------------------
my $serve;
for my $p (glob '/proc/[0-9]*') {
    open my $fh, '<', "$p/cmdline" or next;
    my $c = <$fh> // '';
    close $fh;
    ($serve) = $p =~ m{(\d+)$} if $c =~ /\0serve\0\Q$tmp\E\/remarket\.sock\0?$/;
}
ok($serve, 'remarket serve is found') or BAIL_OUT('no remarket serve process');

my $N2 = 8;
@pids = in_children('p2', $N2, sub {
    my ($k, $fh) = @_;
    my $fails = 0;
    for my $i (1 .. 2000) {
        my $r = post_event(cart_json("p2-$k-$i"));
        print $fh "p2-$k-$i $r->{status}\n";
        $fails = $r->{status} == 202 ? 0 : $fails + 1;
        last if $fails >= 3; # the server is gone
    }
});
my $end = time + 60;
sleep 0.02 while scalar(lines_of('p2', $N2)) < 80 && time < $end;
kill 'TERM', $serve;
waitpid $_, 0 for @pids;
# remarket serve is RMTest's child: let stop() reap it, only wait for it
# to have exited (a zombie)
$end = time + 10;
sub state_of {
    open my $fh, '<', "/proc/$_[0]/stat" or return 'gone';
    my $s = <$fh> // '';
    close $fh;
    return $s =~ /\)\s+(\S)/ ? $1 : '?';
}
sleep 0.02 while state_of($serve) !~ /^(Z|gone)$/ && time < $end;
like(state_of($serve), qr/^(Z|gone)$/, 'remarket serve exits after SIGTERM');
@l = lines_of('p2', $N2);
my @ok = grep { / 202$/ } @l;
cmp_ok(scalar @ok, '>=', 80, 'requests were answered 202 until the SIGTERM')
    or diag(scalar(@l) . " requests, " . scalar(@ok) . " 202");
%db = map { $_ => 1 } split /\n/, sql("SELECT cart_key FROM carts WHERE cart_key LIKE 'p2-%'");
my @lost = grep { my ($c) = split / /; !$db{$c} } @ok;
is(scalar @lost, 0, 'every one of the ' . scalar(@ok) . ' answered 202 is in the database')
    or diag("lost: @lost[0 .. ($#lost < 9 ? $#lost : 9)]");
my $log = do { local $/; open my $fh, '<', "$tmp/serve.log" or die; <$fh> };
like($log, qr/stopping: ingest stored (\d+) requests in (\d+) commits/,
    'serve says how many requests its writer stored in how many commits');
if ($log =~ /ingest stored (\d+) requests in (\d+) commits/) {
    cmp_ok($1, '>=', $K * $M + 1 + 10 + scalar @ok, '... every request that reached it');
    diag("group commit: $1 requests in $2 commits");
}
stop();
done_testing();
