#!/usr/bin/env python3
"""PyTorch baseline for `moe bench fused`: one MoE layer written the way a PyTorch model does it
with the grouped matrix product -- torch.topk routing (renormalize: softmax over the K chosen
logits), sort the (token, k) pairs by expert, gather, torch._grouped_mm for both GEMMs, silu*mul,
routing-weight scaling and a scatter-add (index_add_ in f32) back to tokens.  bf16 weights and
activations.  Timed like ours: CUDA-graph replay of one call (eager with events when the
pipeline cannot be captured), median over replays.  Prints one JSON object per line:
    {"shape": "qwen3-30b-a3b", "T": 64, "us": 536.0, "graph": true}
Usage: torch_fused.py [--shapes a,b] [--T 1,16,...] [--reps 30]
Exit 2 when torch or CUDA is not available (the Lua bench then skips the column)."""
import argparse
import json
import sys

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001
    print(json.dumps({"error": "torch not importable: %s" % e}))
    sys.exit(2)

SHAPES = {  # name: (H, I, E, K)
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}


def layer(x, logits, w13, w2, K, I):
    E = w13.shape[0]
    T = x.shape[0]
    v, ids = torch.topk(logits, K, dim=-1)
    w = torch.softmax(v, dim=-1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // K
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    y = y.float() * w.reshape(-1).index_select(0, order).unsqueeze(1)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y)
    return out.to(torch.bfloat16)


def time_fn(fn, reps):
    times = []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000.0)
    times.sort()
    return times[len(times) // 2]


def bench_shape(name, Ts, reps):
    H, I, E, K = SHAPES[name]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev)
    g.manual_seed(7)
    w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * 0.02)
    w2 = (torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * 0.02)
    for T in Ts:
        x = torch.randn(T, H, device=dev, generator=g, dtype=torch.bfloat16)
        logits = torch.randn(T, E, device=dev, generator=g, dtype=torch.float32)
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    layer(x, logits, w13, w2, K, I)
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            graph = True
            try:
                gr = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gr):
                    out = layer(x, logits, w13, w2, K, I)
                for _ in range(3):
                    gr.replay()
                torch.cuda.synchronize()
                us = time_fn(gr.replay, reps)
                del out, gr
            except Exception:  # noqa: BLE001  (not capturable: eager)
                graph = False
                torch.cuda.synchronize()
                us = time_fn(lambda: layer(x, logits, w13, w2, K, I), reps)
            print(json.dumps({"shape": name, "T": T, "us": round(us, 2), "graph": graph}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"shape": name, "T": T, "error": str(e)[:200]}), flush=True)
    del w13, w2
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="1,16,64,256,1024,4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        sys.exit(2)
    Ts = [int(t) for t in a.T.split(",")]
    for name in a.shapes.split(","):
        bench_shape(name, Ts, a.reps)


if __name__ == "__main__":
    main()
