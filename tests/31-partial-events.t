#!/usr/bin/perl
# 31-partial-events.t: POST /events?partial=1 through the real nginx, and
# `remarket event --partial`: the good events of a batch are stored, the
# bad ones are listed by index; without it one bad event refuses all.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use RMTest qw(:DEFAULT bin);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();
start();
my $J = JSON::PP->new->canonical;
my $now = time();
sub ord_ev {
    my ($id, $email) = @_;
    return { type => 'order', order_id => $id, email => $email, total => 10,
        ts => $now, items => [ { sku => 'A', name => 'A', price => 10 } ] };
}
my $batch = $J->encode([ ord_ev('p1', 'a@example.com'), ord_ev('p2', 'not an email'),
    ord_ev('p3', 'c@example.com'), { type => 'nonsense' } ]);

my $r = post_event($batch);
is($r->{status}, 400, 'without partial: one bad event refuses the batch');
is(sql("SELECT count(*) FROM orders"), '0', '... and nothing is stored');

$r = post_event($batch, path => '/rm/events?partial=2');
is($r->{status}, 400, 'partial=2 is refused');
like($r->{content}, qr/partial: must be 1/, '... naming the parameter');

$r = post_event($batch, path => '/rm/events?partial=1');
is($r->{status}, 202, 'partial=1: 202');
my $a = eval { $J->decode($r->{content}) } || {};
is($a->{accepted}, 2, 'the two good events are accepted');
is($a->{duplicates}, 0, 'no duplicates');
is_deeply([ map { $_->{index} } @{ $a->{refused} || [] } ], [ 1, 3 ],
    'the bad ones are listed by index');
like($a->{refused}[0]{error} // '', qr/^email/, 'with the reason');
is(sql("SELECT group_concat(order_key) FROM (SELECT order_key FROM orders ORDER BY 1)"),
    'p1,p3', 'the good orders are stored');

$r = post_event($batch, path => '/rm/events?partial=1');
$a = eval { $J->decode($r->{content}) } || {};
is($a->{duplicates}, 2, 'again: the good ones are duplicates');

my ($rc, $out, $err) = cli('event', '--partial', { stdin => $J->encode(
    [ ord_ev('p4', 'd@example.com'), ord_ev('p5', '') ]) });
is($rc, 0, 'remarket event --partial exits 0');
$a = eval { $J->decode($out) } || {};
is($a->{accepted}, 1, '... stores the good event');
is_deeply([ map { $_->{index} } @{ $a->{refused} || [] } ], [1], '... lists the bad one');

# a refund of an order remarket has not recorded: refused alone
$r = post_event($J->encode([ { type => 'refund', order_id => 'none', amount => 5, ts => $now },
    ord_ev('p6', 'e@example.com') ]), path => '/rm/events?partial=1');
is($r->{status}, 202, 'partial=1 with a refund of no order: 202');
$a = eval { $J->decode($r->{content}) } || {};
is($a->{accepted}, 1, '... the order beside it is stored');
is_deeply([ map { $_->{index} } @{ $a->{refused} || [] } ], [0], '... the refund is listed');
like($a->{refused}[0]{error} // '', qr/^order_id: a refund of an order/, '... with the reason');
stop();
done_testing();
