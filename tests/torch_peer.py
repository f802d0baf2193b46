#!/usr/bin/python3
"""An independent PyTorch GPT-2 that recomputes `intrain eval`'s validation loss.

Loads an intrain float32 checkpoint (model.safetensors, Hugging Face GPT-2
names and Conv1D layouts) with a hand-written safetensors reader, runs the
model written out below in plain torch ops, and evaluates it on the
validation split exactly as `intrain eval` does (experiments/evaluate.cpp,
experiments/corpus.h):

  * the text file's bytes are the tokens (vocabulary 256);
  * validation = the last n // 10 bytes (n = file size);
  * window w: inputs val[w*T : w*T+T], targets val[w*T+1 : w*T+T+1],
    T = n_ctx, (len(val) - 1) // T windows (optionally capped), the last
    partial window dropped;
  * the loss is the mean cross-entropy (nats) over every token of every window.

Model semantics (layers/gpt.cpp and the float kernels in core/ops_*.cpp):
  h = wte[tok] + wpe[pos]
  per block: h = h + c_proj(attn(ln_1(h)));  h = h + mlp_proj(gelu(c_fc(ln_2(h))))
  LayerNorm over the last dim, biased variance, eps 1e-5;
  attention: qkv = x @ c_attn.W + b split as [q | k | v] (each C wide), head h
    uses columns h*D:(h+1)*D of each; causal softmax of (q k^T) / sqrt(D);
  GELU tanh form; final ln_f; logits = x @ wte^T (tied, no bias).

Usage:
  /usr/bin/python3 tests/torch_peer.py --model M --data FILE [--max-windows N]
                                       [--expect LOSS --rtol 1e-4] [--control]
Prints one JSON object {"loss_f32", "loss_f64", "tokens", ...}. With --expect,
exits 1 if |loss_f32 - expect| / expect > rtol. Exits 77 if torch is missing.
"""
import argparse
import json
import math
import struct
import sys

SKIP = 77

try:
    import numpy as np
    import torch
    import torch.nn as nn
except ImportError as exc:  # pragma: no cover - depends on the machine
    print("torch_peer: SKIPPED: python3-torch is not installed (apt-get install python3-torch)")
    print(f"torch_peer: ({sys.executable}: {exc})", file=sys.stderr)
    sys.exit(SKIP)


# ---------------------------------------------------------------------------
# safetensors, read by hand: u64 LE header length, JSON header, raw LE data.
# ---------------------------------------------------------------------------
_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
           "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I16": np.int16}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if 8 + hlen > len(blob):
        raise ValueError(f"{path}: header length {hlen} exceeds the file")
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    data = memoryview(blob)[8 + hlen:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        arr = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name}: {arr.size} values for shape {shape}")
        tensors[name] = arr.reshape(shape).astype(dtype, copy=True)
    return tensors, meta


# ---------------------------------------------------------------------------
# The model, written out op by op.
# ---------------------------------------------------------------------------
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
LN_EPS = 1e-5


def layer_norm(x, g, b):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased
    return (x - mean) / torch.sqrt(var + LN_EPS) * g + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.C, self.H = C, H
        P = nn.Parameter
        self.ln_1_w, self.ln_1_b = P(torch.ones(C)), P(torch.zeros(C))
        self.c_attn_w, self.c_attn_b = P(torch.zeros(C, 3 * C)), P(torch.zeros(3 * C))
        self.attn_proj_w, self.attn_proj_b = P(torch.zeros(C, C)), P(torch.zeros(C))
        self.ln_2_w, self.ln_2_b = P(torch.ones(C)), P(torch.zeros(C))
        self.c_fc_w, self.c_fc_b = P(torch.zeros(C, 4 * C)), P(torch.zeros(4 * C))
        self.mlp_proj_w, self.mlp_proj_b = P(torch.zeros(4 * C, C)), P(torch.zeros(C))

    def forward(self, h, mask):
        B, T, C = h.shape
        H = self.H
        D = C // H
        a = layer_norm(h, self.ln_1_w, self.ln_1_b)
        qkv = a @ self.c_attn_w + self.c_attn_b                      # [B, T, 3C]
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]  # [q | k | v]
        # head h uses columns h*D:(h+1)*D -> [B, H, T, D]
        q = q.reshape(B, T, H, D).transpose(1, 2)
        k = k.reshape(B, T, H, D).transpose(1, 2)
        v = v.reshape(B, T, H, D).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D))         # [B, H, T, T]
        s = s.masked_fill(~mask[:T, :T], float("-inf"))
        p = torch.softmax(s, dim=-1)
        y = (p @ v).transpose(1, 2).reshape(B, T, C)                 # merge heads
        h = h + (y @ self.attn_proj_w + self.attn_proj_b)
        a = layer_norm(h, self.ln_2_w, self.ln_2_b)
        z = a @ self.c_fc_w + self.c_fc_b
        h = h + (gelu_tanh(z) @ self.mlp_proj_w + self.mlp_proj_b)
        return h


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, n_ctx, vocab_size):
        super().__init__()
        self.n_ctx = n_ctx
        self.wte = nn.Parameter(torch.zeros(vocab_size, n_embd))
        self.wpe = nn.Parameter(torch.zeros(n_ctx, n_embd))
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f_w = nn.Parameter(torch.ones(n_embd))
        self.ln_f_b = nn.Parameter(torch.zeros(n_embd))
        self.register_buffer("mask", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)), persistent=False)

    def forward(self, idx, causal=True):
        B, T = idx.shape
        h = self.wte[idx] + self.wpe[:T].unsqueeze(0)
        mask = self.mask if causal else torch.ones_like(self.mask)  # causal=False: a control only
        for blk in self.h:
            h = blk(h, mask)
        h = layer_norm(h, self.ln_f_w, self.ln_f_b)
        return h @ self.wte.t()  # tied head, no bias

    # Hugging Face GPT-2 name -> attribute path.
    def hf_names(self):
        names = {"wte.weight": self.wte, "wpe.weight": self.wpe,
                 "ln_f.weight": self.ln_f_w, "ln_f.bias": self.ln_f_b}
        for i, b in enumerate(self.h):
            p = f"h.{i}."
            names.update({
                p + "ln_1.weight": b.ln_1_w, p + "ln_1.bias": b.ln_1_b,
                p + "attn.c_attn.weight": b.c_attn_w, p + "attn.c_attn.bias": b.c_attn_b,
                p + "attn.c_proj.weight": b.attn_proj_w, p + "attn.c_proj.bias": b.attn_proj_b,
                p + "ln_2.weight": b.ln_2_w, p + "ln_2.bias": b.ln_2_b,
                p + "mlp.c_fc.weight": b.c_fc_w, p + "mlp.c_fc.bias": b.c_fc_b,
                p + "mlp.c_proj.weight": b.mlp_proj_w, p + "mlp.c_proj.bias": b.mlp_proj_b,
            })
        return names


def load_gpt(path):
    tensors, meta = read_safetensors(path)
    try:
        cfg = {k: int(meta[k]) for k in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size")}
    except KeyError as exc:
        raise ValueError(f"{path}: metadata has no {exc}; is this an intrain checkpoint?")
    model = GPT(**cfg)
    names = model.hf_names()
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
    with torch.no_grad():
        for name, param in names.items():
            arr = tensors[name]
            if tuple(arr.shape) != tuple(param.shape):
                raise ValueError(f"{path}: {name} has shape {arr.shape}, expected {tuple(param.shape)}")
            if arr.dtype != np.float32:
                raise ValueError(f"{path}: {name} is {arr.dtype}, expected float32 (an fp32 checkpoint)")
            param.copy_(torch.from_numpy(arr))
    return model, cfg, meta


# ---------------------------------------------------------------------------
# Validation windows, as experiments/corpus.h's ValWindows.
# ---------------------------------------------------------------------------
def validation_windows(data_path, T, max_windows):
    with open(data_path, "rb") as f:
        raw = f.read()
    n = len(raw)
    val = np.frombuffer(raw, dtype=np.uint8)[n - n // 10:]
    nw = (len(val) - 1) // T if len(val) >= 1 else 0
    if max_windows and max_windows > 0:
        nw = min(nw, max_windows)
    if nw <= 0:
        raise ValueError(f"{data_path}: the validation split ({len(val)} bytes) holds no full window of {T} bytes")
    x = np.stack([val[w * T: w * T + T] for w in range(nw)]).astype(np.int64)
    y = np.stack([val[w * T + 1: w * T + T + 1] for w in range(nw)]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def mean_loss(model, x, y, batch, causal=True):
    total = 0.0
    count = 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        logits = model(xb, causal)  # [B, T, V] in the model's dtype
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
        total += float(nll.double().sum())
        count += nll.numel()
    return total / count, count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="intrain fp32 model.safetensors")
    ap.add_argument("--data", required=True, help="text file whose validation split (last 10%%) is evaluated")
    ap.add_argument("--max-windows", type=int, default=0, help="cap on validation windows (0: all)")
    ap.add_argument("--batch", type=int, default=16, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--expect", type=float, default=None, help="intrain eval's loss to compare with")
    ap.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for --expect")
    ap.add_argument("--control", action="store_true",
                    help="also report the f32 loss with the causal mask removed (a deliberately wrong model), "
                         "to show how far a semantic error moves the loss on this checkpoint")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        model, cfg, meta = load_gpt(args.model)
        x, y = validation_windows(args.data, cfg["n_ctx"], args.max_windows)
    except (OSError, ValueError) as exc:
        print(f"torch_peer: error: {exc}", file=sys.stderr)
        return 2
    fmt = meta.get("format", "")
    if fmt and fmt != "fp32":
        print(f"torch_peer: note: checkpoint format is '{fmt}'; comparing its stored float values", file=sys.stderr)

    model.eval()
    loss32, tokens = mean_loss(model.float(), x, y, args.batch)
    loss64, _ = mean_loss(model.double(), x, y, args.batch)
    out = {"loss_f32": loss32, "loss_f64": loss64, "tokens": tokens, "windows": int(x.shape[0]),
           "config": cfg, "torch": torch.__version__}
    if args.control:
        wrong, _ = mean_loss(model.float(), x, y, args.batch, causal=False)
        out["control_no_causal_mask_f32"] = wrong
        out["control_rel_shift"] = abs(wrong - loss32) / abs(loss32)
    if args.expect is not None:
        rel = abs(loss32 - args.expect) / abs(args.expect)
        out.update({"expect": args.expect, "rel_diff": rel, "rel_diff_f64": abs(loss64 - args.expect) / abs(args.expect),
                    "rtol": args.rtol})
    print(json.dumps(out))
    if args.expect is not None:
        if not rel <= args.rtol:
            print(f"torch_peer: MISMATCH: torch f32 loss {loss32!r} vs expected (intrain) {args.expect!r}: "
                  f"relative difference {rel:.3e} > rtol {args.rtol:g} (torch f64: {loss64!r})", file=sys.stderr)
            return 1
        print(f"torch_peer: OK: torch f32 loss {loss32!r} vs intrain {args.expect!r}: "
              f"relative difference {rel:.3e} <= {args.rtol:g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
