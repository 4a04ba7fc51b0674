"""Export a seed with ``torch.export`` (dynamic batch dimension) and check the program against eager.

The ``.pt2`` file is for validation and deployment only: training rebuilds the module from the IR
and loads safetensors weights. It is loaded back exactly once, here, from the bytes this process
has just produced (a ``.pt2`` archive contains pickled sample inputs, so a stored one is never loaded).
"""

from __future__ import annotations

import io

import torch
from torch import nn

from esper_core.compiler.checks import Check
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.probes import generator, random_input

EXAMPLE_BATCH = 4
CHECK_BATCHES = (1, 5, 16)
TOLERANCE = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12), "float16": (1e-2, 1e-3), "bfloat16": (2e-2, 1e-2)}
"""(rtol, atol) between the exported program and eager, per dtype."""


def export_program(module: nn.Module, spec: KernelSpec) -> bytes:
    """The serialised ``ExportedProgram`` of ``module`` in eval mode, batch dimension dynamic (>= 1)."""
    example = random_input(spec, EXAMPLE_BATCH, generator(7))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def check_program(program: bytes, reference: nn.Module, spec: KernelSpec) -> Check:
    """The exported graph computes what eager does, at batch sizes other than the example's.

    ``reference`` is the kernel after the gradient probe's steps: its weights are loaded into the
    program first, because at init both would output zeros and agree vacuously.
    """
    loaded = torch.export.load(io.BytesIO(program)).module()
    loaded.load_state_dict(reference.state_dict())
    rtol, atol = TOLERANCE[spec.dtype]
    gen = generator(8)
    worst = 0.0
    with torch.no_grad():
        for batch in CHECK_BATCHES:
            x = random_input(spec, batch, gen)
            expected, got = reference.eval()(x), loaded(x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=atol):
                detail = (f"shape {tuple(got.shape)} vs {tuple(expected.shape)}" if got.shape != expected.shape
                          else f"max difference {(got - expected).abs().max().item():.3g}")
                return Check("export", False, f"exported program differs from eager at batch {batch}: {detail}",
                             "ops")
            worst = max(worst, (got - expected).abs().max().item())
    return Check("export", True, f"dynamic batch; matches eager at batch sizes {list(CHECK_BATCHES)} "
                 f"(max difference {worst:.2g})")
