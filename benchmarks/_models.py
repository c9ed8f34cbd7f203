"""Model pieces shared by the benchmarks (run as scripts: ``benchmarks/`` is on ``sys.path``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A pre-norm transformer block (attention + 4x MLP): the tensor mix of a real LM's layer."""

    def __init__(self, d: int, heads: int | None = None) -> None:
        super().__init__()
        self.heads = heads if heads is not None else max(1, d // 64)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def many_params(n: int, gb: float, seed: int) -> nn.Module:
    """A module of ``n`` flat parameters named ``p0``..., ``gb`` GB in all at fp32 sizes: every fourth
    one (``p0``, ``p4``, ...) bf16, the rest fp32, each ``gb * 1e9 / 4 / n`` elements (at least 1),
    drawn from ``randn`` seeded with ``seed`` (equal seeds, equal values)."""
    per = max(1, int(gb * 1e9 / 4 / n))
    g = torch.Generator().manual_seed(seed)
    mod = nn.Module()
    for i in range(n):
        t = torch.randn(per, generator=g)
        mod.register_parameter(f"p{i}", nn.Parameter(t if i % 4 else t.to(torch.bfloat16)))
    return mod
