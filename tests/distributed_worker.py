"""One rank of the distributed tests (started by torchrun): train a recipe with ``esper train``'s
trainer, then write what this rank ends with (its weights and its seed topology) for the test to compare
across ranks, and the paths it wrote. Usage: ``torchrun --nproc-per-node N tests/distributed_worker.py RECIPE OUT [key=value ...]``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from esper_core import Trainer


_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _record_writes(into: list[str]) -> None:
    """Append to ``into`` every path this process opens for writing, creates, renames or removes (Python's
    audit events; what C libraries such as SQLite write is not seen), so a test can check what a rank wrote."""
    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITES):
                into.append(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.symlink", "shutil.rmtree") and args:
            into.append(os.fsdecode(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else str(args[0]))
    sys.addaudithook(hook)


def main() -> None:
    recipe, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    wrote: list[str] = []
    _record_writes(wrote)
    trainer = Trainer.from_recipe(recipe, overrides)
    trainer.fit()
    rank = os.environ.get("RANK", "0")
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    held = {"topology": trainer.manager.topology(), "rebuilds": trainer.replica.rebuilds if trainer.replica else 0,
            "compiled_here": trainer.controller.kernels.compiled_here, "wrote": list(wrote)}
    (out / f"rank{rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    main()
