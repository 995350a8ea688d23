package RMRelay;
# RMRelay: a scriptable SMTP relay (tests/lib/smtp_script.py) for tests
# that need a relay answering a chosen code at a chosen stage: the
# greeting, EHLO, AUTH, MAIL FROM, RCPT, DATA or the end of DATA, for
# every recipient or for matching ones, after a chosen delay.
#
#   my $r = RMRelay->start(dir => $dir, fail => ['greeting=554'],
#                          fail_for => 's2@', delay => ['eod=0.2'],
#                          delay_for => 's1@',
#                          fill => $path);
#   $r->{port}; $r->messages; $r->waits; $r->stop;
#
# Every relay started here is stopped by stop() or at exit. Perl core
# modules only; loopback only.
use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use POSIX ();
use Time::HiRes qw(sleep time);

my $SCRIPT = abs_path(dirname(__FILE__)) . '/smtp_script.py';
my %LIVE;
my $OWNER = $$;
END { kill 'TERM', keys %LIVE if $$ == $OWNER && %LIVE; }

sub start {
    my ($class, %o) = @_;
    my $dir = $o{dir} or die "RMRelay: dir is required";
    make_path($dir);
    my $pf = "$dir/port";
    unlink $pf;
    my @cmd = ('python3', $SCRIPT, '--port-file', $pf, '--dir', $dir,
        '--log', "$dir/log");
    push @cmd, '--fail', $_ for @{ $o{fail} || [] };
    push @cmd, '--delay', $_ for @{ $o{delay} || [] };
    push @cmd, '--fail-for', $o{fail_for} if defined $o{fail_for};
    push @cmd, '--delay-for', $o{delay_for} if defined $o{delay_for};
    push @cmd, '--fill', $o{fill} if defined $o{fill};
    my $pid = fork // die "RMRelay: fork: $!";
    if (!$pid) {
        open STDOUT, '>', "$dir/stdout";
        open STDERR, '>', "$dir/stderr";
        { no warnings "exec"; exec @cmd; }
        POSIX::_exit(127);
    }
    $LIVE{$pid} = 1;
    my $end = time + 10;
    until (-s $pf) {
        die "RMRelay: smtp_script.py did not start: " . _slurp("$dir/stderr")
            if time > $end || waitpid($pid, POSIX::WNOHANG()) == $pid;
        sleep 0.02;
    }
    my $port = _slurp($pf);
    chomp $port;
    return bless { pid => $pid, port => $port, dir => $dir }, $class;
}

sub url { "smtp://127.0.0.1:$_[0]{port}" }

# The messages the relay accepted (said 250 to), oldest first.
sub messages {
    my ($self) = @_;
    return map { _slurp($_) } sort glob("$self->{dir}/m.*");
}

# Message-IDs of the accepted messages.
sub message_ids { map { /^Message-ID:\s*(\S+)/mi ? $1 : () } $_[0]->messages }

# Lines of the relay's log ("dropped: ..." when a client left before the
# answer it waited for).
sub log_lines {
    my $t = _slurp("$_[0]{dir}/log");
    return split /\n/, $t;
}

sub stop {
    my ($self) = @_;
    return unless $self->{pid};
    kill 'TERM', $self->{pid};
    waitpid $self->{pid}, 0;
    delete $LIVE{ $self->{pid} };
    delete $self->{pid};
}

sub _slurp { open my $fh, '<', $_[0] or return ''; local $/; my $s = <$fh>; $s // '' }

1;
