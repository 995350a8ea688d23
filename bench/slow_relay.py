#!/usr/bin/env python3
"""bench/slow_relay.py: an SMTP relay that takes DELAY_MS per message.

A real relay spends time on each message (queue file, fsync, scanning)
before it answers the end of DATA; smtp-sink's -w takes whole seconds
only. This one accepts everything, throws the mail away, and answers the
end of DATA DELAY_MS after it arrived, on any number of connections at
once (asyncio), so several senders' connections are not serialised here.

  slow_relay.py HOST PORT DELAY_MS

Prints "mesg=N id=MESSAGE-ID" (the running count of accepted messages,
and the Message-ID of this one) after each one: bench/run.sh counts them
as it counts smtp-sink -c's, and checks that no Message-ID came twice.
Stops on SIGTERM or SIGINT.
"""
import asyncio
import signal
import sys

count = 0


async def session(reader, writer, delay):
    global count
    writer.write(b"220 slow-relay ESMTP\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-slow-relay\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                mid = b"-"
                while True:
                    d = await reader.readline()
                    if not d or d == b".\r\n" or d == b".\n":
                        break
                    if mid == b"-" and d[:11].lower() == b"message-id:":
                        mid = d[11:].strip() or b"-"
                if not d:
                    break
                await asyncio.sleep(delay)
                count += 1
                writer.write(b"250 queued\r\n")
                sys.stdout.write("mesg=%d id=%s\n" % (count, mid.decode("latin-1")))
                sys.stdout.flush()
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:  # MAIL, RCPT, RSET, NOOP and the rest
                writer.write(b"250 ok\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    writer.close()


async def main():
    host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000
    server = await asyncio.start_server(lambda r, w: session(r, w, delay), host, port)
    stop = asyncio.get_running_loop().create_future()
    for s in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            s, lambda: stop.done() or stop.set_result(None))
    async with server:
        await stop


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.stderr.write(__doc__)
        sys.exit(2)
    asyncio.run(main())
