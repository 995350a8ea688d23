package RMBrowser;
# RMBrowser: the demo shop and a real browser around an RMTest world.
#
#   my %env = RMBrowser::shop_env();       # before RMTest::start
#   start(smtp => 0, env => \%env);        # RMTest: remarket serve + nginx
#   RMBrowser::start_shop();               # backend.py + a second nginx
#   my $b = RMBrowser::browser();          # chromedriver + headless Chromium
#   $b->get('/'); $b->click('button.add'); $b->screenshot($file);
#
# The shop is served by a second nginx started from demo/nginx-demo.conf
# (the shop at /, demo/backend.py at /api/, remarket at /rm/ on RMTest's
# socket), so the shop, its backend and remarket share one origin, as in
# production. Chromium is driven through the W3C WebDriver HTTP API of
# chromedriver with HTTP::Tiny and JSON::PP. Everything started here is
# stopped by stop(), from an END block too. Perl core modules only.

use strict;
use warnings;
use File::Temp qw(tempdir);
use File::Path qw(make_path);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP ();
use MIME::Base64 qw(decode_base64);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(sleep time);
use RMTest ();

our $CHROMIUM     = $ENV{RM_CHROMIUM}     || '/usr/bin/chromium';
our $CHROMEDRIVER = $ENV{RM_CHROMEDRIVER} || '/usr/bin/chromedriver';

my %S;            # running pieces: pids, ports, dirs
my $OWNER = $$;
my $J = JSON::PP->new->utf8->canonical->allow_nonref;

END {
    my $rc = $?;
    stop() if $$ == $OWNER;
    $? = $rc;
}

sub _python {
    for my $p ('/usr/bin/python3', split /:/, $ENV{PATH} // '') {
        my $f = $p =~ m{python3$} ? $p : "$p/python3";
        return $f if -x $f;
    }
    return undef;
}

# Why the browser tests cannot run here, or undef.
sub missing {
    return "$CHROMIUM is not installed (apt-get install chromium)" unless -x $CHROMIUM;
    return "$CHROMEDRIVER is not installed (apt-get install chromium-driver)"
        unless -x $CHROMEDRIVER;
    return "python3 is not installed" unless _python();
    return "nginx is not installed" unless -x '/usr/sbin/nginx' || grep { -x "$_/nginx" }
        split /:/, $ENV{PATH} // '';
    return undef;
}

sub shop_port { $S{shop_port} }
sub shop_url  { "http://127.0.0.1:$S{shop_port}" . ($_[0] // '') }

# REMARKET_* settings for RMTest::start so that every link, cookie and
# CORS check is about the shop's origin. Reserves the shop's port.
sub shop_env {
    $S{shop_port} = RMTest::free_port();
    my $shop = "http://127.0.0.1:$S{shop_port}";
    return (
        REMARKET_BASE_URL   => "$shop/rm",
        REMARKET_STORE_URL  => $shop,
        REMARKET_CART_URL   => "$shop/cart?restore={cart}&code={code}",
        REMARKET_STATIC_DIR => RMTest::root() . '/static',
    );
}

sub _slurp {
    my ($path) = @_;
    open my $fh, '<:raw', $path or return '';
    local $/;
    my $t = <$fh>;
    return $t // '';
}

# fork + exec in its own process group; %env replaces REMARKET_*.
sub _spawn {
    my (%a) = @_;
    my $pid = fork;
    die "RMBrowser: fork: $!" unless defined $pid;
    if ($pid == 0) {
        POSIX::setpgid(0, 0);
        delete @ENV{ grep { /^REMARKET_/ } keys %ENV };
        my %env = (%RMTest::CONF, %{ $a{env} || {} });
        $ENV{$_} = $env{$_} for keys %env;
        chdir($a{cwd} || '/') or POSIX::_exit(126);
        open(STDIN, '<', '/dev/null') or POSIX::_exit(126);
        open(STDOUT, '>>', $a{log}) or POSIX::_exit(126);
        open(STDERR, '>>', $a{log}) or POSIX::_exit(126);
        my @cmd = @{ $a{cmd} };
        { no warnings 'exec'; exec { $cmd[0] } @cmd; }
        print STDERR "exec $cmd[0]: $!\n";
        POSIX::_exit(127);
    }
    return $pid;
}

sub _alive { waitpid($_[0], WNOHANG) == 0 }

sub _kill {
    my ($pid, $group) = @_;
    return unless $pid;
    kill 'TERM', $group ? -$pid : $pid;
    my $end = time + 5;
    while (time < $end) {
        return if waitpid($pid, WNOHANG) != 0;
        sleep 0.02;
    }
    kill 'KILL', $group ? -$pid : $pid;
    waitpid($pid, 0);
}

sub _get {
    my ($url) = @_;
    return HTTP::Tiny->new(timeout => 5, max_redirect => 0)->get($url);
}

sub _wait_http {
    my ($url, $pid, $what, $log) = @_;
    my $end = time + 20;
    while (time < $end) {
        die "RMBrowser: $what exited: " . _slurp($log) unless _alive($pid);
        my $r = _get($url);
        return if $r->{status} == 200;
        sleep 0.05;
    }
    die "RMBrowser: $what never answered $url: " . _slurp($log);
}

# The shop: demo/backend.py and nginx from demo/nginx-demo.conf, in a
# directory of RMTest's world, on RMTest's remarket socket.
sub start_shop {
    my $tmp  = RMTest::tmp() or die "RMBrowser: start_shop() before RMTest::start()";
    my $root = RMTest::root();
    my $sock = "$tmp/remarket.sock";
    -S $sock or die "RMBrowser: no remarket socket at $sock";
    my $dir = "$tmp/shop";
    make_path("$dir/nginx/tmp", "$dir/state");
    $S{dir} = $dir;
    $S{backend_port} = RMTest::free_port();

    my $conf = _slurp("$root/demo/nginx-demo.conf");
    my %fill = (LISTEN => "127.0.0.1:$S{shop_port}", SOCKET => $sock,
        BACKEND => "127.0.0.1:$S{backend_port}", SHOP => "$root/demo/shop");
    $conf =~ s/\@(LISTEN|SOCKET|BACKEND|SHOP)\@/$fill{$1}/g;
    die "RMBrowser: demo/nginx-demo.conf has unfilled \@NAMES\@" if $conf =~ /\@[A-Z]+\@/;
    open my $fh, '>', "$dir/nginx.conf" or die "RMBrowser: $dir/nginx.conf: $!";
    print $fh $conf;
    close $fh;

    $S{backend_pid} = _spawn(log => "$dir/backend.log", cwd => $dir, cmd => [
        _python(), "$root/demo/backend.py", '--port', $S{backend_port},
        '--remarket-url', shop_url('/rm'), '--hook-secret', $RMTest::HOOK_SECRET,
        '--remarket-bin', RMTest::bin(), '--outbox', $RMTest::CONF{REMARKET_OUTBOX},
        '--state', "$dir/state" ]);
    my $nginx = -x '/usr/sbin/nginx' ? '/usr/sbin/nginx' : 'nginx';
    $S{nginx_pid} = _spawn(log => "$dir/nginx.out", cwd => $dir, cmd => [
        $nginx, '-p', "$dir/nginx/", '-c', "$dir/nginx.conf", '-e', "$dir/nginx/error.log" ]);
    _wait_http("http://127.0.0.1:$S{backend_port}/api/health", $S{backend_pid}, 'backend.py',
        "$dir/backend.log");
    _wait_http(shop_url('/rm/health'), $S{nginx_pid}, 'nginx (shop)', "$dir/nginx/error.log");
    _wait_http(shop_url('/api/health'), $S{nginx_pid}, 'nginx (shop)', "$dir/nginx/error.log");
    return $dir;
}

sub backend_log { _slurp("$S{dir}/backend.log") }

# chromedriver on a free port and one headless Chromium session.
sub browser {
    my (%o) = @_;
    $S{wd_port} = RMTest::free_port();
    $S{profile} = tempdir('rm-chromium-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $log = "$S{profile}/chromedriver.log";
    $S{wd_pid} = _spawn(log => $log, cwd => $S{profile},
        cmd => [ $CHROMEDRIVER, "--port=$S{wd_port}" ]);
    my $b = bless { base => "http://127.0.0.1:$S{wd_port}", log => $log,
        ua => HTTP::Tiny->new(timeout => 60, keep_alive => 1) }, 'RMBrowser::Session';
    my $end = time + 20;
    while (1) {
        die "RMBrowser: chromedriver exited: " . _slurp($log) unless _alive($S{wd_pid});
        my $r = $b->{ua}->get("$b->{base}/status");
        last if $r->{status} == 200 && eval { $J->decode($r->{content})->{value}{ready} };
        die "RMBrowser: chromedriver not ready: " . _slurp($log) if time > $end;
        sleep 0.05;
    }
    my @args = qw(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
        --disable-background-networking --disable-component-update --disable-sync
        --disable-dev-shm-usage --no-default-browser-check --password-store=basic
        --lang=en-US);
    push @args, '--disable-features=Translate,MediaRouter,OptimizationHints',
        "--user-data-dir=$S{profile}/profile",
        '--window-size=' . ($o{size} || '1280,900');
    my $caps = { capabilities => { alwaysMatch => {
        browserName => 'chrome',
        'goog:chromeOptions' => { binary => $CHROMIUM, args => \@args },
        'goog:loggingPrefs'  => { browser => 'ALL' },
        timeouts => { pageLoad => 30000, script => 15000, implicit => 0 },
    } } };
    my $v = $b->cmd('POST', '/session', $caps);
    $b->{sid} = $v->{sessionId} or die "RMBrowser: no session id";
    $S{session} = $b;
    return $b;
}

sub stop {
    if (my $b = delete $S{session}) {
        eval { $b->cmd('DELETE', '') if $b->{sid}; 1 };
    }
    _kill(delete $S{wd_pid}, 1);
    _kill(delete $S{nginx_pid}, 0);
    _kill(delete $S{backend_pid}, 0);
}

package RMBrowser::Session;
# A WebDriver session. Methods die with the driver's message on error.

use strict;
use warnings;
use JSON::PP ();
use MIME::Base64 qw(decode_base64);
use Time::HiRes qw(sleep time);

my $ELEM = 'element-6066-11e4-a52e-4f735466cecf';
my $JS = JSON::PP->new->utf8->canonical->allow_nonref;

# cmd(METHOD, PATH under the session, BODY) -> value
sub cmd {
    my ($b, $method, $path, $body) = @_;
    my $url = $b->{base} . ($path =~ m{^/session$} ? $path : "/session/$b->{sid}$path");
    my %opt = (headers => { 'Content-Type' => 'application/json' });
    $opt{content} = $JS->encode($body // {}) if $method eq 'POST';
    my $r = $b->{ua}->request($method, $url, \%opt);
    my $d = eval { $JS->decode($r->{content}) };
    if (!$r->{success} || !$d) {
        my $v = $d && ref $d->{value} eq 'HASH' ? $d->{value} : {};
        die "WebDriver $method $path: $r->{status} "
            . ($v->{error} // '') . ': ' . substr($v->{message} // $r->{content} // '', 0, 400) . "\n";
    }
    return $d->{value};
}

sub url_of {
    my ($b, $path) = @_;
    return $path =~ m{^(https?|about|data):} ? $path : RMBrowser::shop_url($path);
}

sub get     { my ($b, $p) = @_; $b->cmd('POST', '/url', { url => $b->url_of($p) }) }
sub url     { $_[0]->cmd('GET', '/url') }
sub title   { $_[0]->cmd('GET', '/title') }
sub refresh { $_[0]->cmd('POST', '/refresh') }

# js(SCRIPT, ARGS...): the script's body; `arguments` holds ARGS.
sub js {
    my ($b, $script, @args) = @_;
    return $b->cmd('POST', '/execute/sync', { script => $script, args => \@args });
}

sub find {
    my ($b, $css) = @_;
    my $v = $b->cmd('POST', '/elements', { using => 'css selector', value => $css });
    return @$v ? $v->[0]{$ELEM} : undef;
}

sub count {
    my ($b, $css) = @_;
    return scalar @{ $b->cmd('POST', '/elements', { using => 'css selector', value => $css }) };
}

sub _el {
    my ($b, $css) = @_;
    my $id = $b->find($css) // die "RMBrowser: no element matches $css\n";
    # centre it, clear of the sticky header and of fixed banners
    $b->js('arguments[0].scrollIntoView({block: "center"})', { $ELEM => $id });
    return $id;
}

sub click { my ($b, $css) = @_; $b->cmd('POST', '/element/' . $b->_el($css) . '/click') }

sub type {
    my ($b, $css, $text) = @_;
    $b->cmd('POST', '/element/' . $b->_el($css) . '/value', { text => $text });
}

sub text {
    my ($b, $css) = @_;
    my $id = $b->find($css) // return undef;
    return $b->cmd('GET', "/element/$id/text");
}

# wait_until(CODE, SECONDS): CODE's first true value, or undef.
sub wait_until {
    my ($b, $code, $secs) = @_;
    my $end = time + ($secs // 10);
    while (1) {
        my $v = eval { $code->() };
        return $v if $v;
        return undef if time > $end;
        sleep 0.1;
    }
}

sub screenshot {
    my ($b, $file) = @_;
    my $png = decode_base64($b->cmd('GET', '/screenshot'));
    open my $fh, '>:raw', $file or die "RMBrowser: $file: $!";
    print $fh $png;
    close $fh;
    return length $png;
}

sub cookie {
    my ($b, $name) = @_;
    my $v = eval { $b->cmd('GET', "/cookie/$name") };
    return $v ? $v->{value} : undef;
}

sub delete_cookies { $_[0]->cmd('DELETE', '/cookie') }

# Console messages since the last call (chromedriver's log endpoint).
sub browser_log {
    my ($b) = @_;
    my $v = eval { $b->cmd('POST', '/se/log', { type => 'browser' }) } || [];
    return map { "$_->{level}: $_->{message}" } @$v;
}

# A Chrome DevTools command through chromedriver.
sub cdp {
    my ($b, $cmd, $params) = @_;
    return $b->cmd('POST', '/goog/cdp/execute', { cmd => $cmd, params => $params || {} });
}

1;
