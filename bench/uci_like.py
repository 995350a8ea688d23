#!/usr/bin/env python3
"""bench/uci_like.py: an order history the size of the UCI Online Retail
data set (541,909 lines), made from the real-data fixture
tests/data/online-retail-sample.csv (60 customers' full histories; UCI
Machine Learning Repository, CC BY 4.0): the fixture's rows repeated
COPIES times (default 94: 540,594 lines), each copy with its own
customers (CustomerID + 100000 * copy) and invoice numbers, its dates
moved by a few weeks (so that copies do not lapse on the same day), and
two columns added: email (c<CustomerID>@example.com, empty for a guest)
and consent (1). Dates are written as Unix seconds.

Usage: python3 bench/uci_like.py [COPIES] > history.csv
"""
import csv
import datetime
import os
import sys

copies = int(sys.argv[1]) if len(sys.argv) > 1 else 94
here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "..", "tests", "data", "online-retail-sample.csv")
with open(src, newline="") as f:
    rows = list(csv.reader(f))
head, body = rows[0], rows[1:]
col = {name: i for i, name in enumerate(head)}
times = [int(datetime.datetime.strptime(r[col["InvoiceDate"]][:19],
                                        "%Y-%m-%dT%H:%M:%S")
             .replace(tzinfo=datetime.timezone.utc).timestamp()) for r in body]
out = csv.writer(sys.stdout, lineterminator="\n")
out.writerow(head + ["email", "consent"])
for k in range(copies):
    shift = ((k * 7919) % 61 - 30) * 86400
    for r, t in zip(body, times):
        r = list(r)
        inv = r[col["InvoiceNo"]]
        c = inv.startswith("C")
        r[col["InvoiceNo"]] = ("C" if c else "") + "%d%s" % (k, inv[1:] if c else inv)
        r[col["InvoiceDate"]] = str(t + shift)
        cust = r[col["CustomerID"]]
        if cust:
            cust = str(int(cust) + 100000 * k)
            r[col["CustomerID"]] = cust
        out.writerow(r + ["c%s@example.com" % cust if cust else "", "1" if cust else ""])
