"""Placement learns from verdicts: a real run of the quickstart (a 32-32 MLP on MNIST-1D-style data,
span seeds, every growth setting at its default) shortened to 1,500 steps.

On this host the residual score ranks the second hidden layer (``head``'s span seeds) first, yet seeds
widening the first hidden layer (``layers.1``'s) buy several times more accuracy at their verdicts; the
benchmark (``benchmarks/growth.py``) measured that following the verdicts is worth about a point there.
What a user relies on, checked from the run's own event log: once two layers have verdicts, new seeds go
to the one whose seeds measurably bought more; a judged layer waits while another layer's first seeds
still await theirs; and every decision records the verdicts its scores were made from.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from esper_core.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("placement")
    trainer = Trainer.from_recipe(REPO / "recipes" / "quickstart.yaml", [
        "trainer.max_steps=1500", "run.device=cpu", "telemetry.progress=none",
        f"run.output_dir={root / 'runs'}", f"storage.workspace={root / 'workspace'}"])
    summary = trainer.fit()
    lines = (Path(summary["run_dir"]) / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _replay(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, list[float]], set[str]]]:
    """Each germination with the rewards judged before it (layer -> rewards) and the layers whose
    seeds were still awaiting their first verdict then."""
    rewards: dict[str, list[float]] = defaultdict(list)
    live: dict[str, int] = defaultdict(int)
    out = []
    for e in events:
        if e["event"] == "germinate":
            unjudged = {layer for layer, n in live.items() if n and not rewards[layer]}
            out.append((e, {k: list(v) for k, v in rewards.items() if v}, unjudged))
            live[e["layer"]] += 1
        elif e["event"] in ("fossilize", "cull") and "reward" in e:
            rewards[e["layer"]].append(e["reward"])
            live[e["layer"]] -= 1
        elif e["event"] in ("cull", "rollback"):
            live[e["layer"]] -= 1
    return out


def test_after_verdicts_in_two_layers_new_seeds_go_where_seeds_bought_more(events: list[dict[str, Any]]) -> None:
    later = [(e, judged) for e, judged, _ in _replay(events) if len(judged) >= 2]
    assert later, "no seed germinated after two layers had verdicts"
    for e, judged in later:
        means = {layer: sum(r) / len(r) for layer, r in judged.items()}
        assert e["layer"] == max(means, key=means.__getitem__), (e["step"], e["layer"], means)
    counts = defaultdict(int)
    for e in events:
        if e["event"] == "germinate":
            counts[e["layer"]] += 1
    assert counts["layers.1"] > counts["head"]  # the first hidden layer, where the verdicts show width pays


def test_a_judged_layer_waits_while_another_layers_first_seeds_await_their_verdicts(
        events: list[dict[str, Any]]) -> None:
    for e, judged, unjudged in _replay(events):
        assert not (unjudged and e["layer"] in judged), (e["step"], e["layer"], sorted(unjudged))
        scores = e["inputs"]["layers"]
        for layer, rewards in judged.items():  # the verdicts each score was made from, recorded
            assert scores[layer]["verdicts"] == len(rewards)
            assert scores[layer]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
            assert scores[layer]["waits"] == bool(unjudged)
    # the rule was exercised: a decision found the judged layer waiting (and grew nothing there)
    waits = [(e["step"], layer) for e in events if e["event"] in ("germinate", "growth_skipped")
             for layer, row in e.get("inputs", {}).get("layers", {}).items() if row.get("waits")]
    assert waits
    grown = {(e["step"], e["layer"]) for e in events if e["event"] == "germinate"}
    assert not grown & set(waits)
