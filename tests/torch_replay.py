#!/usr/bin/python3
"""Replays an intrain fp32 training run in PyTorch, step by step.

Reads the run's initial weights (--out/init.safetensors, written with
`intrain train --save-init`) and its metrics.csv (train loss and learning
rate of every step), draws exactly the batches intrain drew (its counter-based
sampler, re-implemented below from core/rng.h and experiments/corpus.cpp), and
trains the independent PyTorch GPT-2 of tests/torch_peer.py with
torch.optim.SGD(momentum). Every step's loss must match intrain's: this checks
the backward pass and the optimizer, not only the forward pass.

  /usr/bin/python3 tests/torch_replay.py --run DIR --data FILE [--rtol 1e-5] [--momentum 0.9]

Exit 0 when every step matches, 1 otherwise, 77 when torch is not installed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_replay: SKIPPED: python3-torch is not installed (apt-get install python3-torch)")
    sys.exit(77)
from torch_peer import load_gpt  # noqa: E402

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
SAMPLER_TAG = 0x636F72707573  # "corpus", experiments/corpus.cpp


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def stream_id(step, tensor_id):
    return mix64(((step * 0x100000001B3) & M64) ^ mix64(tensor_id))


def lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def key_bits(seed, stream, index):
    k = mix64(seed ^ mix64(stream))
    k0, k1 = k & M32, k >> 32
    return lowbias32((lowbias32(index ^ k0) + k1) & M32)


def sample_positions(n, seed, step, B, T):
    s = stream_id(step, SAMPLER_TAG)
    out = []
    for b in range(B):
        r = (key_bits(seed, s, 2 * b) << 32) | key_bits(seed, s, 2 * b + 1)
        out.append(r % (n - T))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=50,
                    help="replay only the first N steps: two float32 implementations that differ only in summation "
                         "order drift apart chaotically along a trajectory (1e-7 after 40 steps, 1e-5 to 1e-2 after "
                         "150, fastest through a plateau escape)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, cfg, _ = load_gpt(os.path.join(a.run, "init.safetensors"))
    T = cfg["n_ctx"]
    raw = open(a.data, "rb").read()
    train = np.frombuffer(raw[: len(raw) - len(raw) // 10], dtype=np.uint8)
    rows = [l.strip().split(",") for l in open(os.path.join(a.run, "metrics.csv"))][1:][: a.steps]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=a.momentum)
    worst = 0.0
    for row in rows:
        step, ours, lr = int(row[0]), float(row[1]), float(row[3])
        pos = sample_positions(len(train), a.seed, step, a.batch, T)
        x = torch.tensor(np.stack([train[p: p + T] for p in pos]).astype(np.int64))
        y = torch.tensor(np.stack([train[p + 1: p + T + 1] for p in pos]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(model(x).reshape(-1, cfg["vocab_size"]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rel = abs(float(loss) - ours) / ours
        worst = max(worst, rel)
        print(f"step {step:4d}  torch {float(loss):.7f}  intrain {ours:.7f}  rel {rel:.1e}")
    print(f"torch_replay: {len(rows)} steps, worst relative difference {worst:.2e} (tolerance {a.rtol:g})")
    return 0 if worst <= a.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
