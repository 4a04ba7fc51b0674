"""Health signals: what the policy knows about each Kasmina layer and about the run as a whole.

Per layer (measured every ``policy.merit_every`` steps, on the same steps as gradient merit):

- **activation statistics** of the layer output: the share of units that are never positive on the
  batch (dead units when a ReLU follows) and the effective rank as a share of the width. A layer
  whose outputs collapse onto a few directions has little use for its own width and may need a
  branch of a different kind. The estimator: each measurement folds the covariance of the centred
  outputs (``width x width``, one matmul) into a running average; :meth:`LayerSignals.read` takes the
  participation ratio of that average (``tr(C)^2 / ||C||_F^2``, the effective number of directions)
  and divides it by the width: 1/width for outputs on one direction, ~1 for isotropic ones. It needs
  no eigendecomposition (see :func:`_effective_rank_share`).
- the **residual functional gradient** (TINY's expressivity bottleneck): ``v = B * dL/dy`` is the
  per-sample direction the loss wants the layer output to move in. The part of ``v`` a change of the
  host's own weights can produce is its least-squares projection onto the layer inputs; what is left
  is what only new capacity can provide. With ``S = E[x x^T]``, ``M = E[x v^T]`` and
  ``q = E[||v||^2]`` averaged over rows (samples, or positions of a convolution), the residual is
  ``q - tr(M^T S^+ M)`` per row, times the rows per sample. ``S``, ``M`` and ``q`` are averaged
  across measurements, so the projection is taken over many batches (one batch is often smaller
  than the input width, which makes every gradient look expressible).

Cost. A measurement uses every row for the cheap statistics (the dead share, the finiteness check)
and the rows of the first few samples of the batch for the matrix ones: at least
``ROWS_PER_WIDTH`` rows per input (or output) feature and at least ``MIN_ROWS``, whole samples, at
most the batch. The sampler shuffles, so the first samples are a random subset; every statistic is an
average over rows, so a subset estimates the same expectation, and the running average over
measurements supplies the rows a single subset lacks (with the default ``merit_decay`` of 0.8 it
weighs about nine measurements, i.e. ~18 rows per input feature, which bounds the in-sample
optimism of the projection to a few percent of the residual, the same share for every layer).
No statistic needs a decomposition at measurement time (about thirty small tensor operations per
layer, activations and gradients together); the running averages of all layers live in one device
buffer per group (:class:`StatBank`) and are folded together. Nothing syncs with the host until
:meth:`LayerSignals.read` (one sync, plus the residual's pseudo-inverse per layer).

Robustness. A layer's measurement with a non-finite activation or gradient anywhere in the batch, or
whose statistics overflow float32, is not folded: it is counted as rejected, that layer's running
averages keep their previous value (one NaN does not poison them), and the layer reads as not
``finite`` until a finite measurement arrives. No measurement or read raises on such input.

Measurement is off the hot path: forward hooks exist only during the forward pass of a measurement
step (:meth:`LayerSignals.measuring`), or a caller invokes :meth:`LayerSignals.observe_forward` from
wherever it sees a layer's input and output.

Global signals: least-squares trends of the logged training losses and of the validation losses, the
train-validation gap, and the validation plateau.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from esper_core.seeds.kasmina import KasminaLayer

MAX_PROJECTION_WIDTH = 1024
"""Inputs (features, or channels x kernel area) above which the projection is skipped: ``S`` would
cost ``width**2`` floats and its pseudo-inverse ``width**3`` FLOPs. Such layers report the whole
functional gradient as residual."""

ROWS_PER_WIDTH = 2
"""Rows per feature a measurement takes for its matrix statistics (see the module docstring)."""

MIN_ROWS = 1024
"""Rows a measurement takes at least (all of them when the batch has fewer)."""

ACTIVATIONS, GRADIENTS = "activations", "gradients"
_STATS = {ACTIVATIONS: {"dead", "cov"}, GRADIENTS: {"q", "S", "M"}}
_COUNTERS = ("folds", "measured", "ok")


@dataclass(frozen=True)
class LayerHealth:
    """What the running averages say about a layer (all per sample). Fields are NaN when no finite
    measurement has been folded yet; ``finite`` is False when the latest measurement was rejected as
    non-finite, which the policy should read as "do not grow here"."""

    dead_fraction: float
    effective_rank: float  # share of the output width, 0..1 (participation ratio of the average covariance)
    gradient: float  # E ||v||^2, the squared functional gradient at the layer output
    residual: float  # the part of it the host's own weights cannot express
    finite: bool = True

    @property
    def residual_share(self) -> float:
        if not math.isfinite(self.residual) or not math.isfinite(self.gradient):
            return math.nan
        return self.residual / self.gradient if self.gradient > 0 else 0.0

    def to_json(self) -> dict[str, float | bool | None]:
        values = asdict(self) | {"residual_share": self.residual_share}
        return {k: v if isinstance(v, bool) else _round(v, 4 if k == "residual_share" else 6)
                for k, v in values.items()}


class StatBank:
    """Exponential running averages of named statistics for many layers, in one flat device buffer.

    :meth:`add` queues one layer's measurement: its statistics and a ``check`` scalar whose
    finiteness certifies the inputs they came from (two or three tensor operations per layer).
    :meth:`flush` folds everything queued: a measurement is accepted only if its check and the sum of
    its statistics are finite; a rejected one leaves the layer's averages as they were and counts as
    rejected. When the queue holds every layer in buffer order (what a measurement of the whole
    model produces) the fold is a handful of operations over the buffer, whatever the number of
    layers. Queued measurements are flushed before a layer is queued twice and before anything is
    read, so results do not depend on when flushing happens. Nothing here syncs with the host.

    The average is exponential, ``mean <- decay * mean + (1 - decay) * x`` on accepted measurements,
    and a layer's first accepted measurement becomes its mean. A statistic named in ``fixed`` has its
    own decay (0: the mean is the latest accepted value); ``initial`` values (given when a layer is
    first added) stand until a measurement is accepted.
    """

    def __init__(self, decay: float, fixed: dict[str, float] | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.decay = decay
        self.fixed = fixed or {}
        self.reduce = reduce  # under torchrun: the mean over the ranks, applied to each flush's measurements
        self._clear()

    def _clear(self) -> None:
        self.shapes: dict[str, dict[str, torch.Size]] = {}  # layer -> statistic -> shape, in buffer order
        self.spans: dict[str, tuple[int, int]] = {}  # layer -> [start, stop) in the buffer
        self._index: dict[str, int] = {}  # layer -> its position among the layers
        self.measured: dict[str, int] = {}
        self.mean = torch.zeros(0)
        self.weight = torch.zeros(0)  # per value: the weight of the next accepted measurement
        self.after = torch.zeros(0)  # per value: 1 - its decay, the weight once one was accepted
        self.folds = torch.zeros(0, dtype=torch.int64)  # per layer
        self.ok = torch.zeros(0, dtype=torch.bool)  # per layer: the latest measurement was accepted
        self._owner: torch.Tensor | None = None  # per value: the position of its layer
        self._queue: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, layer: str, stats: dict[str, torch.Tensor], check: torch.Tensor,
            initial: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Queue one measurement of ``layer``; returns its full check (finite iff it is accepted),
        which a later measurement of the same pass can depend on."""
        names = sorted(stats)
        shapes = {n: stats[n].shape for n in names}
        flat = (torch.cat([stats[n].reshape(-1) for n in names]) if len(names) > 1 else stats[names[0]].reshape(-1)).float()
        if layer in self._queue:
            self.flush()
        if self.shapes.get(layer) != shapes or self.mean.device != flat.device:
            if layer in self.spans or self.mean.device != flat.device:
                self.flush()  # the buffer is about to be rearranged
            self._lay_out(layer, shapes, flat.device, initial)
        check = check + flat.sum()
        self._queue[layer] = (flat, check)
        self.measured[layer] += 1
        return check

    def flush(self) -> None:
        if not self._queue:
            return
        names, queued = list(self._queue), list(self._queue.values())
        self._queue = {}
        if self.reduce is not None:  # every rank folds the ranks' mean measurement (a non-finite one anywhere rejects it)
            sizes = [flat.numel() for flat, _ in queued]
            merged = self.reduce(torch.cat([*(flat for flat, _ in queued), torch.stack([c.float() for _, c in queued])]))
            parts = merged.split([*sizes, len(queued)])
            queued = [(flat, check) for flat, check in zip(parts[:-1], parts[-1].unbind())]
        if set(names) == set(self.spans) and names != list(self.spans):
            self._reorder(names)  # e.g. after a restore, whose key order is not the hooks' order
        valid = torch.isfinite(torch.stack([check for _, check in queued]))
        if names == list(self.spans):  # the whole buffer at once
            if self._owner is None:
                sizes = torch.tensor([b - a for a, b in self.spans.values()])
                self._owner = torch.arange(len(sizes)).repeat_interleave(sizes).to(self.mean.device)
            self._fold(slice(None), torch.cat([flat for flat, _ in queued]), valid[self._owner])
            self.folds = self.folds + valid
            self.ok = valid
            return
        for i, (name, (flat, _)) in enumerate(zip(names, queued)):  # some layers only: one at a time
            self._fold(slice(*self.spans[name]), flat, valid[i])
            self.folds[self._index[name]] += valid[i]
            self.ok[self._index[name]] = valid[i]

    def _fold(self, part: slice, flat: torch.Tensor, accept: torch.Tensor) -> None:
        mean, weight = self.mean[part], self.weight[part]
        self.mean[part] = torch.where(accept, torch.lerp(mean, flat, weight), mean)
        self.weight[part] = torch.where(accept, self.after[part], weight)

    def current(self, layer: str) -> dict[str, torch.Tensor] | None:
        """A layer's averages as they stand (its initial values before a first accepted measurement),
        or None for a layer not laid out yet."""
        if layer not in self.spans:
            return None
        if layer in self._queue:
            self.flush()
        return _split(self.mean[slice(*self.spans[layer])], self.shapes[layer])

    def stats(self, layer: str) -> dict[str, torch.Tensor]:
        """A layer's means (NaN before its first accepted measurement; flushed first)."""
        self.flush()
        mean = torch.where(self.folds[self._index[layer]] > 0, self.mean[slice(*self.spans[layer])], math.nan)
        return _split(mean, self.shapes[layer])

    def layer_ok(self, layer: str) -> torch.Tensor:
        self.flush()
        return self.ok[self._index[layer]]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, as copies: the averages by statistic name (zeros, or the initial values, before a
        first accepted measurement) and the counters."""
        self.flush()
        return {layer: _split(self.mean[start:stop].clone(), self.shapes[layer])
                | {"folds": self.folds[i].clone(), "measured": torch.tensor(self.measured[layer]), "ok": self.ok[i].clone()}
                for i, (layer, (start, stop)) in enumerate(self.spans.items())}

    def load_state_dict(self, layers: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        """Restore from :meth:`state_dict` (already validated by the caller)."""
        self._clear()
        for layer, tensors in layers.items():
            stats = {k: v for k, v in tensors.items() if k not in _COUNTERS}
            names = sorted(stats)
            self._lay_out(layer, {n: stats[n].shape for n in names}, device, None)
            part, i = slice(*self.spans[layer]), self._index[layer]
            self.mean[part] = torch.cat([stats[n].reshape(-1).float() for n in names]).to(device)
            self.folds[i] = int(tensors["folds"])
            self.ok[i] = bool(tensors["ok"])
            self.measured[layer] = int(tensors["measured"])
            if int(tensors["folds"]) > 0:
                self.weight[part] = self.after[part]

    def _lay_out(self, layer: str, shapes: dict[str, torch.Size], device: torch.device,
                 initial: dict[str, torch.Tensor] | None) -> None:
        """Give ``layer`` (new, or with new shapes) its place at the end of the buffer."""
        if layer in self.spans:
            self._reorder([name for name in self.spans if name != layer])
            del self.shapes[layer], self.measured[layer]
        if self.mean.device != device:
            self.mean, self.weight, self.after = self.mean.to(device), self.weight.to(device), self.after.to(device)
            self.folds, self.ok = self.folds.to(device), self.ok.to(device)
        start, size, initial = self.mean.numel(), sum(math.prod(s) for s in shapes.values()), initial or {}
        mean = [initial[n].reshape(-1).float() if n in initial else torch.zeros(math.prod(s), device=device)
                for n, s in shapes.items()]
        after = [torch.full((math.prod(s),), 1.0 - self.fixed.get(n, self.decay), device=device) for n, s in shapes.items()]
        self.mean = torch.cat([self.mean, *mean])
        self.weight = torch.cat([self.weight, torch.ones(size, device=device)])
        self.after = torch.cat([self.after, *after])
        self.folds = torch.cat([self.folds, torch.zeros(1, dtype=torch.int64, device=device)])
        self.ok = torch.cat([self.ok, torch.ones(1, dtype=torch.bool, device=device)])
        self.shapes[layer], self.spans[layer] = shapes, (start, start + size)
        self._index[layer] = len(self.spans) - 1
        self.measured[layer] = 0
        self._owner = None

    def _reorder(self, names: list[str]) -> None:
        """Rearrange the buffer into the order ``names`` (a subset of the layers: the rest are dropped)."""
        parts = [self.spans[n] for n in names]
        take = (lambda t: torch.cat([t[a:b] for a, b in parts]) if parts else t[:0])
        self.mean, self.weight, self.after = take(self.mean), take(self.weight), take(self.after)
        order = torch.tensor([self._index[n] for n in names], dtype=torch.long, device=self.folds.device)
        self.folds, self.ok = self.folds[order], self.ok[order]
        spans, start = {}, 0
        for name, (a, b) in zip(names, parts):
            spans[name] = (start, start + b - a)
            start += b - a
        self.spans, self._index, self._owner = spans, {name: i for i, name in enumerate(spans)}, None


def _split(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    sizes = [math.prod(s) for s in shapes.values()]
    return {n: part.view(s) for (n, s), part in zip(shapes.items(), flat.split(sizes))}


class LayerSignals:
    """Running per-layer statistics, fed by hooks armed with :meth:`measuring` or by direct calls to
    :meth:`observe_forward` (or its two halves)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._banks = {ACTIVATIONS: StatBank(decay), GRADIENTS: StatBank(decay)}
        self._rows: dict[str, float] = {}  # layer -> output rows (positions) per sample, latest
        self._ones: dict[tuple[int, torch.device], torch.Tensor] = {}  # bias columns, by length

    def share(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Under torchrun: fold the mean of the ranks' measurements (``reduce``), so every rank's data
        counts and every rank holds the same averages. Call :meth:`flush` on every rank after each
        measured step, so no rank is left with a queue that a later read would reduce alone."""
        for bank in self._banks.values():
            bank.reduce = reduce

    def flush(self) -> None:
        """Fold the queued measurements now (a collective under torchrun: every rank calls it)."""
        for bank in self._banks.values():
            bank.flush()

    @contextmanager
    def measuring(self, layers: dict[str, KasminaLayer], active: bool) -> Iterator[None]:
        """Hook every layer during the forward pass inside the block when ``active``; the gradient
        statistics are taken during the following backward pass through a tensor hook."""
        if not active:
            yield
            return
        handles = [layer.register_forward_hook(self._forward_hook(name)) for name, layer in layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            assert isinstance(module, KasminaLayer)
            self.observe_forward(name, module, inputs[0], output)
        return hook

    def observe_forward(self, name: str, layer: KasminaLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        """Measure one forward pass of ``layer`` (input ``x``, output ``y``): the activation statistics
        now and, when ``y`` takes part in autograd, the gradient statistics when the backward pass
        reaches ``y`` (a tensor hook; only the first samples of ``x`` that it needs are kept). A pass
        whose activations are non-finite has its gradient statistics rejected too."""
        if y.dim() < 2:
            return  # an unbatched call: nothing to average over
        check = self.observe_activations(name, y, layer.spec.kind)
        if y.requires_grad:
            kept = x[:_samples(y.shape, projection_width(layer), layer.spec.kind)].detach()
            y.register_hook(lambda grad: self.observe_output_grad(name, layer, kept, grad, check))

    @torch.no_grad()
    def observe_activations(self, name: str, y: torch.Tensor, kind: str) -> torch.Tensor:
        """Queue the dead units and the output covariance of one batch of outputs of layer ``name`` (of
        host ``kind``: a convolution's channels come second); returns the measurement's check (see
        :meth:`StatBank.add`)."""
        with _no_autocast(y.device.type):
            y = y.detach()
            width = y.shape[-1] if kind == "linear" else y.shape[1]
            total = y.sum(dtype=torch.float32)
            top = _rows_out(y, kind).amax(dim=0)
            rows = _rows_out(y[:_samples(y.shape, width, kind)], kind).float()
            centred = rows - rows.mean(dim=0, keepdim=True)
            cov = torch.addmm(centred[:1], centred.T, centred, beta=0, alpha=1 / rows.shape[0])
            return self._banks[ACTIVATIONS].add(name, {"dead": top <= 0, "cov": cov}, total)

    @torch.no_grad()
    def observe_output_grad(self, name: str, layer: KasminaLayer, x: torch.Tensor, grad: torch.Tensor,
                            check: torch.Tensor | None = None) -> None:
        """Queue the functional-gradient statistics of one backward pass: ``grad`` is ``dL/dy`` for the
        whole batch, ``x`` the layer input (the whole batch or its first samples; only the first
        samples are used, see the module docstring); a non-finite ``check`` rejects the measurement."""
        with _no_autocast(grad.device.type):
            batch = grad.shape[0]
            total = grad.sum(dtype=torch.float32)
            if check is not None:
                total = total + check  # only its finiteness matters: a non-finite check rejects
            kind = layer.spec.kind
            k = min(x.shape[0], _samples(grad.shape, projection_width(layer), kind))
            rows_v = _rows_out(grad[:k], kind).float()
            n = rows_v.shape[0]
            flat = rows_v.reshape(-1)
            stats = {"q": torch.dot(flat, flat) * (batch * batch / n)}  # v = batch * dL/dy, per row
            rows_x = self._rows_in(layer, x[:k])
            if rows_x is not None and rows_x.shape[1] <= MAX_PROJECTION_WIDTH:
                stats["S"] = torch.addmm(rows_x[:1], rows_x.T, rows_x, beta=0, alpha=1 / n)
                stats["M"] = torch.addmm(rows_v[:1], rows_x.T, rows_v, beta=0, alpha=batch / n)
            self._rows[name] = n / k
            self._banks[GRADIENTS].add(name, stats, total)

    def _rows_in(self, layer: KasminaLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The host's inputs as rows matching :func:`_rows_out` of its output, with a ones column
        when the host has a bias (which can absorb the mean); ``None`` for grouped convolutions and
        unevenly padded ones ('same' with an even kernel), whose patches ``unfold`` cannot cut."""
        host, spec = layer.host, layer.spec
        if spec.kind != "linear":
            pads = spec.pads()
            if getattr(host, "groups", 1) != 1 or any(before != after for before, after in pads):
                return None
            kernel, dilation, stride = spec.kernel, spec.dilation, spec.stride
            padding = tuple(before for before, _ in pads)
            if spec.kind == "conv1d":  # a length-L sequence is a 1 x L image
                x, kernel, dilation, stride, padding = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride), (0, *padding)
            patches = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.float().reshape(-1, x.shape[-1])
        if getattr(host, "bias", None) is None:
            return rows
        key = (rows.shape[0], rows.device)
        if key not in self._ones:
            self._ones[key] = torch.ones(rows.shape[0], 1, device=rows.device)
        return torch.cat([rows, self._ones[key]], dim=1)

    def read(self) -> dict[str, LayerHealth]:
        """The current averages of every layer with gradient statistics (one host-device sync, plus a
        pseudo-inverse per layer). Never raises on what was measured."""
        acts, grads = self._banks[ACTIVATIONS], self._banks[GRADIENTS]
        names, rows = [], []
        for name in grads.spans:
            g = grads.stats(name)
            ok = grads.layer_ok(name)
            dead = erank = torch.full((), math.nan, device=g["q"].device)
            if name in acts.spans:
                a = acts.stats(name)
                dead, erank, ok = a["dead"].mean(), _effective_rank_share(a["cov"]), ok & acts.layer_ok(name)
            per_sample = self._rows.get(name, 1.0)
            rows.append(torch.stack([dead, erank, g["q"] * per_sample, _residual(g) * per_sample, ok.float()]))
            names.append(name)
        if not rows:
            return {}
        values = torch.stack(rows).tolist()
        return {name: LayerHealth(*v[:4], finite=v[4] == 1.0) for name, v in zip(names, values)}

    def nonfinite_layers(self) -> list[str]:
        """Layers whose latest measurement was rejected as non-finite (one sync, no decomposition:
        cheap enough for the governor to ask at every judgement)."""
        banks = [bank for bank in self._banks.values() if bank.spans]
        for bank in banks:
            bank.flush()
        if not banks:
            return []
        flags = torch.cat([bank.ok for bank in banks]).tolist()
        names = [name for bank in banks for name in bank.spans]
        return sorted({name for name, ok in zip(names, flags) if not ok})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors, keyed ``layer/group.statistic`` (they go with the checkpoint's tensors)."""
        out = {f"{name}/{group}.{key}": value for group, bank in self._banks.items()
               for name, tensors in bank.state_dict().items() for key, value in tensors.items()}
        out.update({f"{name}/{GRADIENTS}.rows": torch.tensor(rows) for name, rows in self._rows.items()})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore from :meth:`state_dict`; ``ValueError`` naming the key for anything malformed (an
        unknown group or statistic, a missing counter, a non-finite average, inconsistent shapes)."""
        parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {ACTIVATIONS: {}, GRADIENTS: {}}
        rows: dict[str, float] = {}
        for key, value in tensors.items():
            name, _, rest = key.rpartition("/")
            group, _, stat = rest.partition(".")
            if not name or group not in _STATS or stat not in _STATS[group] | set(_COUNTERS) | {"rows"}:
                raise ValueError(f"{key}: not a layer statistic")
            if stat == "rows":
                if group != GRADIENTS or value.dim() != 0 or not value.is_floating_point() or not float(value) > 0:
                    raise ValueError(f"{key}: expected a positive scalar")
                rows[name] = float(value)
                continue
            parts[group].setdefault(name, {})[stat] = value
        for group, layers in parts.items():
            for name, stats in layers.items():
                _check_layer_state(f"{name}/{group}", group, stats)
        for name in parts[GRADIENTS]:
            if name not in rows:
                raise ValueError(f"{name}/{GRADIENTS}.rows: missing")
        for group, layers in parts.items():
            self._banks[group].load_state_dict(layers, device)
        self._rows = rows


def _no_autocast(device_type: str) -> AbstractContextManager[None]:
    """Statistics in float32 even inside an autocast region (entering autocast costs more than the
    check, so it is entered only when needed)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _check_layer_state(where: str, group: str, stats: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``stats`` is one layer's state of ``group``."""
    for key, dtype in (("folds", torch.int64), ("measured", torch.int64), ("ok", torch.bool)):
        value = stats.get(key)
        if value is None or value.dtype != dtype or value.dim() != 0:
            raise ValueError(f"{where}.{key}: expected a scalar {dtype}")
    if int(stats["folds"]) < 0 or int(stats["measured"]) < int(stats["folds"]):
        raise ValueError(f"{where}: counts out of range (folds {int(stats['folds'])}, measured {int(stats['measured'])})")
    for key, value in stats.items():
        if key not in _COUNTERS and (not value.is_floating_point() or not bool(torch.isfinite(value).all())):
            raise ValueError(f"{where}.{key}: expected finite floating-point values")
    required = {"dead", "cov"} if group == ACTIVATIONS else {"q"}
    missing = required - stats.keys()
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}")
    if group == ACTIVATIONS:
        dead, cov = stats["dead"], stats["cov"]
        if dead.dim() != 1 or cov.shape != (dead.shape[0], dead.shape[0]):
            raise ValueError(f"{where}.cov: shape {tuple(cov.shape)} does not match {tuple(dead.shape[:1])} units")
        return
    if stats["q"].dim() != 0:
        raise ValueError(f"{where}.q: expected a scalar")
    if ("S" in stats) != ("M" in stats):
        raise ValueError(f"{where}: S and M come together")
    if "S" in stats:
        s, m = stats["S"], stats["M"]
        if s.dim() != 2 or m.dim() != 2 or s.shape[0] != s.shape[1] or m.shape[0] != s.shape[0]:
            raise ValueError(f"{where}.S/M: inconsistent shapes {tuple(s.shape)} and {tuple(m.shape)}")


def _effective_rank_share(cov: torch.Tensor) -> torch.Tensor:
    """Participation ratio of a covariance, ``(sum of eigenvalues)^2 / sum of squared eigenvalues =
    tr(C)^2 / ||C||_F^2``, over its width (NaN if the covariance is not finite): 1/width for outputs
    on one direction (or none), ~1 for isotropic ones. It needs no eigendecomposition: O(width^2) at
    read time, where the entropy of the spectrum (Roy & Vetterli) took one ``eigvalsh`` per layer,
    50 ms for a 1024-wide layer on a CPU, most of a transformer's read at every policy decision.
    Normalising by the trace first keeps the squares in range whatever the activations' scale."""
    trace = cov.diagonal().sum()
    unit = torch.nan_to_num(cov / trace.clamp_min(torch.finfo(cov.dtype).tiny), nan=0.0, posinf=0.0, neginf=0.0)
    squares = (unit * unit).sum()
    share = torch.where(squares > 0, unit.diagonal().sum() ** 2 / squares.clamp_min(torch.finfo(cov.dtype).tiny),
                        torch.ones_like(squares)) / cov.shape[0]
    return torch.where(torch.isfinite(trace), share, math.nan)


def _residual(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: ``q - tr(M^T S^+ M)``, clamped at zero; the whole ``q`` when the projection is skipped."""
    q = stats["q"]
    if "S" not in stats:
        return q
    s = torch.nan_to_num(stats["S"], nan=0.0, posinf=0.0, neginf=0.0)
    try:
        explained = (stats["M"] * (torch.linalg.pinv(s, hermitian=True) @ stats["M"])).sum()
    except torch.linalg.LinAlgError:  # no convergence: report "unknown" rather than stop training
        return torch.full((), math.nan, device=q.device)
    return (q - explained).clamp_min(0.0)


def _samples(shape: torch.Size, width: int, kind: str) -> int:
    """Leading samples of a batch of outputs (or output gradients) of ``shape`` whose rows a measurement
    of a ``width``-feature statistic uses."""
    per_sample = math.prod(shape[1:-1]) if kind == "linear" else math.prod(shape[2:])
    return _leading_samples(shape[0], per_sample, width)


def _leading_samples(batch: int, per_sample: int, width: int) -> int:
    wanted = max(MIN_ROWS, ROWS_PER_WIDTH * width)
    return max(1, min(batch, -(-wanted // max(per_sample, 1))))


def projection_width(layer: KasminaLayer) -> int:
    """Columns of the input rows for this layer: inputs per output position, plus one for a bias."""
    spec = layer.spec
    width = spec.in_features * (math.prod(spec.kernel) if spec.kind != "linear" else 1)
    return width + (getattr(layer.host, "bias", None) is not None)


def _rows_out(t: torch.Tensor, kind: str) -> torch.Tensor:
    """(rows, channels): one row per sample (and position, for token sequences), or per sample and
    position of a convolution's feature map (channels come second there)."""
    if kind != "linear":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


@dataclass
class PlateauTracker:
    """Counts evaluations without an improvement of at least ``min_delta`` in the validation metric
    (oriented so that lower is better)."""

    patience: int
    min_delta: float
    best: float = float("inf")
    best_step: int = 0
    stale: int = 0

    def update(self, step: int, val_loss: float) -> None:
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.stale = val_loss, step, 0
        else:
            self.stale += 1

    def plateaued(self, patience: int) -> bool:
        return self.stale >= patience

    def reset(self) -> None:
        self.stale = 0


@dataclass
class GlobalSignals:
    """Loss trends, the train-validation gap and the plateau; fed by the trainer's loss reads."""

    window: int
    plateau: PlateauTracker
    train: deque[tuple[int, float]] = field(default_factory=deque)
    val: deque[tuple[int, float]] = field(default_factory=deque)

    def observe_train(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            _push(self.train, (step, loss), self.window)

    def observe_validation(self, step: int, loss: float | None, score: float) -> None:
        """``loss`` feeds the trend and the train-validation gap; ``score`` (the task's metric, lower
        is better) the plateau."""
        if loss is not None and math.isfinite(loss):
            _push(self.val, (step, loss), self.window)
        self.plateau.update(step, score)

    @property
    def gap(self) -> float | None:
        """Validation loss minus the mean of the recent training losses (``None`` before both exist)."""
        if not self.train or not self.val:
            return None
        return self.val[-1][1] - sum(v for _, v in self.train) / len(self.train)

    def underfitting(self, threshold: float) -> bool:
        """Small generalisation gap relative to the validation loss: more capacity would be used."""
        gap = self.gap
        return gap is not None and gap < threshold * abs(self.val[-1][1])

    def to_json(self) -> dict[str, float | int | None]:
        """The global inputs of a decision, as recorded in its event."""
        gap = self.gap
        return {"train_trend_per_1k": _round(slope_per_1k(self.train)), "val_trend_per_1k": _round(slope_per_1k(self.val)),
                "val_loss": _round(self.val[-1][1]) if self.val else None, "train_val_gap": _round(gap),
                "plateau_evals": self.plateau.stale, "best_val_loss": _round(self.plateau.best),
                "best_val_step": self.plateau.best_step}

    def state_dict(self) -> dict:
        p = self.plateau
        return {"train": [list(t) for t in self.train], "val": [list(t) for t in self.val],
                "plateau": [p.best, p.best_step, p.stale]}

    def load_state_dict(self, state: dict) -> None:
        self.train = deque((int(s), float(v)) for s, v in state["train"])
        self.val = deque((int(s), float(v)) for s, v in state["val"])
        self.plateau.best, self.plateau.best_step, self.plateau.stale = state["plateau"]


def _push(points: deque[tuple[int, float]], point: tuple[int, float], window: int) -> None:
    points.append(point)
    while len(points) > window:
        points.popleft()


def slope_per_1k(points: Collection[tuple[int, float]]) -> float | None:
    """Least-squares slope of a value (a loss, a metric) against step, per 1000 steps; ``None`` for
    fewer than two points or a single step."""
    if len(points) < 2:
        return None
    xs = [s for s, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)
