#!/usr/bin/env python3
"""PyTorch baseline for `moe bench route`: the same routing methods written with torch.topk,
timed the same way as ours (CUDA-graph replays of CALLS calls rotating over several input sets,
median over replays, divided by CALLS).  Prints one JSON object per line:
    {"case": "deepseekv3", "T": 1024, "us": 70.1}
Usage: torch_route.py [--T 1,16,...] [--cases a,b] [--calls 20] [--reps 100]
Exit 2 when torch or CUDA is not available (the Lua bench then skips the column)."""
import argparse
import json
import sys

try:
    import torch
except Exception as e:  # noqa: BLE001
    print(json.dumps({"error": "torch not importable: %s" % e}))
    sys.exit(2)

CASES = {
    # name: (method, E, K, n_group, topk_group, scale, bias)
    "deepseekv3": ("deepseekv3", 256, 8, 8, 4, 2.5, True),
    "renormalize": ("renormalize", 128, 8, 0, 0, 1.0, False),
    "minimax2": ("minimax2", 256, 8, 0, 0, 1.0, True),
    "llama4": ("llama4", 128, 1, 0, 0, 1.0, False),
    "kimi-k2": ("deepseekv3", 384, 8, 0, 0, 2.827, True),
}


def route(method, l, b, K, ng, tg, scale):
    """One routing call, f32 arithmetic, as a typical PyTorch model implementation does it."""
    if method == "renormalize":
        v, ids = torch.topk(l, K, dim=-1)
        return ids.to(torch.int32), torch.softmax(v, dim=-1)
    if method == "llama4":
        v, ids = torch.topk(l, 1, dim=-1)
        return ids.to(torch.int32), torch.sigmoid(v)
    s = torch.sigmoid(l)
    c = s + b
    if method == "deepseekv3" and ng > 1:
        T, E = c.shape
        gs = c.view(T, ng, E // ng).topk(2, dim=-1).values.sum(dim=-1)
        gidx = torch.topk(gs, tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
        emask = gmask.unsqueeze(-1).expand(T, ng, E // ng).reshape(T, E)
        c = c.masked_fill(emask == 0, float("-inf"))
    ids = torch.topk(c, K, dim=-1).indices
    w = s.gather(1, ids)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    if method == "deepseekv3":
        w = w * scale
    return ids.to(torch.int32), w


def bench(name, T, calls, reps):
    method, E, K, ng, tg, scale, has_bias = CASES[name]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev)
    g.manual_seed(1234 + T)
    nbytes = T * E * 4
    nsets = max(4, min(20, -(-100_000_000 // nbytes)))
    sets = [torch.randn(T, E, device=dev, generator=g) for _ in range(nsets)]
    b = (torch.randn(E, device=dev, generator=g) * 0.05) if has_bias else torch.zeros(E, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            route(method, sets[i % nsets], b, K, ng, tg, scale)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [route(method, sets[i % nsets], b, K, ng, tg, scale) for i in range(calls)]
    del outs
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0 / calls)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="1,16,128,1024,4096,16384")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        sys.exit(2)
    for name in a.cases.split(","):
        for T in (int(x) for x in a.T.split(",")):
            us = bench(name, T, a.calls, a.reps)
            print(json.dumps({"case": name, "T": T, "us": round(us, 3)}), flush=True)


if __name__ == "__main__":
    main()
