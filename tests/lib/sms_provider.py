#!/usr/bin/env python3
"""A local stand-in of an SMS provider's HTTP API for the tests.

Answers Twilio's Messages API (a form: To, From, Body) and the generic
JSON webhook ({"to", "from", "text", "message"}), recording every request
as one JSON line in LOG. The number decides the answer: +15005550001 is
refused as Twilio refuses an invalid number (400, code 21211),
+15005550002 as a number that sent Twilio STOP (400, code 21610),
+15005550009 gets a 503; any other is accepted (201).

usage: sms_provider.py LOG PORTFILE
"""
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG, PORTFILE = sys.argv[1], sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n).decode("utf-8")
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            to = json.loads(raw).get("to", "")
        else:
            form = urllib.parse.parse_qs(raw)
            to = form.get("To", [""])[0]
        rec = {"path": self.path, "body": raw, "content_type": ctype,
               "authorization": self.headers.get("Authorization", ""),
               "signature": self.headers.get("X-Remarket-Signature", "")}
        with open(LOG, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if to == "+15005550001":
            status, answer = 400, {"code": 21211, "message":
                                   "The 'To' number is not a valid phone number."}
        elif to == "+15005550002":
            status, answer = 400, {"code": 21610, "message":
                                   "Attempt to send to unsubscribed recipient"}
        elif to == "+15005550009":
            status, answer = 503, {"message": "try later"}
        else:
            status, answer = 201, {"sid": "SM%08d" % n, "status": "queued"}
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(PORTFILE + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(PORTFILE + ".tmp", PORTFILE)
srv.serve_forever()
