"""The blueprint IR: a typed, canonical description of a seed module.

A blueprint is a short sequence of ops whose sizes are symbolic (``in``, ``out``, ``rank`` and the
blueprint's own ``dims``); :mod:`esper_core.blueprints.builder` resolves them against a host layer.
The IR is deliberately small: every op here has an analytic parameter and FLOP count, which lets the
compiler reject absurd blueprints before allocating anything.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Dim = Union[int, str]
"""A size: a literal integer or an expression over symbolic dims (see :mod:`.dims`)."""


def _size_value(value: object) -> object:
    """Refuse what YAML gives for a size that is neither an integer nor an expression before the union
    sees it: pydantic's lax int would read `true` as 1 and `8.0` as 8 (a blueprint that silently grows a
    1-wide layer), and a refused union reports one line per member (`out.int`, `out.str`)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        kind = {bool: "a boolean", float: "a number with a fraction", list: "a list", dict: "a mapping"}.get(
            type(value), "null" if value is None else type(value).__name__)
        shown = json.dumps(value, default=str)  # as YAML spells it: `true`, `null`, `8.0`
        raise ValueError(f"must be an integer or an expression such as `rank * 2` (got {shown}, {kind})")
    return value


StrictDim = Annotated[Dim, BeforeValidator(_size_value)]
"""A :data:`Dim` field as blueprint files write it (its annotation in ``model_fields`` is still :data:`Dim`)."""

Init = Literal["default", "zeros", "small"]


class _Op(BaseModel):
    # strict, as recipes are: `bias: "no"` or `bias: 1` is an error, not a guess
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class LinearOp(_Op):
    """A fully connected layer ``in -> out`` (parameters: in x out, plus out with a bias)."""

    op: Literal["linear"]
    in_: StrictDim = Field(alias="in", description="Input features.")
    out: StrictDim = Field(description="Output features.")
    bias: bool = Field(True, description="Add a bias.")
    init: Init = Field("default", description="`default` (PyTorch's), `zeros` (the usual last op: the seed starts "
                       "at zero output) or `small` (PyTorch's default scaled by 1e-3).")


class _ConvOp(_Op):
    in_: StrictDim = Field(alias="in", description="Input channels.")
    out: StrictDim = Field(description="Output channels.")
    geometry: Literal["host", "same"] = Field(
        "same", description="`host` copies the host conv's kernel, stride, padding and dilation (so the "
        "seed's output grid matches the host's); `same` is a stride-1 conv that keeps the grid.")
    kernel: StrictDim = Field(3, description="Kernel size for `geometry: same` (odd).")
    groups: StrictDim = Field(1, description="Channel groups (`in` for a depthwise conv).")
    bias: bool = Field(True, description="Add a bias.")
    init: Init = Field("default", description="As for `linear`.")


class Conv2dOp(_ConvOp):
    """A 2-D convolution ``in -> out`` channels (parameters: out x in / groups x kernel area, plus out
    with a bias); for ``conv2d`` hosts."""

    op: Literal["conv2d"]


class Conv1dOp(_ConvOp):
    """A 1-D convolution ``in -> out`` channels (parameters: out x in / groups x kernel, plus out with a
    bias); for ``conv1d`` hosts."""

    op: Literal["conv1d"]


class ActivationOp(_Op):
    """An elementwise nonlinearity; no parameters."""

    op: Literal["relu", "gelu", "silu", "tanh", "sigmoid"]


class DropoutOp(_Op):
    """Dropout while training; no parameters."""

    op: Literal["dropout"]
    p: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of zeroing an element.")


class AvgPoolOp(_Op):
    """Average pooling with the host conv's kernel, stride and padding: a parameter-free way to land on
    the host's output grid."""

    op: Literal["avg_pool"]


class SEGateOp(_Op):
    """Squeeze-excitation: scale each channel by a gate computed from its global average."""

    op: Literal["se_gate"]
    channels: StrictDim = Field(description="Channels gated (the channels the op receives).")
    reduction: StrictDim = Field(4, description="The gate's hidden width is channels // reduction (at least 1).")


_OP_TYPES = (LinearOp, Conv1dOp, Conv2dOp, ActivationOp, DropoutOp, AvgPoolOp, SEGateOp)
Op = Annotated[Union[_OP_TYPES], Field(discriminator="op")]  # type: ignore[valid-type]
OP_NAMES = frozenset(name for cls in _OP_TYPES for name in get_args(cls.model_fields["op"].annotation))


class Blueprint(BaseModel):
    """One blueprint file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64,
                      description="The name recipes use in `seeds.blueprints`.")
    version: int = Field(1, ge=1, description="Bump when the ops change; part of every kernel's content hash.")
    description: str = Field("", description="One line for `esper blueprints list`.")
    host: Literal["linear", "conv1d", "conv2d"] = Field(description="Host layer kind this blueprint grows on.")
    kind: Literal["branch", "span"] = Field(
        "branch", description="`branch`: a residual branch beside one host layer (reads its input, adds to its "
        "output; `in`/`out` are that layer's). `span`: new hidden units across a pair of consecutive host "
        "layers l, l+1 (reads l's input, adds to l+1's output; `in` is l's input size, `out` l+1's output "
        "size, and a conv span keeps l's geometry, so l+1 must keep the grid): exactly a wider layer l when "
        "only an elementwise activation sits between them, as in an MLP.")
    dims: dict[str, StrictDim] = Field(default_factory=dict,
                                 description="Named sizes, evaluated in order; may use in, out, rank and earlier "
                                 "dims. A name is a Python identifier other than in, out and rank (those come from "
                                 "the host and the recipe).")
    ops: list[Op] = Field(min_length=1, max_length=64, description="The branch, applied in order to the host's "
                          "input; it must end with the host's output size (and grid, for conv2d).")

    def canonical_json(self) -> str:
        """The IR with defaults filled in, keys sorted, no whitespace: the input of content hashes.
        ``kind: branch`` (every blueprint written before spans existed) is left out, so their kernels
        keep their addresses."""
        data = self.model_dump(mode="json", by_alias=True)
        if data["kind"] == "branch":
            del data["kind"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
