"""Generated data for ``benchmarks/throughput.py`` (``data.factory`` targets; nothing is downloaded).

Both tasks are learnable, so the benchmark can compare the final accuracy of bf16 and fp32 runs, and
both are in-memory tensors, as a performance-minded user would hold data this size.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def images(n: int = 16_384, size: int = 32, classes: int = 10, seed: int = 0) -> TensorDataset:
    """``n`` 3 x ``size`` x ``size`` images of smooth random fields; the label is the argmax of a fixed
    random linear read-out of the 4x4-pooled image (a CNN learns it; chance is 1/``classes``)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 4, size // 4, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(x.shape, generator=gen)
    readout = torch.randn(3 * (size // 4) ** 2, classes, generator=gen)
    y = (torch.nn.functional.avg_pool2d(x, 4).flatten(1) @ readout).argmax(1)
    return TensorDataset(x, y)


def tokens(n: int = 8_192, seq_len: int = 257, vocab: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` sequences from a fixed random second-order Markov chain over ``vocab`` symbols (a language
    model can beat the unigram entropy by learning the transitions). Inputs and targets are the same
    sequence: the task shifts them (position t predicts t + 1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, vocab, generator=gen) * 2.5
    table = torch.softmax(logits, dim=-1).reshape(vocab * vocab, vocab)
    seqs = torch.empty(n, seq_len, dtype=torch.long)
    seqs[:, :2] = torch.randint(0, vocab, (n, 2), generator=gen)
    for t in range(2, seq_len):
        probs = table[seqs[:, t - 2] * vocab + seqs[:, t - 1]]
        seqs[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return TensorDataset(seqs, seqs)
