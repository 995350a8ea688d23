#!/usr/bin/env python3
"""mail_check.py: what tests/48-templates.t asks of every rendered mail.

  mail_check.py contrast FG BG      prints the WCAG 2 contrast ratio
  mail_check.py mail BRAND LOGO FILE.eml...
                                    prints a JSON line a file: {"problems":
                                    [...], "text": "...", "subject": "..."}

A mail's problems: a defect Python's email package (policy=default) finds
in the message, a part or a header; a From that is not one mailbox; a
missing text or HTML part; text colours under 4.5:1 against the lightest
backgrounds the templates use (#ffffff, #f7f4ef, #f4f1ec) and white
button text under 4.5:1 against BRAND; a hidden element (the preheader)
with a colour of its own (SpamAssassin's HTML_FONT_LOW_CONTRAST); an
image without width, height or alt, or a non-empty alt without a style
for images-off views; a link whose text says nothing ("click here");
BRAND or LOGO (when given) missing from the HTML.
"""
import email
import json
import re
import sys
from email import policy
from html.parser import HTMLParser

BACKGROUNDS = ("#ffffff", "#f7f4ef", "#f4f1ec")
VAGUE = {"click here", "here", "click", "link", "this link", "more",
         "read more", "learn more", "go"}


def luminance(hexcolour):
    h = hexcolour.lstrip("#")
    out = []
    for i in (0, 2, 4):
        c = int(h[i:i + 2], 16) / 255
        out.append(c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4)
    return 0.2126 * out[0] + 0.7152 * out[1] + 0.0722 * out[2]


def contrast(a, b):
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def style_of(attrs):
    return dict(attrs).get("style") or ""


class Html(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems = []
        self.links = []          # [text] of each <a>
        self.in_a = 0
        self.hidden_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        st = style_of(attrs).replace(" ", "").lower()
        if "display:none" in st and re.search(r"(^|;)color:", st):
            self.problems.append("hidden element with its own colour: " + st)
        if tag == "img":
            for need in ("width", "height", "alt"):
                if need not in a:
                    self.problems.append("img %s without %s" % (a.get("src"), need))
            if a.get("alt") and not ("font-size" in st and "color:" in st):
                self.problems.append("img %s: alt text not styled" % a.get("src"))
        if tag == "a":
            self.in_a += 1
            self.links.append("")

    def handle_endtag(self, tag):
        if tag == "a" and self.in_a:
            self.in_a -= 1

    def handle_data(self, data):
        if self.in_a and self.links:
            self.links[-1] += data


def check_html(html, brand, logo, problems):
    p = Html()
    p.feed(html)
    problems += p.problems
    for text in p.links:
        t = " ".join(text.split()).lower().strip(".!:")
        if t in VAGUE:
            problems.append("link text says nothing: %r" % text)
    for m in re.finditer(r"(?<![-\w])color:\s*(#[0-9a-fA-F]{6})", html):
        fg = m.group(1).lower()
        if fg == "#ffffff":
            bgs = (brand,)
        else:
            bgs = BACKGROUNDS
        for bg in bgs:
            r = contrast(fg, bg)
            if r < 4.5:
                problems.append("text %s on %s: contrast %.2f:1 < 4.5:1" % (fg, bg, r))
    if brand.lower() not in html.lower():
        problems.append("brand_color %s not used" % brand)
    if logo and logo not in html:
        problems.append("logo_url %s not shown" % logo)


def check_mail(path, brand, logo):
    problems = []
    with open(path, "rb") as f:
        msg = email.message_from_binary_file(f, policy=policy.default)
    problems += ["message: %r" % d for d in msg.defects]
    for name, value in msg.items():
        problems += ["header %s: %r" % (name, d) for d in getattr(value, "defects", ())]
    addrs = msg["From"].addresses if msg["From"] else ()
    if len(addrs) != 1:
        problems.append("From is %d mailboxes: %s" % (len(addrs), msg["From"]))
    text = html = None
    for part in msg.walk():
        problems += ["part %s: %r" % (part.get_content_type(), d) for d in part.defects]
        if part.get_content_type() == "text/plain":
            text = part.get_content()
        elif part.get_content_type() == "text/html":
            html = part.get_content()
    if text is None or html is None:
        problems.append("a text or an HTML part is missing")
    else:
        check_html(html, brand, logo, problems)
    return {"problems": problems, "text": text or "", "subject": str(msg["Subject"])}


def main():
    if sys.argv[1] == "contrast":
        print("%.2f" % contrast(sys.argv[2], sys.argv[3]))
    elif sys.argv[1] == "mail":
        for path in sys.argv[4:]:
            print(json.dumps(check_mail(path, sys.argv[2], sys.argv[3])))


main()
