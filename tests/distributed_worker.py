"""One rank of the distributed tests (started by torchrun): train a recipe with ``esper train``'s
trainer, then write what this rank ends with (its weights and its seed topology) for the test to compare
across ranks. Usage: ``torchrun --nproc-per-node N tests/distributed_worker.py RECIPE OUT [key=value ...]``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from esper_core import Trainer


def main() -> None:
    recipe, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    trainer = Trainer.from_recipe(recipe, overrides)
    trainer.fit()
    rank = os.environ.get("RANK", "0")
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    held = {"topology": trainer.manager.topology(), "rebuilds": trainer.replica.rebuilds if trainer.replica else 0,
            "compiled_here": trainer.controller.kernels.compiled_here}
    (out / f"rank{rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    main()
