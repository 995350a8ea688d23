#!/usr/bin/env python3
"""smtp_script.py: a scriptable SMTP relay for remarket's tests.

Answers every stage of the dialogue like a relay would, except where told
otherwise; stdlib only, loopback only. Accepted messages are written to
DIR/m.<n> (n counts from 1).

  smtp_script.py --port-file F [--dir DIR] [--fail STAGE=CODE]...
                 [--fail-for REGEX] [--delay STAGE=SECONDS]... [--fill PATH]

STAGE is one of: greeting, ehlo, auth, mail, rcpt, data (the DATA command),
eod (the answer after the content: "end of DATA").
  --fail STAGE=CODE  answer CODE ("554", "421", ...) at that stage
  --fail "STAGE=CODE TEXT"  answer that whole line instead ("550 5.1.1
                     <{rcpt}>: user unknown", "554 no enhanced code");
                     {rcpt} is the address of the last RCPT
  --fail-for REGEX   only for transactions whose RCPT address matches
                     (rcpt and eod failures)
  --delay STAGE=S    wait S seconds before answering at that stage; a
                     message whose client is gone when the eod answer is
                     due is not kept (the relay never said it took it)
  --delay-for REGEX  only for transactions whose RCPT address matches
                     (rcpt and eod delays)
  --fill PATH        before the first eod answer, write PATH until the
                     file system is full (a disk filling under remarket)
The chosen port is written to the port file once the server listens.
The log (--log) gets "open N" as each connection opens, N the number
open at once with it.
"""
import argparse
import os
import re
import select
import socket
import socketserver
import sys
import threading
import time

TEXT = {
    '2': 'OK', '3': 'go ahead', '4': 'try again later', '5': 'refused',
}


def parse_pairs(items, conv):
    out = {}
    for it in items or []:
        k, _, v = it.partition('=')
        out[k.strip().lower()] = conv(v)
    return out


class Relay(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class Session(socketserver.StreamRequestHandler):
    def delay(self, stage):
        cfg = self.server.cfg
        d = cfg.delay.get(stage)
        if d and stage in ('rcpt', 'eod') and cfg.delay_for:
            if not any(re.search(cfg.delay_for, r) for r in self.rcpts):
                d = None
        return d

    def reply(self, stage, default, wait=True):
        cfg = self.server.cfg
        d = self.delay(stage)
        if d and wait:
            time.sleep(d)
        code = cfg.fail.get(stage)
        if code and stage in ('rcpt', 'eod') and cfg.fail_for:
            if not any(re.search(cfg.fail_for, r) for r in self.rcpts):
                code = None
        if code and len(code) > 3:  # a whole line of the test's
            self.send(code.replace(
                '{rcpt}', self.rcpts[-1] if self.rcpts else ''))
            return False
        if code:
            self.send('%s %s.%s.0 %s at %s (smtp_script)' % (
                code, code[0], 7 if code[0] == '5' else 0,
                TEXT[code[0]], stage))
            return False
        self.send(default)
        return True

    def send(self, line):
        self.wfile.write((line + '\r\n').encode())
        self.wfile.flush()

    def client_gone(self):
        r, _, _ = select.select([self.connection], [], [], 0)
        if not r:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

    def handle(self):
        # "open N": N connections open at once, this one included
        cfg = self.server.cfg
        with cfg.lock:
            cfg.open += 1
            n = cfg.open
        log(cfg, 'open %d' % n)
        try:
            self.session()
        finally:
            with cfg.lock:
                cfg.open -= 1

    def session(self):
        self.rcpts = []
        self.mail = None
        if not self.reply('greeting', '220 smtp_script ready'):
            return
        while True:
            line = self.rfile.readline()
            if not line:
                return
            cmd = line.decode('latin-1').rstrip('\r\n')
            verb = cmd.split(' ', 1)[0].upper()
            if verb in ('EHLO', 'HELO'):
                if self.reply('ehlo', '250-smtp_script' if verb == 'EHLO'
                              else '250 smtp_script'):
                    if verb == 'EHLO':
                        self.send('250-AUTH PLAIN LOGIN')
                        self.send('250 8BITMIME')
            elif verb == 'AUTH':
                self.reply('auth', '235 2.7.0 authenticated')
            elif verb == 'MAIL':
                self.rcpts = []
                if self.reply('mail', '250 2.1.0 sender ok'):
                    self.mail = cmd
            elif verb == 'RCPT':
                m = re.search(r'<([^>]*)>', cmd)
                self.rcpts.append(m.group(1) if m else '')
                if not self.reply('rcpt', '250 2.1.5 recipient ok'):
                    self.rcpts.pop()
            elif verb == 'DATA':
                if not self.reply('data', '354 end with <CRLF>.<CRLF>'):
                    continue
                body = []
                while True:
                    l = self.rfile.readline()
                    if not l:
                        return
                    if l in (b'.\r\n', b'.\n'):
                        break
                    body.append(l[1:] if l.startswith(b'..') else l)
                self.end_of_data(b''.join(body))
            elif verb == 'RSET':
                self.rcpts = []
                self.send('250 2.0.0 reset')
            elif verb == 'NOOP':
                self.send('250 2.0.0 ok')
            elif verb == 'QUIT':
                self.send('221 2.0.0 bye')
                return
            else:
                self.send('502 5.5.2 unknown command')

    def end_of_data(self, body):
        cfg = self.server.cfg
        if cfg.fill and not cfg.filled:
            cfg.filled = True
            fill(cfg.fill)
        d = self.delay('eod')
        if d:
            log(cfg, 'wait')  # a test may kill the client now
            time.sleep(d)
        if self.client_gone():
            log(cfg, 'dropped: the client left before the answer')
            return
        code = cfg.fail.get('eod')
        if code and cfg.fail_for and not any(
                re.search(cfg.fail_for, r) for r in self.rcpts):
            code = None
        if not code and cfg.dir:
            with cfg.lock:
                cfg.n += 1
                n = cfg.n
            with open(os.path.join(cfg.dir, 'm.%06d' % n), 'wb') as f:
                f.write(body)
        self.reply('eod', '250 2.0.0 queued', wait=False)


def fill(path):
    """Writes PATH until the file system holding it is full."""
    chunk = b'\0' * 4096
    try:
        with open(path, 'wb') as f:
            while True:
                f.write(chunk)
                f.flush()
    except OSError:
        pass


def log(cfg, text):
    if cfg.log:
        with cfg.lock:
            with open(cfg.log, 'a') as f:
                f.write(text + '\n')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--port-file', required=True)
    ap.add_argument('--dir')
    ap.add_argument('--log')
    ap.add_argument('--fail', action='append')
    ap.add_argument('--fail-for')
    ap.add_argument('--delay-for')
    ap.add_argument('--delay', action='append')
    ap.add_argument('--fill')
    a = ap.parse_args()
    cfg = argparse.Namespace(
        dir=a.dir, log=a.log, fail=parse_pairs(a.fail, str),
        fail_for=a.fail_for, delay=parse_pairs(a.delay, float),
        delay_for=a.delay_for,
        fill=a.fill, filled=False, n=0, open=0, lock=threading.Lock())
    srv = Relay(('127.0.0.1', 0), Session)
    srv.cfg = cfg
    tmp = a.port_file + '.tmp'
    with open(tmp, 'w') as f:
        f.write('%d\n' % srv.server_address[1])
    os.rename(tmp, a.port_file)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    sys.exit(main())
