#!/usr/bin/python3
"""The PyTorch peer's full SGD training step, timed: the yardstick for
`intrain train --format fp32` (and the integer formats) on the same model.

One step = forward (tests/torch_peer.py's hand-written GPT-2), mean
cross-entropy, backward, and torch.optim.SGD(momentum=0.9).step(), on random
byte batches. Default model: 4 layers, d_model 128, 4 heads, context 128,
batch 16, vocabulary 256 (intrain train's defaults). For each thread count:
5 warm-up steps, then 30 timed steps; prints one JSON line per thread count
with the median (and min/max) ms per step and tokens/s at the median.

Run with Debian's python (python3-torch):
  /usr/bin/python3 bench/torch_step.py [--threads 1,2] [--steps 30] [--warmup 5]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_step: SKIPPED: python3-torch is not installed (apt-get install python3-torch)")
    sys.exit(77)

from torch_peer import GPT  # noqa: E402  (the peer model, shared with the test)


def init_gpt2(model, n_layer, seed):
    """GPT-2 initialisation, as layers/gpt.cpp: N(0, 0.02), residual projections
    N(0, 0.02/sqrt(2 n_layer)), LayerNorm 1/0, biases 0."""
    g = torch.Generator().manual_seed(seed)
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    with torch.no_grad():
        for name, p in model.hf_names().items():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, proj_std, generator=g)
            elif name in ("wte.weight", "wpe.weight") or name.endswith(("c_attn.weight", "c_fc.weight")):
                p.normal_(0.0, 0.02, generator=g)
            elif "ln_" in name and name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def bench(threads, args):
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model = GPT(args.layers, args.heads, args.d_model, args.context, 256)
    init_gpt2(model, args.layers, args.seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed + threads)
    B, T = args.batch, args.context

    def step():
        data = torch.randint(0, 256, (B, T + 1), generator=g)
        x, y = data[:, :-1], data[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)  # forces completion (CPU anyway)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    return {"bench": "torch_sgd_step", "threads": threads, "median_ms": round(med, 3),
            "min_ms": round(min(times), 3), "max_ms": round(max(times), 3),
            "tokens_per_s": round(B * T / (med / 1e3), 1), "steps": args.steps, "warmup": args.warmup,
            "model": {"layers": args.layers, "d_model": args.d_model, "heads": args.heads,
                      "context": args.context, "batch": args.batch, "vocab": 256},
            "params": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for t in (int(s) for s in args.threads.split(",") if s):
        print(json.dumps(bench(t, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
