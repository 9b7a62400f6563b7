"""The ``demo`` task: a small byte-level transformer language model trained on the Python standard library's source.

Every machine with Python already has the corpus (the ``.py`` files next to ``os.py``), so a demo mesh needs no
download. Bytes rather than characters make the vocabulary (256) independent of the text and the Python version.

Measured on a 2-core CPU with ``torch.set_num_threads(1)``, single process, the task's defaults (AdamW, lr 2e-3,
batch 16 x 64 bytes, ~250k parameters): the loss falls from 5.45 (ln 256 = 5.55 is a uniform guess) to ~1.7 after
60 s (~920 steps; 1.69 on held-out windows) and keeps falling. lr 3e-3 reached only ~2.2 in the same time, and at
batch 128 (the default target batch) 2e-3 also beat 3e-3, 5e-3 and 1e-2 after 150 steps (2.07 vs >= 2.54).
"""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from mesh.errors import ConfigError
from mesh.tasks.base import Task

VOCAB_SIZE = 256
BLOCK_SIZE = 64
N_LAYER = 2
N_HEAD = 4
N_EMBD = 96
CORPUS_BYTES = 1_500_000
"""Enough text that a demo run does not memorise it, small enough to read in well under a second."""

Batch = tuple[torch.Tensor, torch.Tensor]


# --- corpus -------------------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    # os is frozen on some builds and may lack __file__; sysconfig knows the same directory.
    os_file = getattr(os, "__file__", None)
    return Path(os_file).parent if os_file else Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, budget: int = CORPUS_BYTES) -> list[Path]:
    """Top-level stdlib modules in name order until ``budget`` bytes: deterministic for a given Python version.

    Only the top level is read, so tests, ``idlelib`` and ``site-packages`` (all in subdirectories) never enter.
    """
    chosen: list[Path] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        if total >= budget:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


_corpus: torch.Tensor | None = None


def corpus() -> torch.Tensor:
    """The corpus as a uint8 tensor, read once per process on first use (importing this module reads nothing)."""
    global _corpus
    if _corpus is None:
        root = stdlib_dir()
        data = b"".join(path.read_bytes() for path in corpus_files(root))
        if len(data) < 10 * BLOCK_SIZE:
            raise ConfigError(
                f"the demo task reads the standard library's .py files, but {root} has almost none ({len(data)} bytes); use another --task"
            )
        _corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _corpus


HELD_OUT = 0.05  # the corpus's last 5 %: evaluation only, never trained on
EVAL_WINDOWS = 64


def split() -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out part) of the corpus."""
    data = corpus()
    cut = int(len(data) * (1 - HELD_OUT))
    return data[:cut], data[cut:]


def evaluate(model: nn.Module) -> float:
    """Mean next-byte cross-entropy over ``EVAL_WINDOWS`` fixed windows of the held-out part."""
    held_out = split()[1]
    starts = torch.linspace(0, len(held_out) - BLOCK_SIZE - 2, EVAL_WINDOWS).long().unsqueeze(1)
    chunk = held_out[starts + torch.arange(BLOCK_SIZE + 1)].long()
    device = next(model.parameters()).device
    return float(loss(model, (chunk[:, :-1].to(device), chunk[:, 1:].to(device))))


def make_batches(batch_size: int, seed: int) -> Iterator[Batch]:
    """Random windows of the corpus's training part; ``y`` is ``x`` shifted by one byte (the next byte to predict)."""
    data = split()[0]
    gen = torch.Generator().manual_seed(seed)
    window = torch.arange(BLOCK_SIZE + 1)
    while True:
        starts = torch.randint(0, len(data) - BLOCK_SIZE - 1, (batch_size, 1), generator=gen)
        chunk = data[starts + window].long()
        yield chunk[:, :-1], chunk[:, 1:]


# --- model --------------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # (batch, time, channels) -> (batch, head, time, head_dim): each head attends independently.
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # a byte sees only the bytes before it
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """Pre-norm transformer block: the residual stream stays unnormalised, which keeps small models easy to train."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = BLOCK_SIZE,
        n_layer: int = N_LAYER,
        n_head: int = N_HEAD,
        n_embd: int = N_EMBD,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: fewer parameters, and it trains faster
        self.apply(self._init_weights)
        # GPT-2: shrink the layers that write into the residual stream, so its variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small weights make the first logits near zero, so the initial loss is ln(vocab_size) (uniform guess).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``(batch, time)`` byte ids -> ``(batch, time, vocab)`` logits for the next byte."""
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"sequence of {time} bytes is longer than block_size {self.block_size}")
        pos = torch.arange(time, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_model() -> nn.Module:
    return ByteGPT()


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def charlm_task() -> Task:
    return Task(
        name="demo",
        make_model=make_model,
        make_batches=make_batches,
        loss=loss,
        evaluate=evaluate,
        description=(
            f"byte-level transformer LM ({N_LAYER} layers, {N_EMBD} wide, context {BLOCK_SIZE}) on the Python standard library's source"
        ),
        # 1024 samples an epoch: each epoch pays ~2 matchmaking waits (gradients, then parameters), so a small
        # epoch spends most of its time waiting. `mesh up` (2 CPU peers) measured ~73 samples/s at 512.
        defaults={"optimizer": "adamw", "lr": 2e-3, "batch_size": 16, "target_batch_size": 1024},
    )
