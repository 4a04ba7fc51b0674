"""Capture and restore everything a run needs to continue bit-exactly.

One function pair serves both checkpoints on disk and the governor's in-memory snapshots, so there
is a single definition of "the state of a run": model tensors and seed topology, optimizer state by
parameter name, every RNG, the data position, the policy, the merit averages, the trainer's own
counters, and the lengths of the run's log files (so a resumed run continues them without
duplicates).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from esper_core.training import optim
from esper_core.training.evaluate import Scores

if TYPE_CHECKING:
    from esper_core.training.trainer import Trainer


def capture(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-ready state) of ``trainer`` between two steps. Tensors are cloned to the CPU,
    so later training cannot change a snapshot held in memory."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    tensors = {f"model/{k}": v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
    opt_tensors, opt_meta = optim.export_state(trainer.optimizer, names)
    tensors.update({k: v.detach().to("cpu", copy=True) for k, v in opt_tensors.items()})
    tensors.update({f"policy/{k}": v.detach().to("cpu", copy=True) for k, v in trainer.policy.tensor_state().items()})
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = rng
    np_state = np.random.get_state()
    val = trainer.last_val
    state = {
        "step": trainer.step,
        "topology": trainer.manager.topology(),
        "optimizer": opt_meta,
        "rng": {"python": _jsonable(random.getstate()),
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        "sampler": trainer.sampler.position(),
        "policy": trainer.policy.state_dict(),
        "merit": trainer.merit.state_dict(),
        "trainer": {"gate_open": trainer._gate_open, "previous_logged_loss": trainer._previous_logged_loss,
                    "last_val": [val.loss, val.accuracy] if val else None},
        "logs": trainer.log_cursor(),
    }
    return tensors, state


def restore(trainer: Trainer, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Put ``trainer`` back into a captured state (topology first, then tensors, then the rest)."""
    current = {ref.key for ref, layer in trainer.manager.slots() if str(ref.index) in layer.seeds}
    for key in current:
        optim.remove_group(trainer.optimizer, key)
    holding = trainer.manager.restore(state["topology"], trainer.build_seed)
    saved_groups = [g["settings"]["name"] for g in state["optimizer"]["groups"]]
    refs = {ref.key: ref for ref in holding}
    for name in saved_groups[1:]:
        ref = refs[name]
        optim.add_group(trainer.optimizer, name, trainer.manager.seed_parameters(ref), 0.0)
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    trainer.model.load_state_dict(model_state, strict=True)
    params = dict(trainer.model.named_parameters())
    optim.import_state(trainer.optimizer, params, tensors, state["optimizer"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(state["rng"]["python"]))
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    trainer.sampler.seek(**state["sampler"])
    trainer.policy.load_state_dict(state["policy"])
    trainer.policy.load_tensor_state({k[len("policy/"):]: v for k, v in tensors.items() if k.startswith("policy/")},
                                     trainer.device)
    trainer.merit.load_state_dict(state["merit"], trainer.device)
    counters = state["trainer"]
    trainer.step = state["step"]
    trainer._gate_open = counters["gate_open"]
    trainer._previous_logged_loss = counters["previous_logged_loss"]
    trainer.last_val = Scores(*counters["last_val"]) if counters["last_val"] else None


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
