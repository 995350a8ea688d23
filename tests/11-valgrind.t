#!/usr/bin/perl
# 11-valgrind.t: runs the unit tests once more, unsanitized (ASan binaries
# cannot run under valgrind), under valgrind's memcheck: no invalid read or
# write, no use of uninitialised memory, no definite or indirect leak.
# $VALGRIND_UNIT overrides the binary (default build/plain/unit).
use strict;
use warnings;
use FindBin;
use Cwd qw(abs_path);
use File::Spec;

my $root = abs_path("$FindBin::Bin/..");
chdir $root or die "cannot chdir to $root: $!";
$| = 1;

my ($valgrind) = grep { -x } map { File::Spec->catfile($_, 'valgrind') }
    File::Spec->path;
unless ($valgrind) {
    print "1..0 # SKIP valgrind not installed\n";
    exit 0;
}
my $bin = $ENV{VALGRIND_UNIT} || "build/plain/unit";
$bin = "$root/$bin" unless $bin =~ m{^/};

print "1..2\n";
unless (-x $bin) {
    print "not ok 1 - unit tests pass under valgrind\n";
    print "# $bin is not built: run make check\n";
    print "not ok 2 - valgrind reports no errors or leaks\n";
    exit 1;
}

$ENV{RM_TEMPLATES} ||= "$root/templates";
my @cmd = ($valgrind, '--leak-check=full',
    '--errors-for-leak-kinds=definite,indirect', '--error-exitcode=99', '-q',
    $bin);

# stdout and stderr together, in order
my $pid = open(my $fh, '-|');
die "fork: $!" unless defined $pid;
if ($pid == 0) {
    open(STDERR, '>&', \*STDOUT) or die "dup: $!";
    exec { $cmd[0] } @cmd or die "exec $cmd[0]: $!";
}
my $out = do { local $/; <$fh> } // '';
close $fh;
my $status = $?;
my $rc = $status & 127 ? 128 + ($status & 127) : $status >> 8;

sub diag_output {
    print "# exit code $rc\n";
    print map { "#   $_\n" } split /\n/, $out;
}

# A failed unit test exits 1; valgrind's own findings exit 99 and hide the
# unit exit code, so the TAP stream decides then.
my $plan_seen = $out =~ /^1\.\.[1-9]\d*$/m;
my $not_ok = $out =~ /^not ok /m;
my $unit_ok = $rc == 0 || ($rc == 99 && $plan_seen && !$not_ok);
print $unit_ok ? "ok 1" : "not ok 1", " - unit tests pass under valgrind\n";
diag_output() unless $unit_ok;

my $vg_ok = $rc != 99 && $out !~ /ERROR SUMMARY: [1-9]/ && $out !~ /definitely lost/
    && $out !~ /indirectly lost: [1-9]/;
print $vg_ok ? "ok 2" : "not ok 2", " - valgrind reports no errors or leaks\n";
if (!$vg_ok) {
    my @vg = grep { /^==\d+==/ } split /\n/, $out;
    print map { "#   $_\n" } @vg ? @vg : split /\n/, $out;
}
exit($unit_ok && $vg_ok ? 0 : 1);
