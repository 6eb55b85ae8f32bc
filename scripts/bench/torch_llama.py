#!/usr/bin/env python3
"""The `llama-pretrain bench` step in PyTorch (CPU, f32): same LLaMA config, same step
(forward, next-token cross-entropy, backward, AdamW). Prints and writes JSON.

    python3 -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/bench/torch_llama.py [--out bench_torch.json]
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, d, h, ffn, eps):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.n1, self.n2 = RMSNorm(d, eps), RMSNorm(d, eps)

    def forward(self, x, cos, sin, mask):
        b, t, d = x.shape
        hd = d // self.h
        y = self.n1(x)
        q, k, v = (p(y).view(b, t, self.h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        a = torch.softmax(s, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Layer(a.dim, a.heads, a.ffn, 1e-5) for _ in range(a.layers))
        self.norm = RMSNorm(a.dim, 1e-5)
        self.head = nn.Linear(a.dim, a.vocab, bias=False)
        hd = a.dim // a.heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(a.seq).float(), inv)
        e = torch.cat((f, f), dim=-1)
        self.register_buffer("cos", e.cos())
        self.register_buffer("sin", e.sin())
        self.register_buffer("mask", torch.full((a.seq, a.seq), float("-inf")).triu(1))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        return self.head(self.norm(x))


def main():
    p = argparse.ArgumentParser()
    for k, v in dict(dim=256, layers=4, heads=4, ffn=688, seq=256, batch=8, vocab=2048, warmup=2, steps=5).items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--out", default="bench_torch.json")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model = Llama(a)
    for prm in model.parameters():
        if prm.dim() == 2:
            nn.init.normal_(prm, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    n = sum(p.numel() for p in model.parameters())
    n_matmul = n - a.vocab * a.dim
    tokens = a.batch * a.seq
    flops = tokens * (6 * n_matmul + 12 * a.layers * a.dim * a.seq)
    report = {
        "implementation": f"PyTorch {torch.__version__} (CPU, f32)",
        "params": n,
        "threads": torch.get_num_threads(),
        "steps_timed": a.steps,
        "step_s_median": median,
        "step_s_mean": sum(times) / len(times),
        "tokens_per_s": tokens / median,
        "gflops_per_s": flops / median / 1e9,
        "flops_formula": "tokens * (6 * N_matmul + 12 * layers * dim * seq); N_matmul = params - vocab*dim",
        "final_loss": loss.item(),
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
