#!/usr/bin/perl
# 35-boundary.t: the FastCGI boundary as a web server and a local user
# see it. The world runs behind nginx (nginx.conf.example) with
# trusted_proxies = 127.0.0.1 and a fixed clock. Checked here:
#   - the socket is mode 0660, group www-data (socket_group's default), and
#     a local user outside that group cannot connect (when run as root),
#     and a socket_group that does not exist stops `remarket serve`;
#   - a raw FastCGI client (the honest way to leave a parameter out) sends
#     requests without REQUEST_METHOD, with it empty, with odd lengths:
#     each gets a JSON 400 naming the parameter, and the server lives on;
#   - the same in CGI mode: exit status 0, a 400, no SIGSEGV;
#   - /report from loopback needs the token or `remarket report --link`;
#   - through nginx, a noisy client (X-Forwarded-For from the trusted
#     proxy) gets 429 on /discounts/validate while another does not.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::UNIX;
use Socket qw(SOCK_STREAM);
use POSIX ();
use RMTest qw(:DEFAULT bin tmp http_port $TICK_TOKEN);

plan skip_all => "remarket is not built (" . bin() . "); run make" unless -x bin();

my $T0 = 1795000000;
start(env => { REMARKET_TRUSTED_PROXIES => '127.0.0.1', REMARKET_RATE_IP_PER_MIN => 5,
    REMARKET_NOW => $T0 });
my $sock = tmp() . '/remarket.sock';

# ---- the socket: 0660, the web server's group ----
my @st = stat $sock;
is(sprintf('%04o', $st[2] & 07777), '0660', 'the socket is mode 0660');
my $www = getgrnam('www-data');
SKIP: {
    skip 'no www-data group here', 1 unless defined $www;
    is($st[5], $www, 'the socket belongs to group www-data (socket_group default)');
}
SKIP: {
    skip 'not root: cannot try as another user', 1 unless $> == 0;
    my $nobody = getpwnam('nobody');
    skip 'no user nobody', 1 unless defined $nobody;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $gid = getgrnam('nogroup') // 65534;
        POSIX::setgid($gid);
        $) = "$gid $gid";
        POSIX::setuid($nobody);
        my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $sock);
        POSIX::_exit($c ? 0 : 1);
    }
    waitpid $pid, 0;
    is($? >> 8, 1, 'a local user outside the group cannot connect to the socket');
}
{
    my ($rc, undef, $err) = cli('serve', tmp() . '/other.sock',
        { timeout => 10, env => { REMARKET_SOCKET_GROUP => 'no-such-group-rm' } });
    is($rc, 1, 'serve with a socket_group that does not exist stops');
    like($err, qr/socket_group 'no-such-group-rm': no such group/, '... naming it') or diag $err;
    ok(!-e tmp() . '/other.sock', '... and leaves no socket behind');
}

# ---- a raw FastCGI client ----
sub fcgi_record {
    my ($type, $content) = @_;
    return pack('CCnnCC', 1, $type, 1, length $content, 0, 0) . $content;
}

sub fcgi_len { my $l = shift; $l < 128 ? pack('C', $l) : pack('N', $l | 0x80000000) }

# fcgi(\@params, $stdin): @params are [NAME, value] pairs, sent as given.
# Returns the response (Status line, headers, body) or undef when the
# server closed the connection or did not answer within 10 s.
sub fcgi {
    my ($params, $stdin) = @_;
    $stdin //= '';
    my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $sock)
        or return undef;
    my $p = join '', map { fcgi_len(length $_->[0]) . fcgi_len(length $_->[1]) . $_->[0] . $_->[1] } @$params;
    my $req = fcgi_record(1, pack('nCx5', 1, 0));
    $req .= fcgi_record(4, $p) if length $p;
    $req .= fcgi_record(4, '');
    $req .= fcgi_record(5, $stdin) if length $stdin;
    $req .= fcgi_record(5, '');
    print $s $req;
    my ($out, $ended) = ('', 0);
    eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm 10;
        while (1) {
            my $hdr = '';
            last unless read($s, $hdr, 8) == 8;
            my (undef, $type, undef, $len, $pad) = unpack('CCnnC', $hdr);
            my $body = '';
            read($s, $body, $len + $pad) if $len + $pad;
            $out .= substr($body, 0, $len) if $type == 6;
            if ($type == 3) { $ended = 1; last }
        }
        alarm 0;
    };
    alarm 0;
    close $s;
    return $ended ? $out : undef;
}

my @base = ([REMOTE_ADDR => '127.0.0.1'], [GATEWAY_INTERFACE => 'CGI/1.1']);
for my $path ('/onsite', '/collect', '/u/abc', '/health') {
    my $r = fcgi([ @base, [PATH_INFO => $path] ]);
    like($r // 'no answer', qr/\AStatus: 400 .*"error":"REQUEST_METHOD: missing/s,
        "FastCGI $path without REQUEST_METHOD: a JSON 400 naming it");
}
for my $i (1 .. 5) {
    my $r = fcgi([ @base, [REQUEST_METHOD => ''], [PATH_INFO => '/health'] ]);
    like($r // 'no answer', qr/\AStatus: 400 .*REQUEST_METHOD: empty/s,
        "FastCGI with REQUEST_METHOD empty ($i of 5): 400");
}
for my $c ([PATH_INFO => "/r/\x01"], [CONTENT_LENGTH => 'abc'], [QUERY_STRING => 'x' x 9000],
    [REMOTE_ADDR => 'nowhere'], [HTTP_COOKIE => "a\nb"]) {
    # the first of two same names counts (libfcgi): the bad one goes first
    my $r = fcgi([ $c, [REQUEST_METHOD => 'GET'], [PATH_INFO => '/health'], @base ]);
    like($r // 'no answer', qr/\AStatus: 400 .*"error":"$c->[0]: invalid/s, "FastCGI with a bad $c->[0]: 400 naming it");
}
my $ok = fcgi([ [REQUEST_METHOD => 'GET'], [PATH_INFO => '/health'], @base ]);
like($ok // 'no answer', qr/\AStatus: 200 .*\r\n\r\nok\n\z/s, 'the server lives on: GET /health -> 200');
is(http('GET', '/rm/health')->{status}, 200, '... and nginx still reaches it');

# ---- CGI mode: a crafted environment ----
for my $m ([missing => undef], [empty => '']) {
    for my $path ('/onsite', '/collect', '/u/abc') {
        my ($rc, $out, $err) = cli({ timeout => 10, env => { GATEWAY_INTERFACE => 'CGI/1.1',
            REQUEST_METHOD => $m->[1], PATH_INFO => $path, REMOTE_ADDR => '127.0.0.1' } });
        is($rc, 0, "CGI $path, REQUEST_METHOD $m->[0]: exit status 0") or diag $err;
        like($out, qr/\AStatus: 400 .*REQUEST_METHOD/s, '... and a 400 naming REQUEST_METHOD');
    }
}

# ---- the report: no loopback exception ----
my $r = http('GET', '/rm/report');
is($r->{status}, 401, 'GET /rm/report from 127.0.0.1 without a token -> 401');
like($r->{headers}{'www-authenticate'} // '', qr/Basic/, '... asking for Basic auth');
is(http('GET', '/rm/report.json')->{status}, 401, 'GET /rm/report.json too');
$r = http('GET', '/rm/report.json', undef, { Authorization => "Bearer $TICK_TOKEN" });
is($r->{status}, 200, '... 200 with the tick token');
my ($rc, $link) = cli('report', '--link', '--now', $T0);
my $port = http_port();
like($link, qr{\Ahttp://127\.0\.0\.1:$port/rm/report\?t=[A-Za-z0-9_-]+\n\z}, 'remarket report --link prints a URL');
chomp $link;
$r = http('GET', $link);
is($r->{status}, 200, 'the link opens the report in a browser');
like($r->{headers}{'content-type'} // '', qr{text/html}, '... as HTML');
is($r->{headers}{'referrer-policy'}, 'no-referrer', '... that keeps the link out of Referer headers');
($rc, undef, my $err) = cli('report', '--link', '--days', '0');
is($rc, 2, 'report --link --days 0 is refused') or diag $err;

# ---- rate limits key on the client behind the trusted proxy ----
my $body = '{"code":"RM-AAAA-BBBB","total":10}';
my %h = ('Content-Type' => 'application/json');
my @noisy = map { http('POST', '/rm/discounts/validate', $body, { %h, 'X-Forwarded-For' => '203.0.113.5' })->{status} } 1 .. 7;
is(join(',', @noisy), '200,200,200,200,200,429,429', 'a noisy client gets 429 after 5 a minute');
$r = http('POST', '/rm/discounts/validate', $body, { %h, 'X-Forwarded-For' => '203.0.113.6' });
is($r->{status}, 200, "another client's checkout is still answered");
like($r->{content}, qr/"valid":false/, '... with the verdict on its code');
$r = http('POST', '/rm/discounts/validate', $body, { %h, 'X-Forwarded-For' => '198.51.100.1, 203.0.113.5' });
is($r->{status}, 429, 'the noisy client cannot hide behind an X-Forwarded-For of its own');

stop();
done_testing();
