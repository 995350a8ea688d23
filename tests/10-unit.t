#!/usr/bin/perl
# 10-unit.t: runs the C unit tests (tests/unit.c, built with the sanitizers
# by `make check` as build/san/unit) and passes their TAP through to prove.
# $UNIT_BIN overrides the binary. A missing binary is a loud failure, not a
# skip: a green run must mean the unit tests ran.
use strict;
use warnings;
use FindBin;
use Cwd qw(abs_path);

my $root = abs_path("$FindBin::Bin/..");
chdir $root or die "cannot chdir to $root: $!";
my $bin = $ENV{UNIT_BIN} || "build/san/unit";
$bin = "$root/$bin" unless $bin =~ m{^/};

unless (-x $bin) {
    print "Bail out! unit binary not built ($bin): run make check\n";
    exit 1;
}
$ENV{RM_TEMPLATES} ||= "$root/templates";
$| = 1;
exec { $bin } $bin
    or do { print "Bail out! cannot run $bin: $!\n"; exit 1 };
