#!/usr/bin/env python3
"""push_service.py: a local stand-in of a browser's push service (RFC 8030)
and of the browser itself, for tests/49-push.t.

  push_service.py PORT DIR

Makes the browser's P-256 key pair and auth secret and writes the public
parts to DIR/keys.json ({"p256dh", "auth"}, base64url, as a
PushSubscription gives them); then serves http://127.0.0.1:PORT. Every
POST is checked as a push service and a browser would (independently of
remarket's code: python3-cryptography): the VAPID JWT (RFC 8292) of the
Authorization header verified with its k= key (ES256), its aud against
this origin, its exp within 24 h, its sub a mailto: or https: URL; the
body decrypted (RFC 8291, aes128gcm) with the browser's private key. One
JSON line per request goes to DIR/requests.jsonl. POST /push/gone answers
410 (a browser that unsubscribed), POST /push/missing 404, others 201.
"""
import base64
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PORT, DIR = int(sys.argv[1]), sys.argv[2]
ORIGIN = "http://127.0.0.1:%d" % PORT
UA_KEY = ec.generate_private_key(ec.SECP256R1())
UA_PUB = UA_KEY.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
AUTH = os.urandom(16)


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64u(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hmac256(key, data):
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def check_vapid(header):
    """The JWT's claims if the Authorization header is a valid VAPID one."""
    if not header.startswith("vapid "):
        raise ValueError("Authorization is not 'vapid t=..., k=...'")
    parts = dict(p.strip().split("=", 1) for p in header[6:].split(","))
    jwt, k = parts["t"], parts["k"]
    head, claims, sig = jwt.split(".")
    if json.loads(unb64u(head)) != {"typ": "JWT", "alg": "ES256"}:
        raise ValueError("JWT header is not ES256")
    raw = unb64u(sig)
    if len(raw) != 64:
        raise ValueError("ES256 signature is not 64 bytes")
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64u(k))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                               int.from_bytes(raw[32:], "big"))
    pub.verify(der, (head + "." + claims).encode(), ec.ECDSA(hashes.SHA256()))
    c = json.loads(unb64u(claims))
    if c.get("aud") != ORIGIN:
        raise ValueError("aud %r is not %s" % (c.get("aud"), ORIGIN))
    if not time.time() < c.get("exp", 0) <= time.time() + 86400:
        raise ValueError("exp not within 24 hours")
    if not c.get("sub", "").startswith(("mailto:", "https:")):
        raise ValueError("sub is not mailto: or https:")
    return c, k


def decrypt(body):
    """RFC 8291 / RFC 8188 decryption, as the browser does it."""
    salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    as_pub, ct = body[21:21 + idlen], body[21 + idlen:]
    if rs != 4096 or idlen != 65 or len(ct) > rs:
        raise ValueError("header: rs %d idlen %d" % (rs, idlen))
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_pub)
    secret = UA_KEY.exchange(ec.ECDH(), peer)
    prk_key = hmac256(AUTH, secret)
    ikm = hmac256(prk_key, b"WebPush: info\0" + UA_PUB + as_pub + b"\1")
    prk = hmac256(salt, ikm)
    cek = hmac256(prk, b"Content-Encoding: aes128gcm\0\1")[:16]
    nonce = hmac256(prk, b"Content-Encoding: nonce\0\1")[:12]
    plain = AESGCM(cek).decrypt(nonce, ct, None).rstrip(b"\0")
    if not plain.endswith(b"\2"):
        raise ValueError("not a last record (no 0x02 delimiter)")
    return plain[:-1].decode()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        rec = {"path": self.path, "ttl": self.headers.get("TTL"),
               "encoding": self.headers.get("Content-Encoding"),
               "length": len(body)}
        try:
            claims, k = check_vapid(self.headers.get("Authorization", ""))
            rec.update(vapid="ok", claims=claims, k=k)
        except (InvalidSignature, ValueError, KeyError) as e:
            rec["vapid"] = "bad: %s" % (e or type(e).__name__)
        try:
            rec["payload"] = json.loads(decrypt(body))
        except (InvalidTag, ValueError) as e:
            rec["decrypt"] = "bad: %s" % (e or type(e).__name__)
        with open(os.path.join(DIR, "requests.jsonl"), "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        status = {"/push/gone": 410, "/push/missing": 404}.get(self.path, 201)
        if rec["vapid"] != "ok":
            status = 403  # a push service refuses an unsigned request
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", PORT), Handler)
with open(os.path.join(DIR, "keys.json.tmp"), "w") as f:
    json.dump({"p256dh": b64u(UA_PUB), "auth": b64u(AUTH)}, f)
os.rename(os.path.join(DIR, "keys.json.tmp"), os.path.join(DIR, "keys.json"))
server.serve_forever()
