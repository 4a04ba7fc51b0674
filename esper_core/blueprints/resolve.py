"""Blueprint IR + host spec -> resolved ops: every size, the channel chain, the output grid and the
parameter count checked with plain integer arithmetic, so a blueprint that asks for a width of 2**40
is refused in microseconds without touching an allocator (and without importing PyTorch: listing
and documenting blueprints stays fast). :mod:`.builder` turns resolved ops into modules.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import get_args

from esper_core.blueprints.dims import DimError, check, evaluate
from esper_core.blueprints.host import Grid, HostSpec, Padding
from esper_core.blueprints.ir import (ActivationOp, AvgPoolOp, Blueprint, Conv1dOp, Conv2dOp, Dim, DropoutOp,
                                      LinearOp, SEGateOp)

HOST_DIMS = ("in", "out", "rank")
"""The names every expression may use, set by the host layer and ``seeds.rank``, not by the blueprint."""
MAX_DIM = 2**20
MAX_PARAMS = 10**9
_PROBE_GRIDS = {"conv1d": ((8,), (13,), (32,)), "conv2d": ((8, 8), (13, 11), (32, 32))}
HOST_OPS = {"linear": (LinearOp, ActivationOp, DropoutOp),
            "conv1d": (Conv1dOp, ActivationOp, DropoutOp),
            "conv2d": (Conv2dOp, AvgPoolOp, SEGateOp, ActivationOp, DropoutOp)}
CONV_KINDS = ("conv1d", "conv2d")


class ResolveError(ValueError):
    """A blueprint that cannot be applied to a host; ``field`` is the dotted IR path at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def expression_errors(blueprint: Blueprint) -> list[ResolveError]:
    """Every dim expression that no host could resolve (bad syntax, a name that is not ``in``,
    ``out``, ``rank`` or an earlier dim), every dim whose name redefines one of those or could
    never be referred to, and every op its host kind does not allow: a defect of the blueprint
    itself, found when it is loaded rather than when it is first applied to a host."""
    names, errors = set(HOST_DIMS), []
    for name, expr in blueprint.dims.items():
        if name in HOST_DIMS:  # else `rank: 3` silently overrides seeds.rank, `in: 5` the host's width
            errors.append(ResolveError(f"dims.{name}", f"{name!r} is set by the host and the recipe "
                                       f"({', '.join(HOST_DIMS)}); give this dim another name"))
            continue
        if not name.isidentifier() or keyword.iskeyword(name):  # an expression could never refer to it
            errors.append(ResolveError(f"dims.{name}", f"{name!r} is not a name an expression can use "
                                       "(letters, digits and _, not starting with a digit, not a Python keyword)"))
            continue
        try:
            check(expr, names)
        except DimError as exc:
            errors.append(ResolveError(f"dims.{name}", str(exc)))
        names.add(name)
    for i, op in enumerate(blueprint.ops):
        if not isinstance(op, HOST_OPS[blueprint.host]):  # whatever the target: a file defect, not a failed compile
            errors.append(ResolveError(f"ops.{i}.op", _wrong_host_op(op.op, blueprint.host)))
        for attribute, info in type(op).model_fields.items():
            value = getattr(op, attribute)
            if info.annotation != Dim or not isinstance(value, str):
                continue
            try:
                check(value, names)
            except DimError as exc:
                errors.append(ResolveError(f"ops.{i}.{info.alias or attribute}", str(exc)))
    return errors


def _wrong_host_op(op: str, host: str) -> str:
    allowed = sorted(name for cls in HOST_OPS[host] for name in get_args(cls.model_fields["op"].annotation))
    return f"op {op!r} cannot be used on a {host} host (allowed: {', '.join(allowed)})"


@dataclass(frozen=True)
class ResolvedOp:
    """One op with concrete sizes."""

    kind: str
    in_size: int = 0
    out_size: int = 0
    kernel: Grid = (1, 1)
    stride: Grid = (1, 1)
    padding: Padding = (0, 0)
    dilation: Grid = (1, 1)
    groups: int = 1
    bias: bool = True
    init: str = "default"
    p: float = 0.0

    @property
    def params(self) -> int:
        if self.kind == "linear":
            return self.in_size * self.out_size + (self.out_size if self.bias else 0)
        if self.kind in CONV_KINDS:
            area = 1
            for k in self.kernel:
                area *= k
            return self.out_size * (self.in_size // self.groups) * area + (self.out_size if self.bias else 0)
        if self.kind == "se_gate":
            hidden = self.out_size
            return 2 * self.in_size * hidden + hidden + self.in_size
        return 0


@dataclass(frozen=True)
class ResolvedBlueprint:
    blueprint: Blueprint
    host: HostSpec
    dims: dict[str, int]
    ops: tuple[ResolvedOp, ...] = field(default_factory=tuple)

    @property
    def params(self) -> int:
        return sum(op.params for op in self.ops)


def resolve(blueprint: Blueprint, host: HostSpec, rank: int) -> ResolvedBlueprint:
    """Evaluate every symbolic size for ``host`` and check the result is a valid residual branch."""
    if blueprint.host != host.kind:
        raise ResolveError("host", f"blueprint grows on {blueprint.host} layers, not {host.kind}")
    env: dict[str, int] = {"in": host.in_features, "out": host.out_features, "rank": rank}
    for name, expr in blueprint.dims.items():
        env[name] = _size(expr, env, f"dims.{name}")
    ops = tuple(_resolve_op(op, i, host, env) for i, op in enumerate(blueprint.ops))
    _check_chain(ops, blueprint, host)
    total = sum(op.params for op in ops)
    if total > MAX_PARAMS:
        raise ResolveError("ops", f"{total:,} parameters exceed the limit of {MAX_PARAMS:,}")
    return ResolvedBlueprint(blueprint, host, {k: v for k, v in env.items()}, ops)


def _size(expr: int | str, env: dict[str, int], where: str, minimum: int = 1) -> int:
    try:
        value = evaluate(expr, env)
    except DimError as exc:
        raise ResolveError(where, str(exc)) from None
    if not minimum <= value <= MAX_DIM:
        raise ResolveError(where, f"resolves to {value}, outside {minimum}..{MAX_DIM}")
    return value


def _resolve_op(op: object, i: int, host: HostSpec, env: dict[str, int]) -> ResolvedOp:
    where = f"ops.{i}"
    if not isinstance(op, HOST_OPS[host.kind]):
        raise ResolveError(f"{where}.op", _wrong_host_op(op.op, host.kind))  # type: ignore[attr-defined]
    if isinstance(op, LinearOp):
        return ResolvedOp("linear", _size(op.in_, env, f"{where}.in"), _size(op.out, env, f"{where}.out"),
                          bias=op.bias, init=op.init)
    if isinstance(op, (Conv1dOp, Conv2dOp)):
        in_size, out_size = _size(op.in_, env, f"{where}.in"), _size(op.out, env, f"{where}.out")
        groups = _size(op.groups, env, f"{where}.groups")
        if in_size % groups or out_size % groups:
            raise ResolveError(f"{where}.groups", f"{groups} groups do not divide {in_size} -> {out_size} channels")
        if op.geometry == "host":
            return ResolvedOp(op.op, in_size, out_size, host.kernel, host.stride, host.padding, host.dilation,
                              groups, op.bias, op.init)
        k = _size(op.kernel, env, f"{where}.kernel")
        if k % 2 == 0:
            raise ResolveError(f"{where}.kernel", f"a 'same' conv needs an odd kernel, got {k}")
        n = host.spatial
        return ResolvedOp(op.op, in_size, out_size, (k,) * n, (1,) * n, (k // 2,) * n, (1,) * n, groups,
                          op.bias, op.init)
    if isinstance(op, AvgPoolOp):
        if host.dilation != (1, 1):
            raise ResolveError(f"{where}.op", "avg_pool cannot follow a dilated host conv")
        pads = host.pads()
        if any(before != after for before, after in pads):
            raise ResolveError(f"{where}.op", "avg_pool cannot mirror a host padded unevenly ('same' with an even kernel)")
        if any(2 * before > k for (before, _), k in zip(pads, host.kernel)):
            raise ResolveError(f"{where}.op", "avg_pool cannot mirror a host whose padding exceeds half its kernel")
        return ResolvedOp("avg_pool", kernel=host.kernel, stride=host.stride,
                          padding=tuple(before for before, _ in pads))
    if isinstance(op, SEGateOp):
        channels = _size(op.channels, env, f"{where}.channels")
        reduction = _size(op.reduction, env, f"{where}.reduction")
        return ResolvedOp("se_gate", channels, max(1, channels // reduction))
    if isinstance(op, DropoutOp):
        return ResolvedOp("dropout", p=op.p)
    assert isinstance(op, ActivationOp)
    return ResolvedOp(op.op)


def _check_chain(ops: tuple[ResolvedOp, ...], blueprint: Blueprint, host: HostSpec) -> None:
    """Walk sizes and grids through the ops: the branch must map the host's input to its output."""
    width = host.in_features
    probes = _PROBE_GRIDS.get(host.kind, ())
    grids = list(probes)
    for i, op in enumerate(ops):
        if op.kind in ("linear", "se_gate", *CONV_KINDS):
            if op.in_size != width:
                field = "channels" if op.kind == "se_gate" else "in"
                raise ResolveError(f"ops.{i}.{field}", f"expects {op.in_size} but receives {width}")
            if op.kind != "se_gate":
                width = op.out_size
        if op.kind in (*CONV_KINDS, "avg_pool"):
            geo = HostSpec(host.kind, 1, 1, op.kernel, op.stride, op.padding, op.dilation)
            grids = [geo.output_size(*grid) for grid in grids]
    if width != host.out_features:
        raise ResolveError(f"ops.{len(ops) - 1}", f"the branch ends with {width} features/channels but "
                           f"the host produces {host.out_features}")
    expected = [host.output_size(*grid) for grid in probes]
    if grids != expected:
        shown = "x".join(map(str, probes[0]))
        raise ResolveError("ops", f"the branch's output grid {grids[0]} does not match the host's "
                           f"{expected[0]} for a {shown} input: use one op with `geometry: host` or `avg_pool`")
