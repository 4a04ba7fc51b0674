"""Health signals: what the policy knows about each Kasmina layer and about the run as a whole.

Per layer (measured every ``policy.merit_every`` steps, on the same steps as gradient merit):

- **activation statistics** of the layer output: the share of units that are never positive on the
  batch (dead units when a ReLU follows) and the effective rank as a share of the width. A layer
  whose outputs collapse onto a few directions has little use for its own width and may need a
  branch of a different kind. The estimator: each measurement folds the covariance of the centred
  outputs (``width x width``, one matmul) into a running average; :meth:`LayerSignals.read` takes the
  Roy & Vetterli effective rank of that average (exp of the entropy of its normalised singular
  values, i.e. of the square roots of its eigenvalues) and divides it by the width: 1/width for
  outputs on one direction, ~1 for isotropic ones. The one eigendecomposition per layer is paid at
  read time, when the policy decides, not at every measurement.
- the **residual functional gradient** (TINY's expressivity bottleneck): ``v = B * dL/dy`` is the
  per-sample direction the loss wants the layer output to move in. The part of ``v`` a change of the
  host's own weights can produce is its least-squares projection onto the layer inputs; what is left
  is what only new capacity can provide. With ``S = E[x x^T]``, ``M = E[x v^T]`` and
  ``q = E[||v||^2]`` averaged over rows (samples, or positions of a convolution), the residual is
  ``q - tr(M^T S^+ M)``. ``S``, ``M`` and ``q`` are averaged across measurements, so the projection is
  taken over many batches (one batch is often smaller than the input width, which makes every
  gradient look expressible).

Cost. A measurement uses every row for the cheap statistics (the dead share, the finiteness check)
and the rows of the first few samples of the batch for the matrix ones: at least
``ROWS_PER_WIDTH`` rows per input (or output) feature and at least ``MIN_ROWS``, whole samples, at
most the batch. The sampler shuffles, so the first samples are a random subset; every statistic is an
average over rows, so a subset estimates the same expectation, and the running average over
measurements supplies the rows a single subset lacks (with the default ``merit_decay`` of 0.8 it
weighs about nine measurements, i.e. ~18 rows per input feature, which bounds the in-sample
optimism of the projection to a few percent of the residual, the same share for every layer). All
statistics stay on the device as running averages; nothing syncs with the host until
:meth:`LayerSignals.read` (one sync, plus a pseudo-inverse and an eigendecomposition per layer).

Robustness. A measurement with a non-finite activation or gradient anywhere in the batch, or whose
statistics overflow, is not folded: it is counted as rejected, the running averages keep their
previous value (one NaN does not poison them), and the layer reads as not ``finite`` until a finite
measurement arrives. No measurement or read raises on such input.

Measurement is off the hot path: forward hooks exist only during the forward pass of a measurement
step (:meth:`LayerSignals.measuring`), or a caller invokes :meth:`LayerSignals.observe_forward` from
wherever it sees a layer's input and output.

Global signals: least-squares trends of the logged training losses and of the validation losses, the
train-validation gap, and the validation plateau.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
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
_GROUP_STATS = {ACTIVATIONS: {"dead", "cov"}, GRADIENTS: {"q", "rows", "S", "M"}}


@dataclass(frozen=True)
class LayerHealth:
    """What the running averages say about a layer (all per sample). Fields are NaN when no finite
    measurement has been folded yet; ``finite`` is False when the latest measurement was rejected as
    non-finite, which the policy should read as "do not grow here"."""

    dead_fraction: float
    effective_rank: float  # share of the output width, 0..1 (Roy & Vetterli, of the average covariance)
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


class RunningAverage:
    """Exponential average of a group of named statistics, on their device, folded all or nothing.

    The statistics are kept flattened in one tensor (sorted by name), so a fold is a handful of
    kernels whatever the group holds. A measurement is folded only if it, and the new average, are
    finite; otherwise it is counted in ``rejected`` and the average stays as it was. The first accepted
    measurement becomes the average (no bias towards the zero start). ``ok`` says whether the latest
    measurement was accepted. Nothing here syncs with the host."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.shapes: dict[str, torch.Size] = {}
        self.mean = torch.zeros(0)
        self.folds = torch.zeros((), dtype=torch.int64)
        self.rejected = torch.zeros((), dtype=torch.int64)
        self.ok = torch.ones((), dtype=torch.bool)

    def fold(self, stats: dict[str, torch.Tensor], valid: torch.Tensor | None = None) -> None:
        """Fold one measurement; ``valid`` (a 0-dim bool tensor) can veto it, e.g. when the batch the
        statistics were computed on held a non-finite value outside the rows they used."""
        names = sorted(stats)
        flat = torch.cat([stats[n].detach().reshape(-1).float() for n in names])
        shapes = {n: stats[n].shape for n in names}
        if shapes != self.shapes or self.mean.device != flat.device:  # first measurement of this group
            self._reset(shapes, flat.device)
        weight = torch.where(self.folds > 0, 1.0 - self.decay, 1.0)
        new = torch.lerp(self.mean, flat, weight)
        accepted = all_finite(new)
        if valid is not None:
            accepted = accepted & valid
        self.mean = torch.where(accepted, new, self.mean)
        self.folds = self.folds + accepted
        self.rejected = self.rejected + ~accepted
        self.ok = accepted

    def stats(self) -> dict[str, torch.Tensor]:
        """The averaged statistics, as views of the flat average (NaN before the first fold)."""
        mean = torch.where(self.folds > 0, self.mean, math.nan)
        sizes = [math.prod(s) for s in self.shapes.values()]
        return {n: part.view(s) for (n, s), part in zip(self.shapes.items(), mean.split(sizes))}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sizes = [math.prod(s) for s in self.shapes.values()]
        out = {n: part.view(s) for (n, s), part in zip(self.shapes.items(), self.mean.split(sizes))}
        return out | {"folds": self.folds, "rejected": self.rejected, "ok": self.ok}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device, where: str) -> None:
        """Restore from :meth:`state_dict`; ``ValueError`` naming ``where`` for anything malformed."""
        counters = {"folds": torch.int64, "rejected": torch.int64, "ok": torch.bool}
        for key, dtype in counters.items():
            value = tensors.get(key)
            if value is None or value.dtype != dtype or value.dim() != 0:
                raise ValueError(f"{where}.{key}: expected a scalar {dtype}")
            if dtype == torch.int64 and int(value) < 0:
                raise ValueError(f"{where}.{key}: negative count {int(value)}")
        stats = {k: v for k, v in tensors.items() if k not in counters}
        if not stats:
            raise ValueError(f"{where}: no statistics")
        for key, value in stats.items():
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}.{key}: expected finite floating-point values")
        names = sorted(stats)
        self._reset({n: stats[n].shape for n in names}, device)
        self.mean = torch.cat([stats[n].reshape(-1).float() for n in names]).to(device)
        self.folds, self.rejected, self.ok = (tensors[k].to(device) for k in counters)

    def _reset(self, shapes: dict[str, torch.Size], device: torch.device) -> None:
        self.shapes = shapes
        self.mean = torch.zeros(sum(math.prod(s) for s in shapes.values()), device=device)
        self.folds = torch.zeros((), dtype=torch.int64, device=device)
        self.rejected = torch.zeros((), dtype=torch.int64, device=device)
        self.ok = torch.ones((), dtype=torch.bool, device=device)


class LayerSignals:
    """Running per-layer statistics, fed by hooks armed with :meth:`measuring` or by direct calls to
    :meth:`observe_forward` (or its two halves)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._groups: dict[str, dict[str, RunningAverage]] = {}  # layer -> group name -> average

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
        whose activations were rejected as non-finite has its gradient statistics rejected too."""
        if y.dim() < 2:
            return  # an unbatched call: nothing to average over
        self.observe_activations(name, y)
        if y.requires_grad:
            kept = x[:_samples(y.shape, projection_width(layer))].detach()
            accepted = self._group(name, ACTIVATIONS).ok
            y.register_hook(lambda grad: self.observe_output_grad(name, layer, kept, grad, accepted))

    @torch.no_grad()
    def observe_activations(self, name: str, y: torch.Tensor) -> None:
        """Fold the dead share and the output covariance of one batch of outputs of layer ``name``."""
        y = y.detach()
        width = y.shape[1] if y.dim() == 4 else y.shape[-1]
        valid = all_finite(y)
        top = y.amax(dim=(0, 2, 3)) if y.dim() == 4 else y.reshape(-1, width).amax(dim=0)
        dead = (top <= 0).float().mean()
        rows = _rows_out(y[:_samples(y.shape, width)].float())
        centred = rows - rows.mean(dim=0, keepdim=True)
        cov = centred.T @ centred / rows.shape[0]
        self._group(name, ACTIVATIONS).fold({"dead": dead, "cov": cov}, valid)

    @torch.no_grad()
    def observe_output_grad(self, name: str, layer: KasminaLayer, x: torch.Tensor, grad: torch.Tensor,
                            valid: torch.Tensor | None = None) -> None:
        """Fold the functional-gradient statistics of one backward pass: ``grad`` is ``dL/dy`` for the
        whole batch, ``x`` the layer input (the whole batch or its first samples; only the first
        samples are used, see the module docstring); ``valid`` (0-dim bool) can veto the fold."""
        batch = grad.shape[0]
        valid = all_finite(grad) if valid is None else all_finite(grad) & valid
        k = min(x.shape[0], _samples(grad.shape, projection_width(layer)))
        rows_v = _rows_out(grad[:k].float() * batch)
        n = rows_v.shape[0]
        stats = {"q": (rows_v * rows_v).sum() / k, "rows": torch.full((), n / k, device=grad.device)}
        rows_x = _rows(layer, x[:k])
        if rows_x is not None and rows_x.shape[1] <= MAX_PROJECTION_WIDTH:
            stats["S"] = rows_x.T @ rows_x / n
            stats["M"] = rows_x.T @ rows_v / n
        self._group(name, GRADIENTS).fold(stats, valid)

    def _group(self, name: str, group: str) -> RunningAverage:
        groups = self._groups.setdefault(name, {})
        if group not in groups:
            groups[group] = RunningAverage(self.decay)
        return groups[group]

    def read(self) -> dict[str, LayerHealth]:
        """The current averages of every layer with gradient statistics (one host-device sync, plus a
        pseudo-inverse and an eigendecomposition per layer). Never raises on what was measured."""
        names, rows = [], []
        for name, groups in self._groups.items():
            if GRADIENTS not in groups:
                continue
            grads = groups[GRADIENTS]
            acts = groups.get(ACTIVATIONS)
            nan = torch.full((), math.nan, device=grads.mean.device)
            dead, erank, ok = nan, nan, grads.ok
            if acts is not None:
                a = acts.stats()
                dead, erank, ok = a["dead"], _effective_rank_share(a["cov"]), ok & acts.ok
            g = grads.stats()
            rows.append(torch.stack([dead, erank, g["q"], _residual(g), ok.float()]))
            names.append(name)
        if not rows:
            return {}
        values = torch.stack(rows).tolist()
        return {name: LayerHealth(*v[:4], finite=v[4] == 1.0) for name, v in zip(names, values)}

    def nonfinite_layers(self) -> list[str]:
        """Layers whose latest measurement was rejected as non-finite (one sync, no decomposition:
        cheap enough for the governor to ask at every judgement)."""
        names = list(self._groups)
        if not names:
            return []
        flags = torch.stack([torch.stack([g.ok for g in self._groups[n].values()]).all() for n in names]).tolist()
        return [name for name, ok in zip(names, flags) if not ok]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors, keyed ``layer/group.statistic`` (they go with the checkpoint's tensors)."""
        return {f"{name}/{group}.{key}": value for name, groups in self._groups.items()
                for group, average in groups.items() for key, value in average.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore from :meth:`state_dict`; ``ValueError`` naming the key for anything malformed (an
        unknown group or statistic, a missing counter, a non-finite average, inconsistent shapes)."""
        parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in tensors.items():
            name, _, rest = key.rpartition("/")
            group, _, stat = rest.partition(".")
            if not name or group not in _GROUP_STATS or stat not in _GROUP_STATS[group] | {"folds", "rejected", "ok"}:
                raise ValueError(f"{key}: not a layer statistic")
            parts.setdefault(name, {}).setdefault(group, {})[stat] = value
        loaded: dict[str, dict[str, RunningAverage]] = {}
        for name, groups in parts.items():
            for group, stats in groups.items():
                _check_shapes(f"{name}/{group}", stats)
                average = RunningAverage(self.decay)
                average.load_state_dict(stats, device, f"{name}/{group}")
                loaded.setdefault(name, {})[group] = average
        self._groups = loaded


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``t`` is finite, as a 0-dim bool tensor (no sync): one reduction pass, a
    quarter of the cost of ``isfinite(t).all()``. A NaN or an infinity makes the sum non-finite; so
    does a sum that overflows float32, which only values near 1e38 / numel can cause: they count as
    non-finite too, which is what a health signal should say of them."""
    return torch.isfinite(t.sum(dtype=torch.float32))


def _check_shapes(where: str, stats: dict[str, torch.Tensor]) -> None:
    scalars = [k for k in ("dead", "q", "rows") if k in stats]
    for key in scalars:
        if stats[key].dim() != 0:
            raise ValueError(f"{where}.{key}: expected a scalar")
    if "cov" in stats and (stats["cov"].dim() != 2 or stats["cov"].shape[0] != stats["cov"].shape[1]):
        raise ValueError(f"{where}.cov: expected a square matrix, got {tuple(stats['cov'].shape)}")
    if ("S" in stats) != ("M" in stats):
        raise ValueError(f"{where}: S and M come together")
    if "S" in stats:
        s, m = stats["S"], stats["M"]
        if s.dim() != 2 or m.dim() != 2 or s.shape[0] != s.shape[1] or m.shape[0] != s.shape[0]:
            raise ValueError(f"{where}.S/M: inconsistent shapes {tuple(s.shape)} and {tuple(m.shape)}")
    missing = {"dead", "cov"} - stats.keys() if "dead" in stats or "cov" in stats else {"q", "rows"} - stats.keys()
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}")


def _effective_rank_share(cov: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli effective rank of a covariance, over its width (NaN if it cannot be computed).
    Normalising by the trace first keeps the eigensolver in range whatever the activations' scale."""
    trace = cov.diagonal().sum()
    unit = torch.nan_to_num(cov / trace.clamp_min(torch.finfo(cov.dtype).tiny), nan=0.0, posinf=0.0, neginf=0.0)
    try:
        singular = torch.linalg.eigvalsh(unit).clamp_min(0.0).sqrt()
    except torch.linalg.LinAlgError:  # no convergence: report "unknown" rather than stop training
        return torch.full((), math.nan, device=cov.device)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return torch.where(torch.isfinite(trace), torch.exp(entropy) / cov.shape[0], math.nan)


def _residual(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``q - rows * tr(M^T S^+ M)``, clamped at zero; the whole ``q`` when the projection is skipped."""
    q = stats["q"]
    if "S" not in stats:
        return q
    s = torch.nan_to_num(stats["S"], nan=0.0, posinf=0.0, neginf=0.0)
    try:
        explained = (stats["M"] * (torch.linalg.pinv(s, hermitian=True) @ stats["M"])).sum()
    except torch.linalg.LinAlgError:  # see _effective_rank_share
        return torch.full((), math.nan, device=q.device)
    return (q - explained * stats["rows"]).clamp_min(0.0)


def _samples(shape: torch.Size, width: int) -> int:
    """Leading samples of a batch of outputs (or output gradients) of ``shape`` whose rows a measurement
    of a ``width``-feature statistic uses."""
    per_sample = math.prod(shape[2:]) if len(shape) == 4 else math.prod(shape[1:-1])
    return _leading_samples(shape[0], per_sample, width)


def _leading_samples(batch: int, per_sample: int, width: int) -> int:
    wanted = max(MIN_ROWS, ROWS_PER_WIDTH * width)
    return max(1, min(batch, -(-wanted // max(per_sample, 1))))


def projection_width(layer: KasminaLayer) -> int:
    """Columns of :func:`_rows` for this layer: inputs per output position, plus one for a bias."""
    spec = layer.spec
    width = spec.in_features * (spec.kernel[0] * spec.kernel[1] if spec.kind == "conv2d" else 1)
    return width + (getattr(layer.host, "bias", None) is not None)


def _rows_out(t: torch.Tensor) -> torch.Tensor:
    """(rows, channels): one row per sample, or per sample and position of a feature map."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _rows(layer: KasminaLayer, x: torch.Tensor) -> torch.Tensor | None:
    """The host's inputs as rows matching :func:`_rows_out` of its output (with a ones column when the
    host has a bias, which can absorb the mean); ``None`` for grouped convolutions."""
    host, spec = layer.host, layer.spec
    if spec.kind == "conv2d":
        if getattr(host, "groups", 1) != 1:
            return None
        patches = F.unfold(x.float(), spec.kernel, dilation=spec.dilation, padding=spec.padding, stride=spec.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.float().reshape(-1, x.shape[-1])
    if getattr(host, "bias", None) is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, device=rows.device)], dim=1)
    return rows


def measurement_flops(in_width: int, out_width: int, batch: int, rows_per_sample: int) -> int:
    """Analytic FLOPs of one measurement of one layer (benchmarks count them) on a batch of ``batch``
    samples with ``rows_per_sample`` output positions each; ``in_width`` is
    :func:`projection_width`. The dead share and the finiteness checks read every row, the matrix
    statistics only the rows of the leading samples; the eigendecomposition and the pseudo-inverse
    are paid only at reads (:func:`readout_flops`)."""
    every = batch * rows_per_sample
    act = rows_per_sample * _leading_samples(batch, rows_per_sample, out_width)
    grad = rows_per_sample * _leading_samples(batch, rows_per_sample, in_width)
    activation = 3 * every * out_width + 2 * act * out_width ** 2 + 3 * act * out_width
    gradient = every * out_width + 3 * grad * out_width
    if in_width <= MAX_PROJECTION_WIDTH:
        gradient += 2 * grad * in_width ** 2 + 2 * grad * in_width * out_width
    return activation + gradient


def readout_flops(in_width: int, out_width: int) -> int:
    """Analytic FLOPs of reading one layer: the effective rank's eigendecomposition (~9 o^3), and the
    residual's pseudo-inverse (~9 d^3 via eigh) and 2 d^2 o + 2 d o."""
    erank = 9 * out_width ** 3
    if in_width > MAX_PROJECTION_WIDTH:
        return erank
    return erank + 9 * in_width ** 3 + 2 * in_width ** 2 * out_width + 2 * in_width * out_width


@dataclass
class PlateauTracker:
    """Counts evaluations without an improvement of at least ``min_delta`` in validation loss."""

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

    def observe_validation(self, step: int, loss: float) -> None:
        _push(self.val, (step, loss), self.window)
        self.plateau.update(step, loss)

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
        return {"train_trend_per_1k": _round(_slope(self.train)), "val_trend_per_1k": _round(_slope(self.val)),
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


def _slope(points: deque[tuple[int, float]]) -> float | None:
    """Least-squares slope of loss against step, per 1000 steps."""
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
