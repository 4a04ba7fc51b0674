"""Generate ``docs/blueprints.md`` from the blueprint IR and the builtin library.

The IR's pydantic models are the single source of the file format and the ops (fields, types,
defaults, descriptions); the builder's table of which ops each host kind accepts, and the builtin
YAML files resolved on an example host, complete the page. ``--check`` (run by the tests) fails when
the IR or the library changed and the page was not regenerated.

    python -m esper_core.blueprints.reference           # rewrite the file
    python -m esper_core.blueprints.reference --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from esper_core.blueprints.resolve import HOST_OPS, MAX_DIM, MAX_PARAMS
from esper_core.blueprints.example import DEFAULT_RANK, resolve_example
from esper_core.blueprints.ir import _OP_TYPES, Blueprint
from esper_core.blueprints.library import BUILTIN_DIR, BlueprintLibrary
from esper_core.docgen import generated_page_main
from esper_core.recipe.reference import limit_text, default_text, field_type

REFERENCE_PATH = Path(__file__).resolve().parents[2] / "docs" / "blueprints.md"

_HEADER = """\
<!-- Generated from esper_core/blueprints/ by `python -m esper_core.blueprints.reference`; do not edit. -->

# Blueprints

A **blueprint** describes a seed: a small residual branch `g` that grows beside a host layer `f`, so
the layer computes `f(x) + w·g(x)`. It is a YAML file of a few ops whose sizes are written
symbolically and resolved against each host layer it is used on, so one blueprint serves layers of
any width. `esper blueprints list` shows the blueprints a recipe can name, `esper blueprints show
NAME` one of them resolved on an example host, and `esper compile` builds and validates kernels
from them ([compile.md](compile.md)). Recipes name blueprints in `seeds.blueprints` and add
directories of their own with `seeds.blueprint_dirs`. A file there whose `name` is a builtin's
replaces that builtin; two files there with the same `name` are an error.

## File format

| key | type | default | description |
|---|---|---|---|
"""

_DIMS = f"""
## Sizes: symbolic dims

Every size (`in`, `out`, `kernel`, `groups`, `channels`, `reduction`, and each entry of `dims`) is an
integer or an expression over names: `in` and `out` (the host layer's input and output features, or
channels), `rank` (the recipe's `seeds.rank`, {DEFAULT_RANK} on the examples below) and the blueprint's
own `dims`, evaluated in order. Expressions use integers, `+ - * //`, parentheses, `min(...)` and
`max(...)`; nothing else is evaluated (the expression is parsed, never `eval`'d, so a blueprint from
someone else cannot run code). Every size must resolve to 1..{MAX_DIM:,}, and a branch to at most
{MAX_PARAMS:,} parameters. Resolution also checks the chain: each op receives the size the previous
one produced, the last one produces the host's output size, and on a conv2d host the branch's output
grid equals the host's (use one op with `geometry: host`, or `avg_pool`, to follow the host's
stride and padding). All of this is integer arithmetic, done before anything is allocated.
"""


def render_reference() -> str:
    """The whole Markdown page."""
    parts = [_HEADER + "\n".join(_rows(Blueprint, skip=())) + "\n", _DIMS, "## Ops\n"]
    allowed = {kind: {name for cls in classes for name in _names(cls)} for kind, classes in HOST_OPS.items()}
    for cls in _OP_TYPES:
        names = _names(cls)
        hosts = [kind for kind, ops in allowed.items() if set(names) <= ops]
        title = " / ".join(f"`{n}`" for n in names)
        doc = inspect.cleandoc(cls.__doc__ or "")
        parts.append(f"### {title}\n\n{doc}\n\nAllowed on: {', '.join(f'`{h}`' for h in hosts)} hosts.\n")
        rows = _rows(cls, skip=("op",))
        parts.append("\n".join(["| key | type | default | description |", "|---|---|---|---|", *rows]) + "\n"
                     if rows else "No other keys.\n")
    parts.append(_library())
    return "\n".join(parts)


def _names(cls: type[BaseModel]) -> tuple[str, ...]:
    return get_args(cls.model_fields["op"].annotation)


def _rows(model: type[BaseModel], skip: tuple[str, ...]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        key = field.alias or name
        default = "required" if field.is_required() else default_text(field.get_default(call_default_factory=True))
        kind = field_type(field)
        if name == "ops":  # a discriminated union, documented op by op below; keep only the limits
            kind = "list of [ops](#ops), " + ", ".join(limit_text(item) for item in field.metadata if limit_text(item))
        cells = [f"`{key}`", kind, default, field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def _library() -> str:
    library = BlueprintLibrary.discover()
    out = ["## The builtin library\n",
           f"Each is resolved on its example host at rank {DEFAULT_RANK} (`esper blueprints show NAME --in N --out N "
           "--rank N` resolves it on another). Parameters and forward FLOPs are per sample, from the same analytic "
           "cost model the compiler records in every kernel's manifest.\n",
           "| blueprint | host | example host | parameters | forward FLOPs | description |", "|---|---|---|---|---|---|"]
    for name in library.names():
        blueprint = library.get(name).blueprint
        example = resolve_example(blueprint)
        out.append(f"| [`{name}`](#builtin-{name}) | `{blueprint.host}` | {example.host_label} | {example.params:,} | "
                   f"{example.flops_forward:,} | {blueprint.description} |")
    out.append("")
    for name in library.names():
        loaded = library.get(name)
        example = resolve_example(loaded.blueprint)
        dims = ", ".join(f"`{k} = {v}`" for k, v in example.dims.items())
        ops = ["| # | op | in | out | kernel | stride | parameters | forward FLOPs |", "|---|---|---|---|---|---|---|---|"]
        ops += [f"| {op['index']} | `{op['op']}` | {op['in'] or '-'} | {op['out'] or '-'} | {op['kernel'] or '-'} | "
                f"{op['stride'] or '-'} | {op['params']:,} | {op['flops_forward']:,} |" for op in example.ops]
        out += [f"### Builtin: {name}\n", f"`{loaded.path.relative_to(BUILTIN_DIR.parents[2])}`\n", "```yaml",
                loaded.path.read_text(encoding="utf-8").rstrip(), "```\n",
                f"On {example.host_label}: {dims}.\n", *ops, ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page, or with ``--check`` report (exit 1) whether it is stale."""
    return generated_page_main("python -m esper_core.blueprints.reference", __doc__.split("\n")[0], REFERENCE_PATH,
                               render_reference, argv)


if __name__ == "__main__":
    sys.exit(main())
