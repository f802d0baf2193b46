#!/usr/bin/python3
"""The PyTorch peer's training curve on the same job as `intrain train`:
GPT-2 init (as layers/gpt.cpp), SGD momentum 0.9, linear warmup then cosine to
10% of the peak (optim/sgd.cpp's LrSchedule), batches of random windows of the
training split (the first 90% of the corpus), validation on consecutive
windows of the last 10%. Batches come from torch's generator, not intrain's
counter hash, so the curve is comparable in distribution, not bit for bit.
An independent check that intrain's fp32 training dynamics (not only its
forward pass) are those of a standard implementation.

  /usr/bin/python3 tests/torch_train_curve.py --data ~/.cache/intrain/kjv.txt --steps 2000 --out curve.csv
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_train_curve: SKIPPED: python3-torch is not installed (apt-get install python3-torch)")
    sys.exit(77)
from torch_peer import GPT  # noqa: E402
from torch_step import init_gpt2  # noqa: E402


def lr_at(step, peak, warmup, total, final=0.1):
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = peak * final
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    raw = open(a.data, "rb").read()
    n_val = len(raw) // 10
    train = torch.tensor(list(raw[: len(raw) - n_val]), dtype=torch.long)
    val = torch.tensor(list(raw[len(raw) - n_val:]), dtype=torch.long)
    T, B = a.context, a.batch
    model = GPT(4, 4, 128, T, 256)
    init_gpt2(model, 4, a.seed)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    g = torch.Generator().manual_seed(a.seed)

    def val_loss(windows):
        model.eval()
        with torch.no_grad():
            nw = min(windows, (len(val) - 1) // T) if windows > 0 else (len(val) - 1) // T
            tot, cnt = 0.0, 0
            for w0 in range(0, nw, B):
                idx = range(w0, min(nw, w0 + B))
                x = torch.stack([val[w * T: w * T + T] for w in idx])
                y = torch.stack([val[w * T + 1: w * T + T + 1] for w in idx])
                tot += float(F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1), reduction="sum"))
                cnt += y.numel()
        model.train()
        return tot / cnt

    with open(a.out, "w") as f:
        f.write("step,train_loss,val_loss,lr\n")
        for s in range(a.steps):
            pos = torch.randint(0, len(train) - T - 1, (B,), generator=g)
            x = torch.stack([train[p: p + T] for p in pos])
            y = torch.stack([train[p + 1: p + T + 1] for p in pos])
            lr = lr_at(s, a.lr, a.warmup, a.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = s + 1 == a.steps
            v = ""
            if last:
                v = f"{val_loss(0):.6f}"
            elif (s + 1) % a.eval_every == 0:
                v = f"{val_loss(a.eval_windows):.6f}"
            f.write(f"{s},{float(loss):.6f},{v},{lr:.6g}\n")
            if (s + 1) % 100 == 0 or last:
                print(f"step {s + 1} loss {float(loss):.4f} val {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
