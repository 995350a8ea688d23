#!/usr/bin/perl
# 25-webservers.t: the integration scenario of 20-integration.t (ann's
# abandoned cart, end to end, plus /collect, a bad signature, a 405 with
# Allow, bodies too large and the one-click unsubscribe) through Apache
# (mod_proxy_fcgi, apache.conf.example) and lighttpd (mod_fastcgi,
# lighttpd.conf.example), each started from its example file with only the
# "TEST:" lines rewritten. The scenario itself is lib/RMScenario.pm; nginx
# runs it in 20-integration.t.
#
# A web server that is not installed is skipped, with the package to
# install (scripts/deps.sh test installs both).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use RMTest qw(:DEFAULT bin server_available);
use RMScenario;

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

my %package = (apache => 'apache2', lighttpd => 'lighttpd');

for my $server (qw(apache lighttpd)) {
    SKIP: {
        skip "$server is not installed (apt-get install $package{$server})", 1
            unless server_available($server);
        # A server that does not start fails its subtest, not the file:
        # the other one still runs.
        subtest "the integration scenario through $server" => sub {
            eval { server_scenario($server); 1 } or do {
                fail("$server: the scenario died");
                diag $@;
                stop();
            };
        };
    }
}

done_testing();
