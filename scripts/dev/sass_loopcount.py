#!/usr/bin/env python3
"""sass_loopcount.py -- developer tool (not part of the tests): SASS instructions of the main loop
of every k_qg_rs instance in a `cuobjdump -sass` listing of fused_qgmma.cu.o (the loop: from the
target of the first backward branch after the eighth HGMMA to that branch; the loop body holds two
64-column stages).  Usage (GPU machine): cuobjdump -sass build-gpu/.../fused_qgmma.cu.o > F;
python3 scripts/dev/sass_loopcount.py F"""
import re,sys
txt=open(sys.argv[1]).read().split('\n')
funcs=[];cur=None
for l in txt:
    if 'Function :' in l:
        cur=[l,[]];funcs.append(cur)
    elif cur is not None:
        m=re.match(r'\s+/\*([0-9a-f]{4,})\*/\s+(.*?);',l)
        if m: cur[1].append((int(m.group(1),16),m.group(2).strip()))
for name,ins in funcs:
    mm=re.search(r'k_qg_rsILi(\d+)ELb(\d)ELb(\d)',name)
    if not mm: continue
    hg=[k for k,(a,s) in enumerate(ins) if 'HGMMA' in s]
    if len(hg)<8: continue
    found=None
    for k in range(hg[0],min(len(ins),hg[7]+300)):
        a,s=ins[k]
        m=re.search(r'BRA 0x([0-9a-f]+)',s)
        if m and ins[max(0,hg[0]-150)][0] < int(m.group(1),16) < a:
            found=(int(m.group(1),16),a); break
    if found:
        print('k_qg_rs<%s,%s,%s>'%mm.groups(), 'loop instructions per 2 stages:', (found[1]-found[0])//16+1)
