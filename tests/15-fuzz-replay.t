#!/usr/bin/perl
# 15-fuzz-replay.t: runs each libFuzzer target (tests/fuzz/NAME.c, built
# by `make check` into build/fuzz/) once over every input of its corpus,
# tests/fuzz/corpus/NAME/: the seeds and every crash ever found stay
# fixed. Seconds, not minutes; `make fuzz` is the long run. $FUZZ_BIN_DIR
# overrides build/fuzz. A missing target is a loud failure, not a skip.
use strict;
use warnings;
use FindBin;
use Cwd qw(abs_path);

my $root = abs_path("$FindBin::Bin/..");
chdir $root or die "cannot chdir to $root: $!";
$| = 1;
my $dir = $ENV{FUZZ_BIN_DIR} || "build/fuzz";
$dir = "$root/$dir" unless $dir =~ m{^/};
$ENV{RM_TEMPLATES} ||= "$root/templates";

my @targets = qw(ingest http template token csv feedback);
print "1..", scalar(@targets), "\n";
my $n = 0;
for my $t (@targets) {
    $n++;
    my $bin = "$dir/$t";
    my $corpus = "tests/fuzz/corpus/$t";
    my @inputs = glob("$corpus/*");
    unless (-x $bin) {
        print "not ok $n - fuzz target $t replays its corpus\n";
        print "# $bin is not built: run make check (needs clang and libFuzzer)\n";
        next;
    }
    # -runs=0: execute each corpus input once, mutate nothing
    my $out = `'$bin' -runs=0 -close_fd_mask=3 -timeout=20 '$corpus' 2>&1`;
    my $rc = $? >> 8;
    my $ok = $rc == 0 && $out =~ /DONE|INITED/ && @inputs > 0;
    print $ok ? "ok" : "not ok",
        " $n - fuzz target $t replays its corpus (", scalar(@inputs),
        " inputs)\n";
    unless ($ok) {
        my @lines = split /\n/, $out;
        @lines = @lines[-40 .. -1] if @lines > 40;
        print "# exit code $rc\n", map { "#   $_\n" } @lines;
    }
}
