"""Tiny user-side factories for the `factory` data and model sources (imported by spec in tests)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def blobs(n: int = 60, features: int = 4) -> TensorDataset:
    """One dataset of two shifted Gaussian blobs, for Esper to split."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, features, generator=gen) + 3.0 * y[:, None]
    return TensorDataset(x, y)


class _Images(Dataset):
    """A plain map-style dataset without a `targets` attribute (labels are read by iterating)."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), float(index + self.offset)), (index + self.offset) % 3


def image_splits() -> tuple[Dataset, Dataset, Dataset]:
    """Ready-made (train, val, test) image datasets."""
    return _Images(12, 0), _Images(6, 100), _Images(6, 200)


def not_a_dataset() -> list[int]:
    return [1, 2, 3]


def linear_model(input_shape: tuple[int, ...], num_classes: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(input_shape).numel(), num_classes, bias=bias))


def tanh_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """Two hidden layers with tanh between: new ReLU units between them are not units of this network."""
    return nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(input_shape).numel(), width), nn.Tanh(),
                         nn.Linear(width, width), nn.Tanh(), nn.Linear(width, num_classes))


class _CheckedMLP(nn.Module):
    """A ReLU MLP whose forward asserts its hidden width, as hand-written models sometimes do."""

    def __init__(self, inputs: int, width: int, classes: int) -> None:
        super().__init__()
        self.width = width
        self.first, self.second, self.out = nn.Linear(inputs, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.first(x.flatten(1)))
        assert hidden.shape[-1] == self.width
        return self.out(torch.relu(self.second(hidden)))


def checked_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    return _CheckedMLP(torch.Size(input_shape).numel(), width, num_classes)


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "model"


class _TokenSequences(Dataset):
    """Dict samples as a Hugging Face pipeline gives them: ``input_ids``, ``attention_mask``, ``labels``.
    A plain map-style dataset (not tensors Esper can slice), so batches go through a DataLoader."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.labels[index]}


def majority_tokens(n: int = 384, length: int = 16, vocab: int = 32) -> _TokenSequences:
    """Sequence classification: is the majority of a sequence's tokens in the lower half of the vocabulary?"""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    return _TokenSequences(ids, ((ids < vocab // 2).sum(dim=1) > length // 2).long())


def counting_tokens(n: int = 256, length: int = 16, vocab: int = 32) -> tuple[Dataset, Dataset, Dataset]:
    """Language modelling: each sequence counts up from a random start (mod vocab), so the next token
    is predictable; the target of a causal LM is the sequence itself (the task shifts it)."""
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = (starts + torch.arange(length)) % vocab
    cut = [int(n * 0.7), int(n * 0.85)]
    return (_TokenSequences(ids[:cut[0]], ids[:cut[0]]), _TokenSequences(ids[cut[0]:cut[1]], ids[cut[0]:cut[1]]),
            _TokenSequences(ids[cut[1]:], ids[cut[1]:]))


def tiny_bert(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A Hugging Face BERT sequence classifier built from a config (nothing downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_classes)
    return BertForSequenceClassification(config)


def tiny_gpt2(input_shape: tuple[int, ...], num_classes: int, use_cache: bool = True) -> nn.Module:
    """A Hugging Face GPT-2 language model (projections are transformers' Conv1D) from a config; with
    ``use_cache=False`` it exports to pt2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=2, use_cache=use_cache)
    return GPT2LMHeadModel(config)


class _TokenMLP(nn.Module):
    """A small classifier over token ids (embedding, mean over positions, a hidden Linear)."""

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids).mean(dim=1)
        return self.out(torch.relu(self.hidden(h)))


def token_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _TokenMLP(32, num_classes)


class TwoLinear(nn.Module):
    """8 -> 16 -> 4 with a ReLU: the host of the growth controller's own-loop tests (``fc1``, ``fc2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def smooth_l1_logits_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss (``task.kind: custom``): cross-entropy plus a small penalty on the logits' size."""
    return torch.nn.functional.cross_entropy(output, targets) + 1e-3 * output.pow(2).mean()


def per_sample_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's mistake: one loss per sample instead of the mean."""
    return torch.nn.functional.cross_entropy(output, targets, reduction="none")


def one_argument_loss(output: torch.Tensor) -> torch.Tensor:
    """A user's mistake: the targets are not taken."""
    return output.mean()


def bias_free_mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """A ReLU MLP without biases, as models followed by a normalisation are often written."""
    return nn.Sequential(nn.Flatten(), nn.Linear(torch.Size(input_shape).numel(), width, bias=False), nn.ReLU(),
                         nn.Linear(width, num_classes, bias=False))
