#!/usr/bin/env python3
"""backend.py: the demo shop's backend, the part a real store already has.

It keeps carts and orders (JSON files in a state directory) and tells
remarket about them the way a store backend should: signed server events
(POST <remarket>/events with X-Remarket-Signature). It also serves the
demo's outbox viewer and moves the demo clock by running `remarket tick`.

Routes (JSON in and out; nginx proxies /api/ here):
  POST /api/cart          {cart_id?, currency, items:[{sku,name,price,qty,url,image}]}
                          -> {cart_id}; forwards a signed cart event
  GET  /api/cart/<id>     -> the stored cart
  POST /api/order         {cart_id, email, name?, discount_code?}
                          -> {order_id, total}; forwards a signed order event
  GET  /api/outbox        -> {messages:[{file,to,subject,date,html,text}]}
  GET  /api/clock         -> {offset, now}
  POST /api/clock?advance=N -> {offset, now, tick}; runs `remarket tick --now`
  GET  /api/report-link   -> {url}: `remarket report --link` (the operator's
                          report, on the demo clock)

One clock: with REMARKET_CLOCK_FILE set (scripts/demo-shop.sh sets it for
`remarket serve` too), the offset is written there, so remarket's pages,
links and report run on the demo clock; events are then signed and dated
by it. Without it, only the ticks this backend runs move ahead.

Python 3 standard library only; binds 127.0.0.1. Every remarket process it
runs gets this process's environment (REMARKET_DB, REMARKET_OUTBOX, ...).
"""

import argparse
import email
import email.policy
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

IDENT = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
EMAIL = re.compile(r"^[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+\.[A-Za-z]{2,}$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
MAX_BODY = 64 * 1024


class Store:
    """Carts, orders and the demo clock, saved as JSON in the state dir."""

    def __init__(self, state_dir):
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "shop.json")
        self.lock = threading.Lock()
        try:
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("carts", {})
        self.data.setdefault("orders", {})
        self.data.setdefault("clock_offset", 0)
        self.clock_file = os.environ.get("REMARKET_CLOCK_FILE") or None
        self.write_clock()

    def write_clock(self):
        """Tells remarket (serve and every command) the demo clock's offset."""
        if not self.clock_file:
            return
        tmp = self.clock_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("%d\n" % self.data["clock_offset"])
        os.replace(tmp, self.clock_file)

    def now(self):
        """The shop's time: the demo clock when remarket shares it."""
        return int(time.time()) + (self.data["clock_offset"] if self.clock_file else 0)

    def save(self):
        """Writes the state; the caller holds the lock."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


class Remarket:
    """Signed events to remarket's /events, and the tick command."""

    def __init__(self, url, secret, binary, clock=time.time):
        self.url = url.rstrip("/")
        self.secret = secret.encode()
        self.binary = binary
        self.clock = clock

    def send(self, event):
        """Posts one signed event; returns remarket's status (0: unreachable)."""
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        t = str(int(self.clock()))
        sig = hmac.new(self.secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(
            self.url + "/events", data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "X-Remarket-Signature": "t=%s,v1=%s" % (t, sig)})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            log("remarket refused a %s event: %s %s" % (
                event.get("type"), e.code, e.read(300).decode("utf-8", "replace")))
            return e.code
        except (OSError, ValueError) as e:
            # A real store would queue the event and retry; the shop goes on.
            log("remarket unreachable (%s event): %s" % (event.get("type"), e))
            return 0

    def validate(self, code, total):
        """Asks remarket whether a discount code applies: percent or 0."""
        body = json.dumps({"code": code, "total": total}).encode()
        req = urllib.request.Request(self.url + "/discounts/validate", data=body,
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                j = json.load(r)
                return int(j.get("percent") or 0) if j.get("valid") else 0
        except (OSError, ValueError):
            return 0

    def run(self, args, stdin=None):
        """Runs the remarket command line; returns (exit code, stdout, stderr)."""
        try:
            p = subprocess.run([self.binary] + args, input=stdin, capture_output=True,
                               timeout=60, text=True)
            return p.returncode, p.stdout, p.stderr
        except (OSError, subprocess.SubprocessError) as e:
            return 127, "", str(e)


def log(msg):
    sys.stderr.write("backend: %s\n" % msg)
    sys.stderr.flush()


def clean_items(items, catalog):
    """Checks the items a browser sent; prices and names come from the catalog."""
    if not isinstance(items, list) or len(items) > 100:
        raise ValueError("items: a list of at most 100 items expected")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise ValueError("items[%d]: object expected" % i)
        sku = it.get("sku")
        if not isinstance(sku, str) or not IDENT.match(sku):
            raise ValueError("items[%d].sku: invalid" % i)
        known = catalog.get(sku)
        if catalog and not known:
            raise ValueError("items[%d].sku: no such product" % i)
        name = known["name"] if known else it.get("name")
        price = known["price"] if known else it.get("price")
        if not isinstance(name, str) or not 0 < len(name) <= 100:
            raise ValueError("items[%d].name: invalid" % i)
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price <= 1e6:
            raise ValueError("items[%d].price: invalid" % i)
        qty = it.get("qty", 1)
        if isinstance(qty, bool) or not isinstance(qty, int) or not 1 <= qty <= 1000:
            raise ValueError("items[%d].qty: 1 to 1000" % i)
        item = {"sku": sku, "name": name, "price": round(float(price), 2), "qty": qty}
        for k in ("url", "image"):
            v = it.get(k)
            if isinstance(v, str) and re.match(r"^https?://[^\s\"<>]{1,2000}$", v):
                item[k] = v
        out.append(item)
    return out


def cart_total(items):
    return round(sum(it["price"] * it["qty"] for it in items), 2)


def make_handler(store, rm, catalog, outbox):
    class Handler(BaseHTTPRequestHandler):
        server_version = "demo-shop-backend/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet, errors go through log()
            pass

        # ---- plumbing ----
        def reply(self, status, obj):
            body = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def fail(self, status, msg):
            self.reply(status, {"error": msg})

        def body_json(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise ValueError("body: too large")
            raw = self.rfile.read(n) if n > 0 else b""
            try:
                obj = json.loads(raw.decode("utf-8") or "null")
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise ValueError("body: JSON object expected")
            return obj

        def visitor(self):
            c = SimpleCookie()
            try:
                c.load(self.headers.get("Cookie") or "")
            except Exception:  # a malformed Cookie header is no cookie
                return None
            v = c.get("rm_vid")
            return v.value if v is not None and IDENT.match(v.value) else None

        def route(self):
            u = urlsplit(self.path)
            return u.path, parse_qs(u.query)

        # ---- routes ----
        def do_GET(self):
            path, query = self.route()
            if path.startswith("/api/cart/"):
                cid = path[len("/api/cart/"):]
                with store.lock:
                    cart = store.data["carts"].get(cid)
                    cart = dict(cart) if cart else None
                if not cart:
                    return self.fail(404, "no such cart")
                cart.pop("email", None)  # a cart id in a link must not reveal who
                return self.reply(200, cart)
            if path == "/api/outbox":
                return self.reply(200, {"messages": read_outbox(outbox)})
            if path == "/api/clock":
                with store.lock:
                    off = store.data["clock_offset"]
                return self.reply(200, {"offset": off, "now": int(time.time()) + off})
            if path == "/api/report-link":
                rc, out, err = rm.run(["report", "--link"])
                if rc != 0:
                    return self.fail(500, (err or out).strip()[:300])
                return self.reply(200, {"url": out.strip()})
            if path == "/api/health":
                return self.reply(200, {"ok": True})
            self.fail(404, "no such route")

        def do_POST(self):
            path, query = self.route()
            try:
                if path == "/api/cart":
                    return self.post_cart(self.body_json())
                if path == "/api/order":
                    return self.post_order(self.body_json())
                if path == "/api/clock":
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    return self.post_clock(query)
            except (ValueError, UnicodeDecodeError) as e:
                return self.fail(400, str(e))
            self.fail(404, "no such route")

        def post_cart(self, req):
            items = clean_items(req.get("items", []), catalog)
            currency = req.get("currency") or "EUR"
            if not isinstance(currency, str) or not CURRENCY.match(currency):
                raise ValueError("currency: three upper-case letters")
            cid = req.get("cart_id")
            vid = self.visitor()
            with store.lock:
                if not (isinstance(cid, str) and cid in store.data["carts"]):
                    cid = "c-" + secrets.token_hex(6)
                cart = store.data["carts"].setdefault(cid, {"cart_id": cid, "status": "open"})
                if cart.get("status") == "ordered":  # a paid cart is not reused
                    cid = "c-" + secrets.token_hex(6)
                    cart = store.data["carts"].setdefault(cid, {"cart_id": cid})
                cart.update(cart_id=cid, status="open", currency=currency, items=items,
                            total=cart_total(items), updated=store.now())
                if vid:
                    cart["visitor_id"] = vid
                email_addr = cart.get("email")
                store.save()
            ev = {"type": "cart", "cart_id": cid, "currency": currency, "items": items,
                  "total": cart_total(items)}
            if vid:
                ev["visitor_id"] = vid
            if email_addr:
                ev["email"] = email_addr
            status = rm.send(ev)
            self.reply(200, {"cart_id": cid, "remarket": status})

        def post_order(self, req):
            cid, addr = req.get("cart_id"), req.get("email")
            if not isinstance(addr, str) or not EMAIL.match(addr.strip()) or len(addr) > 254:
                raise ValueError("email: invalid")
            addr = addr.strip()
            name = req.get("name") if isinstance(req.get("name"), str) else ""
            code = req.get("discount_code")
            with store.lock:
                cart = store.data["carts"].get(cid) if isinstance(cid, str) else None
                if not cart or not cart.get("items"):
                    return self.fail(400, "cart_id: no such cart, or it is empty")
                if cart.get("status") == "ordered":
                    return self.fail(409, "this cart is already ordered")
                items, currency = cart["items"], cart.get("currency", "EUR")
            total = cart_total(items)
            ev = {"type": "order", "order_id": "o-" + secrets.token_hex(6), "email": addr,
                  "cart_id": cid, "currency": currency, "items": items, "total": total}
            if isinstance(code, str) and IDENT.match(code):
                pct = rm.validate(code.upper(), total)
                if pct:
                    ev["discount_code"] = code.upper()
                    ev["total"] = round(total * (100 - pct) / 100, 2)
            with store.lock:
                cart = store.data["carts"][cid]
                cart.update(status="ordered", email=addr)
                store.data["orders"][ev["order_id"]] = dict(ev, name=name[:100],
                                                            ts=store.now())
                store.save()
            status = rm.send(ev)
            self.reply(200, {"order_id": ev["order_id"], "total": ev["total"],
                             "remarket": status})

        def post_clock(self, query):
            try:
                advance = int((query.get("advance") or ["0"])[0])
            except ValueError:
                return self.fail(400, "advance: whole seconds")
            if not 0 <= advance <= 30 * 86400:
                return self.fail(400, "advance: 0 to 30 days")
            with store.lock:
                store.data["clock_offset"] += advance
                off = store.data["clock_offset"]
                store.save()
                store.write_clock()
            now = int(time.time()) + off
            rc, out, err = rm.run(["tick", "--now", str(now)])
            try:
                tick = json.loads(out)
            except ValueError:
                tick = {"error": (err or out).strip()[:500], "exit": rc}
            self.reply(200 if rc == 0 else 500, {"offset": off, "now": now, "tick": tick})

    return Handler


def read_outbox(outbox, limit=200):
    """The .eml files of the outbox, newest first, parsed."""
    try:
        names = [n for n in os.listdir(outbox) if n.endswith(".eml")]
    except OSError:
        return []
    paths = [os.path.join(outbox, n) for n in names]
    paths.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
    out = []
    for p in paths[:limit]:
        try:
            with open(p, "rb") as f:
                msg = email.message_from_binary_file(f, policy=email.policy.default)
            html = msg.get_body(preferencelist=("html",))
            text = msg.get_body(preferencelist=("plain",))
            out.append({"file": os.path.basename(p), "to": str(msg.get("To", "")),
                        "subject": str(msg.get("Subject", "")), "date": str(msg.get("Date", "")),
                        "html": html.get_content() if html else "",
                        "text": text.get_content() if text else ""})
        except Exception as e:  # one broken file must not hide the others
            out.append({"file": os.path.basename(p), "to": "", "subject": "(unreadable: %s)" % e,
                        "date": "", "html": "", "text": ""})
    return out


def load_catalog(path):
    try:
        with open(path, encoding="utf-8") as f:
            return {p["sku"]: p for p in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def seed_products(rm, catalog):
    """Tells remarket the catalog and a review per product (for step 2)."""
    events = [{k: p[k] for k in ("sku", "name", "price", "category", "review") if k in p}
              for p in catalog.values()]
    for ev in events:
        ev["type"] = "product"
    if not events:
        return
    rc, out, err = rm.run(["event"], stdin=json.dumps(events))
    if rc != 0:
        log("remarket event (catalog) exited %d: %s" % (rc, err.strip()[:300]))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=int(os.environ.get("DEMO_BACKEND_PORT", 8081)))
    ap.add_argument("--remarket-url", default=os.environ.get("DEMO_REMARKET_URL",
                                                             "http://127.0.0.1:8080/rm"))
    ap.add_argument("--hook-secret", default=os.environ.get("REMARKET_HOOK_SECRET", ""))
    ap.add_argument("--remarket-bin", default=os.environ.get("REMARKET_BIN", "remarket"))
    ap.add_argument("--outbox", default=os.environ.get("REMARKET_OUTBOX", "./var/outbox"))
    ap.add_argument("--state", default=os.environ.get("DEMO_STATE", "./var/demo-shop/backend"))
    ap.add_argument("--catalog", default=os.path.join(here, "shop", "products.json"))
    a = ap.parse_args()
    if not a.hook_secret:
        ap.error("--hook-secret (or REMARKET_HOOK_SECRET) is required")
    store = Store(a.state)
    rm = Remarket(a.remarket_url, a.hook_secret, a.remarket_bin, clock=store.now)
    catalog = load_catalog(a.catalog)
    seed_products(rm, catalog)
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), make_handler(store, rm, catalog, a.outbox))
    srv.daemon_threads = True
    log("listening on http://127.0.0.1:%d" % a.port)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
