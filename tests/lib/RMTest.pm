package RMTest;
# RMTest: the harness for remarket's integration tests.
#
# start() builds a throw-away world in a temporary directory: an SMTP sink
# (postfix's smtp-sink) that dumps every message to a file, a fresh
# database and key made by `remarket init`, `remarket serve` on a unix
# socket, and a web server in front of it: nginx by default, or Apache or
# lighttpd (start(server => ...)), each started from the repository's own
# *.conf.example with only its "TEST:" lines rewritten by sed. The
# configuration is passed to every remarket process through REMARKET_*
# environment variables. Every server started here is stopped by stop(),
# which also runs from an END block and from INT/TERM/HUP handlers, so a
# failing or interrupted test leaves nothing running.
#
# Perl core modules only; loopback only.

use strict;
use warnings;
use Exporter 'import';
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use File::Path qw(make_path);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use Digest::SHA qw(hmac_sha256_hex);
use MIME::QuotedPrint qw(decode_qp);
use MIME::Base64 qw(decode_base64);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(sleep time);

our @EXPORT = qw(start stop http sign post_event cli sql counts
  sink_messages wait_sink outbox_messages parse_mail decode_json_or_undef
  table_fingerprint);
our @EXPORT_OK = qw(root bin tmp http_port sink_port base_url free_port
  servers server_available %CONF $TICK_TOKEN $HOOK_SECRET);

our $TICK_TOKEN  = 'tick-secret-123';
our $HOOK_SECRET = 'hook-secret-456';

my $ROOT = abs_path(dirname(__FILE__) . '/../..');
my $BIN  = $ENV{REMARKET_BIN} || "$ROOT/remarket";

my %S;          # state of the running world
my $OWNER = $$; # only the process that loaded us stops servers
our %CONF;      # REMARKET_* variables given to every child

$SIG{PIPE} = 'IGNORE';
for my $sig (qw(INT TERM HUP)) {
    $SIG{$sig} = sub {
        stop() if $$ == $OWNER;
        print STDERR "# RMTest: caught SIG$sig, servers stopped\n";
        exit 130;    # runs END blocks: File::Temp removes the world
    };
}

END {
    my $rc = $?;
    stop() if $$ == $OWNER;
    $? = $rc;
}

sub root      { $ROOT }
sub bin       { $BIN }
sub tmp       { $S{tmp} }
sub http_port { $S{http_port} }
sub sink_port { $S{sink_port} }
sub base_url  { "http://127.0.0.1:$S{http_port}/rm" }

# A port that was free a moment ago on 127.0.0.1.
sub free_port {
    my $s = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp', Listen => 1,
    ) or die "RMTest: cannot bind a port: $!";
    my $p = $s->sockport;
    close $s;
    return $p;
}

sub _slurp {
    my ($path) = @_;
    open my $fh, '<:raw', $path or return undef;
    local $/;
    my $t = <$fh>;
    close $fh;
    return $t;
}

sub _spit {
    my ($path, $text) = @_;
    open my $fh, '>:raw', $path or die "RMTest: cannot write $path: $!";
    print $fh $text;
    close $fh or die "RMTest: cannot write $path: $!";
}

# Fork and exec @cmd with the remarket environment, stdin/stdout/stderr
# from/to the given files, working directory $S{tmp} (so no stray
# ./remarket.conf is read). Returns the pid.
sub _spawn {
    my (%a) = @_;
    my @cmd = @{ $a{cmd} };
    my $pid = fork;
    die "RMTest: fork: $!" unless defined $pid;
    if ($pid == 0) {
        # Own process group so that a ^C on the terminal reaches us first
        # and our handler stops everything in order.
        POSIX::setpgid(0, 0);
        delete @ENV{ grep { /^REMARKET_/ } keys %ENV };
        my %env = (%CONF, %{ $a{env} || {} });
        for my $k (keys %env) {
            if (defined $env{$k}) { $ENV{$k} = $env{$k} } else { delete $ENV{$k} }
        }
        chdir($a{cwd} || $S{tmp} || '/') or POSIX::_exit(126);
        open(STDIN, '<', $a{stdin} // '/dev/null') or POSIX::_exit(126);
        open(STDOUT, '>', $a{stdout} // '/dev/null') or POSIX::_exit(126);
        open(STDERR, '>', $a{stderr} // '/dev/null') or POSIX::_exit(126);
        { no warnings "exec"; exec { $cmd[0] } @cmd; }
        print STDERR "exec $cmd[0]: $!\n";
        POSIX::_exit(127);
    }
    return $pid;
}

sub _alive {
    my ($pid) = @_;
    my $r = waitpid($pid, WNOHANG);
    return $r == 0;
}

# Wait for a pid with a timeout; returns the wait status or undef.
sub _wait_pid {
    my ($pid, $timeout) = @_;
    my $end = time + $timeout;
    while (time < $end) {
        my $r = waitpid($pid, WNOHANG);
        return $? if $r == $pid;
        return undef if $r < 0;
        sleep 0.01;
    }
    return undef;
}

# Stop a child we spawned: TERM, then KILL if it lingers. With $group, also
# whatever is left of its process group (the web servers' own children;
# _spawn made the child a group leader, so the group is ours alone).
sub _kill {
    my ($name, $pid, $group) = @_;
    return unless $pid;
    kill 'TERM', $pid;
    unless (defined _wait_pid($pid, 5)) {
        print STDERR "# RMTest: $name (pid $pid) ignored TERM, sending KILL\n";
        kill 'KILL', $pid;
        _wait_pid($pid, 2);
    }
    return unless $group;
    my $end = time + 3;
    sleep 0.02 while kill(0, -$pid) && time < $end;
    kill 'KILL', -$pid if kill 0, -$pid;
}

sub _start_sink {
    my $tmp = $S{tmp};
    make_path("$tmp/sink");
    # smtp-sink as root must drop privileges (-u); it writes as nobody.
    my $nobody = getpwnam('nobody');
    chown $nobody, -1, "$tmp/sink" if defined $nobody;
    chmod 0777, "$tmp/sink";
    $S{sink_port} = free_port();
    my $sinkbin = -x '/usr/sbin/smtp-sink' ? '/usr/sbin/smtp-sink' : 'smtp-sink';
    my @cmd = ($sinkbin, ($> == 0 ? ('-u', 'nobody') : ()),
        '-d', "$tmp/sink/msg.", "127.0.0.1:$S{sink_port}", '16');
    $S{sink_pid} = _spawn(cmd => \@cmd, stderr => "$tmp/sink.log",
        stdout => "$tmp/sink.log.out");
    my $end = time + 10;
    while (time < $end) {
        die "RMTest: smtp-sink exited: " . (_slurp("$tmp/sink.log") // '')
            unless _alive($S{sink_pid});
        my $c = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $S{sink_port}, Proto => 'tcp', Timeout => 1);
        if ($c) {
            my $banner = <$c>;
            print $c "QUIT\r\n";
            close $c;
            return if defined $banner && $banner =~ /^220/;
        }
        sleep 0.05;
    }
    die "RMTest: smtp-sink did not answer on 127.0.0.1:$S{sink_port}";
}

# The web servers start() can put in front of `remarket serve`. Each one
# runs from the repository's own example configuration, copied with sed
# rewriting only its "TEST:" lines: on nginx and lighttpd the marker ends
# the line it marks; Apache allows no comment after a directive, so there
# the marker is a comment line and the directive follows it.
#   conf   the example file
#   sed    sed expressions, given (prefix dir, port, socket)
#   lines  how many lines the rewrite must change
#   marker 'same': changed lines carry TEST:; 'above': they follow a TEST: line
#   want   strings the rewritten file must then contain
#   bin    the program
#   cmd    its arguments, given (prefix dir, rewritten conf)
#   log    the error log, relative to the prefix dir
my %WEB = (
    nginx => {
        conf   => 'nginx.conf.example',
        bin    => 'nginx',
        sed    => sub { my ($pre, $port, $sock) = @_;
            ("/TEST:/s#server unix:[^;]*;#server unix:$sock;#",
             "/TEST:/s#listen [^;]*;#listen 127.0.0.1:$port;#") },
        lines  => 2,
        marker => 'same',
        want   => sub { my ($pre, $port, $sock) = @_;
            ("server unix:$sock;", "listen 127.0.0.1:$port;") },
        cmd    => sub { my ($pre, $conf) = @_;
            ('-p', "$pre/", '-c', $conf, '-e', "$pre/startup.log") },
        log    => 'error.log',
    },
    apache => {
        conf   => 'apache.conf.example',
        bin    => 'apache2',
        sed    => sub { my ($pre, $port, $sock) = @_;
            ("/# TEST:/{n;s#^ServerRoot .*#ServerRoot \"$pre\"#;"
             . "s#^Listen .*#Listen 127.0.0.1:$port#;"
             . "s#\"unix:[^|\"]*|#\"unix:$sock|#;}") },
        lines  => 3,
        marker => 'above',
        want   => sub { my ($pre, $port, $sock) = @_;
            ("\nServerRoot \"$pre\"\n", "\nListen 127.0.0.1:$port\n",
             "ProxyPass \"unix:$sock|fcgi://") },
        cmd    => sub { my ($pre, $conf) = @_;
            ('-f', $conf, '-DFOREGROUND') },
        log    => 'error.log',
        dirs   => [qw(html run)],
    },
    lighttpd => {
        conf   => 'lighttpd.conf.example',
        bin    => 'lighttpd',
        sed    => sub { my ($pre, $port, $sock) = @_;
            ("/TEST:/s#^var.prefix = \"[^\"]*\"#var.prefix = \"$pre\"#",
             "/TEST:/s#^server.port = [0-9]*#server.port = $port#",
             "/TEST:/s#\"socket\" => \"[^\"]*\"#\"socket\" => \"$sock\"#") },
        lines  => 3,
        marker => 'same',
        want   => sub { my ($pre, $port, $sock) = @_;
            ("var.prefix = \"$pre\"", "server.port = $port ", "\"socket\" => \"$sock\"") },
        cmd    => sub { my ($pre, $conf) = @_;
            ('-D', '-f', $conf) },
        log    => 'error.log',
        dirs   => [qw(html tmp)],
        # As root lighttpd drops to www-data before it opens its error log.
        owner  => 'www-data',
    },
);

sub servers { sort keys %WEB }

# The path of a web server's program, or undef when it is not installed
# (nginx, apache2 and lighttpd are in /usr/sbin on Debian, which a
# non-root PATH may lack).
sub server_available {
    my ($name) = @_;
    my $w = $WEB{$name} or return undef;
    for my $d (split(/:/, $ENV{PATH} // ''), '/usr/sbin', '/sbin') {
        return "$d/$w->{bin}" if length $d && -f "$d/$w->{bin}" && -x _;
    }
    return undef;
}

sub _web_conf {
    my ($w) = @_;
    my $tmp  = $S{tmp};
    my $pre  = $S{web_prefix};
    my $src  = "$ROOT/$w->{conf}";
    my $dst  = "$tmp/$S{web}.conf";
    -r $src or die "RMTest: $src is missing";
    my @args = ($pre, $S{http_port}, $S{sock});
    my @sed = ('sed', (map { ('-e', $_) } $w->{sed}->(@args)), $src);
    my $pid = _spawn(cmd => \@sed, stdout => $dst, stderr => "$tmp/sed.err", cwd => $ROOT);
    my $st = _wait_pid($pid, 10);
    die "RMTest: sed failed: " . (_slurp("$tmp/sed.err") // '') unless defined $st && $st == 0;
    my @a = split /\n/, _slurp($src), -1;
    my @b = split /\n/, _slurp($dst), -1;
    die "RMTest: sed changed the line count of $w->{conf}" unless @a == @b;
    my @changed = grep { $a[$_] ne $b[$_] } 0 .. $#a;
    my @unmarked = $w->{marker} eq 'above'
        ? grep { $_ == 0 || $a[$_ - 1] !~ /^\s*#.*TEST:/ } @changed
        : grep { $a[$_] !~ /TEST:/ } @changed;
    die "RMTest: expected exactly $w->{lines} TEST: lines of $w->{conf} rewritten, got "
        . scalar(@changed) . (@unmarked ? ', ' . scalar(@unmarked) . ' of them unmarked' : '')
        unless @changed == $w->{lines} && !@unmarked;
    my $conf = _slurp($dst);
    for my $want ($w->{want}->(@args)) {
        die "RMTest: $w->{conf}: a TEST: line was not rewritten (no '$want')"
            unless index($conf, $want) >= 0;
    }
    return $dst;
}

sub _start_web {
    my ($name) = @_;
    my $w = $WEB{$name} or die "RMTest: unknown server '$name' (nginx, apache, lighttpd)";
    my $tmp = $S{tmp};
    my $pre = $S{web_prefix} = "$tmp/$name";
    my @dirs = map { "$pre/$_" } @{ $w->{dirs} || ['tmp', 'html'] };
    make_path($pre, @dirs);
    chmod 0755, $pre, @dirs;
    if ($w->{owner} && $> == 0) {
        my ($uid, $gid) = (getpwnam($w->{owner}))[2, 3];
        chown $uid, $gid, $pre, @dirs if defined $uid;
    }
    my $bin = server_available($name) // $w->{bin};
    my $conf = _web_conf($w);
    $S{web_log} = "$pre/$w->{log}";
    $S{web_pid} = _spawn(cmd => [ $bin, $w->{cmd}->($pre, $conf) ],
        stdout => "$tmp/$name.out", stderr => "$tmp/$name.err");
}

# Start the whole world. Options:
#   smtp   => 0     leave smtp_url empty: mail goes to $tmp/outbox
#   env    => {...} extra/overriding REMARKET_* variables
#   server => 'nginx' (default), 'apache' or 'lighttpd': the web server in
#             front, run from its *.conf.example
sub start {
    my (%o) = @_;
    stop() if $S{tmp};
    my $server = $o{server} // 'nginx';
    die "RMTest: unknown server '$server' (" . join(', ', servers()) . ")\n"
        unless $WEB{$server};
    -x $BIN or die "RMTest: $BIN is not built (run make)";
    my $tmp = tempdir('remarket-test-XXXXXX', TMPDIR => 1,
        CLEANUP => !$ENV{RMTEST_KEEP});
    chmod 0755, $tmp;
    %S = (tmp => $tmp, web => $server);
    print STDERR "# RMTest: world in $tmp\n" if $ENV{RMTEST_KEEP};
    $S{http_port} = free_port();
    $S{sock} = "$tmp/remarket.sock";
    my $smtp = exists $o{smtp} ? $o{smtp} : 1;
    _start_sink() if $smtp;
    my $hp = $S{http_port};
    %CONF = (
        REMARKET_DB             => "$tmp/rm.db",
        REMARKET_KEY_FILE       => "$tmp/rm.key",
        REMARKET_BASE_URL       => "http://127.0.0.1:$hp/rm",
        REMARKET_STORE_URL      => "http://127.0.0.1:$hp",
        REMARKET_CART_URL       => "http://127.0.0.1:$hp/cart?restore={cart}&code={code}",
        REMARKET_SMTP_URL       => $smtp ? "smtp://127.0.0.1:$S{sink_port}" : '',
        REMARKET_OUTBOX         => "$tmp/outbox",
        REMARKET_FROM           => 'Maison Test <shop@example.com>',
        REMARKET_TICK_TOKEN     => $TICK_TOKEN,
        REMARKET_HOOK_SECRET    => $HOOK_SECRET,
        REMARKET_POSTAL_ADDRESS => '1 Test Street, 75000 Paris',
        REMARKET_TEMPLATES      => "$ROOT/templates",
        REMARKET_STATIC_DIR     => "$ROOT/static",
        # a real relay (smtp-sink) with loopback links: tests only
        REMARKET_ALLOW_INSECURE_LINKS => 'yes',
        %{ $o{env} || {} },
    );
    make_path("$tmp/outbox");

    my ($rc, $out, $err) = cli('init');
    die "RMTest: remarket init exited $rc: $err" unless $rc == 0;
    # The scenarios follow named shoppers through every step: no control
    # group here (holdouts have their own tests: unit.c, 70-report.t).
    for my $flow (qw(abandoned_cart winback post_purchase)) {
        ($rc, $out, $err) = cli("flows", "holdout", $flow, $o{holdout} // 0);
        die "RMTest: remarket flows holdout exited $rc: $err" unless $rc == 0;
    }

    $S{serve_pid} = _spawn(cmd => [ $BIN, 'serve', $S{sock} ],
        stdout => "$tmp/serve.out", stderr => "$tmp/serve.log");
    my $end = time + 10;
    until (-S $S{sock}) {
        die "RMTest: remarket serve exited: " . (_slurp("$tmp/serve.log") // '')
            unless _alive($S{serve_pid});
        die "RMTest: remarket serve made no socket at $S{sock}" if time > $end;
        sleep 0.02;
    }

    _start_web($server);
    $end = time + 15;
    my $last;
    while (1) {
        die "RMTest: $server exited: " . (_slurp("$tmp/$server.err") // '')
            . (_slurp("$S{web_prefix}/startup.log") // '')
            . (_slurp($S{web_log}) // '')
            unless _alive($S{web_pid});
        $last = http('GET', '/rm/health');
        last if $last->{status} == 200 && $last->{content} =~ /\Aok\r?\n?\z/;
        if (time > $end) {
            die "RMTest: GET /rm/health never answered 200 ok (last: $last->{status} "
                . substr($last->{content} // '', 0, 200) . ")\n"
                . "$server error.log: " . (_slurp($S{web_log}) // '') . "\n"
                . "serve.log: " . (_slurp("$tmp/serve.log") // '');
        }
        sleep 0.05;
    }
    return $tmp;
}

sub stop {
    return unless $S{tmp};
    _kill($S{web}, delete $S{web_pid}, 'group');
    _kill('remarket serve', delete $S{serve_pid});
    _kill('smtp-sink', delete $S{sink_pid});
    if ($ENV{RMTEST_VERBOSE}) {
        for my $log ('serve.log', "$S{web}/error.log", 'sink.log') {
            my $t = _slurp("$S{tmp}/$log");
            print STDERR "# --- $log ---\n$t" if defined $t && length $t;
        }
    }
    %S = ();
}

# http($method, $path, $body, \%headers) -> {status, headers, content}
# $path is relative to the server (e.g. "/rm/health") or a full URL.
sub http {
    my ($method, $path, $body, $hdr) = @_;
    my $url = $path =~ m{^https?://} ? $path : "http://127.0.0.1:$S{http_port}$path";
    my $ua = HTTP::Tiny->new(max_redirect => 0, timeout => 20,
        agent => 'remarket-tests/1', keep_alive => 0);
    my %opt = (headers => { %{ $hdr || {} } });
    $opt{content} = $body if defined $body;
    my $r = $ua->request($method, $url, \%opt);
    return { status => $r->{status}, headers => $r->{headers} || {},
        content => $r->{content} // '', reason => $r->{reason} };
}

sub sign {
    my ($body, $t, $secret) = @_;
    $t //= int(time);
    return "t=$t,v1=" . hmac_sha256_hex("$t.$body", $secret // $HOOK_SECRET);
}

# post_event($json, t => T, sig => HEADER|undef, ctype => TYPE, secret => S)
sub post_event {
    my ($json, %o) = @_;
    my %h = ('Content-Type' => exists $o{ctype} ? $o{ctype} : 'application/json');
    delete $h{'Content-Type'} unless defined $h{'Content-Type'};
    my $sig = exists $o{sig} ? $o{sig} : sign($json, $o{t}, $o{secret});
    $h{'X-Remarket-Signature'} = $sig if defined $sig;
    return http('POST', $o{path} || '/rm/events', $json, \%h);
}

# cli(@args [, {stdin => TEXT, env => {...}, timeout => S}])
#   -> (exit code, stdout, stderr); a signal gives 128+signo.
my $cli_n = 0;
sub cli {
    my @args = @_;
    my $o = ref $args[-1] eq 'HASH' ? pop @args : {};
    my $dir = $S{tmp} or die "RMTest: cli() before start()";
    $cli_n++;
    my ($in, $out, $err) = map { "$dir/cli.$cli_n.$_" } qw(in out err);
    _spit($in, $o->{stdin} // '');
    my $pid = _spawn(cmd => [ $BIN, @args ], stdin => $in, stdout => $out,
        stderr => $err, env => $o->{env});
    my $st = _wait_pid($pid, $o->{timeout} || 60);
    unless (defined $st) {
        kill 'KILL', $pid;
        _wait_pid($pid, 2);
        return (124, _slurp($out) // '', (_slurp($err) // '') . "\n[RMTest: timed out]");
    }
    my $rc = WIFEXITED($st) ? WEXITSTATUS($st) : 128 + WTERMSIG($st);
    my @r = ($rc, _slurp($out) // '', _slurp($err) // '');
    unlink $in, $out, $err;
    return @r;
}

sub sql {
    my ($q) = @_;
    my $db = $CONF{REMARKET_DB} or die "RMTest: sql() before start()";
    open my $fh, '-|', 'sqlite3', '-batch', '-cmd', '.timeout 5000', $db, $q
        or die "RMTest: sqlite3: $!";
    local $/;
    my $o = <$fh> // '';
    close $fh;
    $o =~ s/\A\s+|\s+\z//g;
    return $o;
}

# counts(qw(events contacts carts)) -> {events => N, ...}
sub counts {
    my @t = @_ ? @_ : qw(events contacts carts);
    return { map { $_ => sql("SELECT count(*) FROM $_") } @t };
}

# Row counts of every table: "name=N,name=N,..."
sub table_fingerprint {
    my @t = split /\n/, sql("SELECT name FROM sqlite_master WHERE type='table' "
        . "AND name NOT LIKE 'sqlite_%' ORDER BY name");
    return join ',', map { "$_=" . sql(qq{SELECT count(*) FROM "$_"}) } @t;
}

sub _dir_texts {
    my ($dir, $pat) = @_;
    opendir my $dh, $dir or return ();
    my @f = map { "$dir/$_" } grep { !/^\./ && /$pat/ } readdir $dh;
    closedir $dh;
    @f = sort { (stat $a)[9] <=> (stat $b)[9] || $a cmp $b } @f;
    return map { _slurp($_) } @f;
}

sub sink_messages { _dir_texts("$S{tmp}/sink", qr/^msg\./) }

sub outbox_messages { _dir_texts("$S{tmp}/outbox", qr/\.eml$/) }

# Wait until the sink holds at least $n messages (or $timeout s pass);
# returns the messages. With $n == current count it settles briefly.
sub wait_sink {
    my ($n, $timeout) = @_;
    my $end = time + ($timeout // 3);
    my @m;
    while (1) {
        @m = sink_messages();
        last if @m >= $n || time > $end;
        sleep 0.05;
    }
    return @m;
}

sub decode_json_or_undef {
    my ($t) = @_;
    my $v = eval { JSON::PP->new->decode($t) };
    return $v;
}

sub _parse_headers {
    my ($block) = @_;
    $block =~ s/\n[ \t]+/ /g;    # unfold
    my (%h, @order);
    for my $line (split /\n/, $block) {
        next unless $line =~ /^([!-9;-~]+):[ \t]*(.*)$/;
        push @{ $h{ lc $1 } }, $2;
        push @order, [ $1, $2 ];
    }
    return (\%h, \@order);
}

sub _param {
    my ($value, $name) = @_;
    return $1 if $value =~ /;\s*\Q$name\E="([^"]*)"/i;
    return $1 if $value =~ /;\s*\Q$name\E=([^;\s]+)/i;
    return undef;
}

sub _parse_entity {
    my ($text, $parts) = @_;
    my ($head, $body) = split /\n\n/, $text, 2;
    $body //= '';
    my ($h) = _parse_headers($head);
    my $ct  = $h->{'content-type'} ? $h->{'content-type'}[0] : 'text/plain';
    my $cte = $h->{'content-transfer-encoding'} ? lc $h->{'content-transfer-encoding'}[0] : '7bit';
    if ($ct =~ m{^multipart/}i) {
        my $b = _param($ct, 'boundary');
        return unless defined $b;
        my (@chunks, $cur);
        for my $line (split /\n/, $body, -1) {
            if ($line =~ /^--\Q$b\E(--)?[ \t]*$/) {
                my $closing = $1;
                push @chunks, $cur if defined $cur;
                $cur = $closing ? undef : '';
                last if $closing;
                next;
            }
            $cur .= "$line\n" if defined $cur;
        }
        push @chunks, $cur if defined $cur;
        for my $c (@chunks) {
            $c =~ s/\n\z//;    # the newline before a boundary is the boundary's
            _parse_entity($c, $parts);
        }
        return;
    }
    my $dec = $cte =~ /quoted-printable/ ? decode_qp($body)
            : $cte =~ /base64/ ? decode_base64($body) : $body;
    push @$parts, { type => lc(($ct =~ /^([^;\s]+)/)[0]), headers => $h,
        cte => $cte, body => $dec, raw => $body };
}

# parse_mail($text) -> {h => {lcname => [values]}, header => sub, parts,
#                       text, html}
sub parse_mail {
    my ($text) = @_;
    $text =~ s/\r\n/\n/g;
    my ($head) = split /\n\n/, $text, 2;
    my ($h, $order) = _parse_headers($head);
    my @parts;
    _parse_entity($text, \@parts);
    my ($tp) = grep { $_->{type} eq 'text/plain' } @parts;
    my ($hp) = grep { $_->{type} eq 'text/html' } @parts;
    return {
        h      => $h,
        order  => $order,
        header => sub { my $v = $h->{ lc $_[0] }; $v ? $v->[0] : undef },
        parts  => \@parts,
        text   => $tp ? $tp->{body} : undef,
        html   => $hp ? $hp->{body} : undef,
        raw    => $text,
    };
}

1;
