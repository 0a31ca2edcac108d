#!/usr/bin/env python3
"""ncu_src_top.py -- summarise `ncu -i REPORT --page source --print-source sass --csv` output:
per kernel, the stall reasons' shares of all warp samples and the SASS lines with the most
samples (address tail, instruction, top two reasons).  Each kernel's block has its own header
line (the stall columns differ between kernels), so every block is parsed with its own.
Usage: ncu_src_top.py FILE.csv [LINES]"""
import csv
import sys


def blocks(rows):
    kern, hdr, body = None, None, []
    for r in rows:
        if len(r) >= 2 and r[0] == "Kernel Name":
            if kern and hdr:
                yield kern, hdr, body
            kern, hdr, body = r[1], None, []
        elif r and r[0] == "Address":
            hdr = r
        elif kern and hdr and len(r) == len(hdr):
            body.append(r)
    if kern and hdr:
        yield kern, hdr, body


def num(x):
    try:
        return float(x)
    except ValueError:
        return 0.0


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(f))
    seen = set()
    for kern, hdr, body in blocks(rows):
        key = (kern, len(body), tuple(body[0]) if body else ())
        if key in seen:  # the export may list a kernel's block twice
            continue
        seen.add(key)
        reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
        i_all = hdr.index("Warp Stall Sampling (All Samples)")
        tot = {i: sum(num(r[i]) for r in body) for i in reasons}
        total = sum(tot.values()) or 1.0
        print("== %s (%d SASS lines)" % (kern[:90], len(body)))
        print("   " + "  ".join("%s %.1f%%" % (hdr[i][6:], 100 * t / total)
                                for i, t in sorted(tot.items(), key=lambda a: -a[1])[:8]))
        samples = sum(num(r[i_all]) for r in body) or 1.0
        for r in sorted(body, key=lambda r: -num(r[i_all]))[:top]:
            why = sorted(((num(r[i]), hdr[i][6:]) for i in reasons), reverse=True)[:2]
            print("   %5.1f%%  %s  %-48s %s" % (100 * num(r[i_all]) / samples, r[0][-5:], r[1][:48],
                                               ", ".join("%s %d" % (n, v) for v, n in why if v > 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
