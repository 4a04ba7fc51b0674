"""Health signals: what the policy knows about each Kasmina layer and about the run as a whole.

Per layer (measured every ``policy.merit_every`` steps, on the same steps as gradient merit):

- **activation statistics** of the layer output: the share of units that are never positive on the
  batch (dead units when a ReLU follows) and the effective rank (Roy & Vetterli: exp of the entropy
  of the normalised singular values) as a share of the width. A layer whose outputs collapse onto a
  few directions has little use for its own width and may need a branch of a different kind.
- the **residual functional gradient** (TINY's expressivity bottleneck): ``v = B * dL/dy`` is the
  per-sample direction the loss wants the layer output to move in. The part of ``v`` a change of the
  host's own weights can produce is its least-squares projection onto the layer inputs; what is left
  is what only new capacity can provide. With ``S = E[x x^T]``, ``M = E[x v^T]`` and
  ``q = E[||v||^2]`` averaged over rows (samples, or positions of a convolution), the residual is
  ``q - tr(M^T S^+ M)``. ``S``, ``M`` and ``q`` are averaged across measurements, so the projection is
  taken over many batches (one batch is often smaller than the input width, which makes every
  gradient look expressible).

Measurement is off the hot path: forward hooks exist only during the forward pass of a measurement
step, every statistic stays on the device as a running average, and reading them (one sync, plus a
small pseudo-inverse per layer) happens only when the policy decides.

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


@dataclass(frozen=True)
class LayerHealth:
    """What one measurement average says about a layer (all per sample)."""

    dead_fraction: float
    effective_rank: float  # share of the output width, 0..1
    gradient: float  # E ||v||^2, the squared functional gradient at the layer output
    residual: float  # the part of it the host's own weights cannot express

    @property
    def residual_share(self) -> float:
        return self.residual / self.gradient if self.gradient > 0 else 0.0

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()} | {"residual_share": round(self.residual_share, 4)}


class LayerSignals:
    """Running per-layer statistics, fed by hooks armed with :meth:`measuring`."""

    _KEYS = ("dead", "erank", "q", "S", "M", "rows")

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._ema: dict[str, dict[str, torch.Tensor]] = {}

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
            self.observe(name, module, inputs[0], output)
        return hook

    def observe(self, name: str, layer: KasminaLayer, x: torch.Tensor, output: torch.Tensor) -> None:
        """Fold one forward pass of ``layer`` (input ``x``, output ``output``) into the statistics; the
        gradient statistics follow in the backward pass through a tensor hook on ``output``."""
        x = x.detach()
        with torch.no_grad():
            self._fold(name, _activation_stats(output.detach(), layer.spec.kind))
        if output.requires_grad:
            output.register_hook(lambda grad: self._gradient(name, layer, x, grad))

    @torch.no_grad()
    def _gradient(self, name: str, layer: KasminaLayer, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch = grad.shape[0]
        rows_x, rows_v = _rows(layer, x), _rows_out(grad.float() * batch, layer.spec.kind)
        n = rows_v.shape[0]
        stats = {"q": (rows_v * rows_v).sum() / batch, "rows": torch.tensor(n / batch, device=grad.device)}
        if rows_x is not None and rows_x.shape[1] <= MAX_PROJECTION_WIDTH:
            stats["S"] = rows_x.T @ rows_x / n
            stats["M"] = rows_x.T @ rows_v / n
        self._fold(name, stats)

    def _fold(self, name: str, stats: dict[str, torch.Tensor]) -> None:
        ema = self._ema.setdefault(name, {})
        for key, value in stats.items():
            previous = ema.get(key)
            ema[key] = value if previous is None else self.decay * previous + (1 - self.decay) * value

    def read(self) -> dict[str, LayerHealth]:
        """The current averages (one host-device sync and a pseudo-inverse per layer)."""
        health = {}
        for name, ema in self._ema.items():
            if "q" not in ema:
                continue
            q = ema["q"]
            residual = q
            if "S" in ema:
                explained = (ema["M"] * (torch.linalg.pinv(ema["S"], hermitian=True) @ ema["M"])).sum()
                residual = (q - explained * ema["rows"]).clamp_min(0.0)
            values = torch.stack([ema["dead"], ema["erank"], q, residual]).tolist()
            health[name] = LayerHealth(*values)
        return health

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors, keyed ``layer/statistic`` (they go with the checkpoint's tensors)."""
        return {f"{name}/{key}": value for name, ema in self._ema.items() for key, value in ema.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self._ema = {}
        for key, value in tensors.items():
            name, _, stat = key.rpartition("/")
            self._ema.setdefault(name, {})[stat] = value.to(device)


def _activation_stats(y: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Dead share and normalised effective rank of a layer output (batch, features[, h, w])."""
    rows = _rows_out(y.float(), kind)
    dead = (rows.amax(dim=0) <= 0).float().mean()
    centred = rows - rows.mean(dim=0, keepdim=True)
    # Singular values from the small (width x width) Gram matrix: cheap for conv outputs with many rows.
    eig = torch.linalg.eigvalsh(centred.T @ centred / max(rows.shape[0], 1)).clamp_min(0.0).sqrt()
    p = eig / eig.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"dead": dead, "erank": torch.exp(entropy) / rows.shape[1]}


def _rows_out(t: torch.Tensor, kind: str) -> torch.Tensor:
    """(rows, channels): one row per sample (and position, for token sequences), or per sample and
    position of a convolution's feature map (channels come second there)."""
    if kind != "linear":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _rows(layer: KasminaLayer, x: torch.Tensor) -> torch.Tensor | None:
    """The host's inputs as rows matching :func:`_rows_out` of its output (with a ones column when the
    host has a bias, which can absorb the mean); ``None`` for grouped convolutions and for unevenly
    padded ones ('same' with an even kernel), whose patches ``unfold`` cannot cut."""
    host, spec = layer.host, layer.spec
    if spec.kind != "linear":
        pads = spec.pads()
        if getattr(host, "groups", 1) != 1 or any(before != after for before, after in pads):
            return None
        if spec.kind == "conv1d":  # a length-L sequence is a 1 x L image
            x, kernel, dilation, stride = x.unsqueeze(2), (1, *spec.kernel), (1, *spec.dilation), (1, *spec.stride)
            padding: tuple[int, ...] = (0, pads[0][0])
        else:
            kernel, dilation, stride, padding = spec.kernel, spec.dilation, spec.stride, tuple(b for b, _ in pads)
        patches = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = x.float().reshape(-1, x.shape[-1])
    if getattr(host, "bias", None) is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, device=rows.device)], dim=1)
    return rows


def measurement_flops(in_width: int, out_width: int, rows: int) -> int:
    """Analytic FLOPs of one measurement of one layer with ``rows`` rows (benchmarks count them):
    the Gram matrices, the eigen-decomposition of the activation Gram (~9 w^3), and the gradient
    statistics; the pseudo-inverse is paid only at decisions (:func:`readout_flops`)."""
    activation = 2 * rows * out_width ** 2 + 9 * out_width ** 3 + 4 * rows * out_width
    gradient = 2 * rows * out_width
    if in_width <= MAX_PROJECTION_WIDTH:
        gradient += 2 * rows * in_width ** 2 + 2 * rows * in_width * out_width
    return activation + gradient


def readout_flops(in_width: int, out_width: int) -> int:
    """Analytic FLOPs of reading one layer's residual (pseudo-inverse ~ 9 d^3 via eigh, and 2 d^2 o)."""
    if in_width > MAX_PROJECTION_WIDTH:
        return 0
    return 9 * in_width ** 3 + 2 * in_width ** 2 * out_width + 2 * in_width * out_width


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


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)
