"""The Python API of a run: ``Trainer.from_recipe(path, overrides).fit()`` on a tiny MLP.

These tests pin what growth must never get wrong, whatever the policy decides:

- reproducibility: the same recipe and seed give bit-identical weights and losses (a run is evidence
  only if it can be repeated), and a different seed really gives a different run;
- optimizer hygiene after a cull: the seed's parameter group and its moments are gone, by name, so
  no dead tensor is kept alive or stepped (what users of growth libraries trip over most);
- parameter accounting: every parameter the final model has beyond the host's belongs to a
  fossilized seed that the summary names.

The host is an MLP with one hidden layer of 16 on the flat digits data; only ``layers.0`` is wrapped
(the head is excluded) with two slots, so each run trains in well under a second. The verdict is
forced with ``seeds.fossilize_margin``: -1 keeps every seed (a loss gain is never below -1 here),
+1 culls every seed (no seed lowers the validation loss by a whole nat), so the tests do not
depend on what a seed happened to learn.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from esper_cli.progress import describe
from esper_core.errors import ConfigError, EsperError
from esper_core.training.trainer import Trainer

TINY_RECIPE = """\
run:
  name: tiny
  seed: 0
  device: cpu
data:
  source: digits
  layout: flat
  batch_size: 32
model:
  arch: mlp
  widths: [16]
seeds:
  targets: ["type:Linear"]
  exclude: ["head"]
  per_layer: 2
  blueprints: [wide_mlp]
  rank: 4
  incubation_steps: 20
  blend_steps: 20
  probation_steps: 10
  embargo_steps: 100000
policy:
  trigger: periodic
  period_steps: 30
  growth_window: [0.05, 0.5]
  max_seeds: 4
trainer:
  max_steps: 200
  lr: 0.01
  eval_every: 10
  log_every: 10
telemetry:
  progress: none
"""
"""Two slots germinate at steps 10 and 40 and reach their verdicts by step 90, long before step 200,
so no seed is still live at the end and the final model holds only host and fossilized parameters.
Embargo outlasts the run so a culled slot is never reused (its group name would come back)."""

KEEP_ALL = "seeds.fossilize_margin=-1.0"
CULL_ALL = "seeds.fossilize_margin=1.0"


@dataclass
class Run:
    """A finished run: the trainer (for its model and optimizer) and what it wrote."""

    trainer: Trainer
    summary: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.summary["run_dir"])

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / "final" / "model.safetensors"))

    def losses(self) -> list[tuple[int, float]]:
        lines = (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    def events(self, kind: str) -> list[dict[str, Any]]:
        lines = (self.run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == kind]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY_RECIPE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fit(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Run]:
    """Train the tiny recipe once per distinct override list and share the result across tests."""
    output = tmp_path_factory.mktemp("runs")
    cache: dict[tuple[str, ...], Run] = {}

    def run(*overrides: str) -> Run:
        key = tuple(overrides)
        if key not in cache:
            cache[key] = _train(recipe, [f"run.output_dir={output}", *overrides])
        return cache[key]

    return run


def _train(recipe: Path, overrides: Sequence[str]) -> Run:
    trainer = Trainer.from_recipe(recipe, overrides)
    return Run(trainer, trainer.fit())


def test_fit_returns_a_summary_of_the_run(fit: Callable[..., Run]) -> None:
    run = fit(KEEP_ALL)
    s = run.summary
    assert s["steps"] == 200
    assert s["device"] == "cpu"
    for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        assert isinstance(s[key], float)
    # 200 steps of AdamW on digits: far above chance (0.1), whatever the seeds did.
    assert s["val_accuracy"] > 0.5
    assert s["seeds"]["fossilized"] == 2
    assert (run.run_dir / "summary.json").is_file()
    assert json.loads((run.run_dir / "summary.json").read_text(encoding="utf-8")) == s


def test_same_seed_gives_identical_weights_and_losses(fit: Callable[..., Run], recipe: Path, tmp_path: Path) -> None:
    first = fit(KEEP_ALL)
    second = _train(recipe, [f"run.output_dir={tmp_path}", KEEP_ALL])
    a, b = first.weights(), second.weights()
    assert a.keys() == b.keys()
    # Seeds included: a repeat must germinate the same kernels at the same steps and train them alike.
    assert any(".seeds." in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between two runs with the same seed"
    assert first.losses() == second.losses()
    assert len(first.losses()) == 20


def test_different_seed_gives_different_weights(fit: Callable[..., Run]) -> None:
    a, b = fit(KEEP_ALL).weights(), fit(KEEP_ALL, "run.seed=1").weights()
    shared = a.keys() & b.keys()
    assert "layers.0.host.weight" in shared
    assert not all(torch.equal(a[k], b[k]) for k in shared if a[k].is_floating_point())
    assert not torch.equal(a["layers.0.host.weight"], b["layers.0.host.weight"])


def _check_optimizer_holds_only_model_parameters(trainer: Trainer) -> None:
    """Every parameter the optimizer steps or keeps state for is in the model, and vice versa."""
    in_model = {id(p) for p in trainer.model.parameters()}
    in_groups = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two optimizer groups"
    assert set(in_groups) == in_model
    stale = [tuple(p.shape) for p in trainer.optimizer.state if id(p) not in in_model]
    assert not stale, f"optimizer state kept for parameters no longer in the model: {stale}"


def test_culled_seeds_leave_the_optimizer(fit: Callable[..., Run]) -> None:
    run = fit(CULL_ALL)
    culls = run.events("cull")
    assert {(e["layer"], e["slot"]) for e in culls} == {("layers.0", 0), ("layers.0", 1)}
    assert [(g.get("name"), len(g["params"])) for g in run.trainer.optimizer.param_groups][1:] == [("seeds", 0)]
    _check_optimizer_holds_only_model_parameters(run.trainer)
    assert not any(".seeds." in k for k in run.weights())
    assert run.summary["params_final"] == run.summary["params_initial"]
    assert run.summary["fossilized"] == []


def test_fossilized_seeds_stay_in_the_seed_group(fit: Callable[..., Run]) -> None:
    run = fit(KEEP_ALL)
    assert [g.get("name") for g in run.trainer.optimizer.param_groups] == ["host", "seeds"]
    seeds = {id(p) for p in run.trainer.optimizer.param_groups[1]["params"]}
    assert seeds == {id(p) for n, p in run.trainer.model.named_parameters() if ".seeds." in n}
    _check_optimizer_holds_only_model_parameters(run.trainer)


def test_seeds_drop_to_the_hosts_rate_once_validation_stops_rising(fit: Callable[..., Run]) -> None:
    """`seeds.lr_schedule: adaptive` in `esper train`: the switch is taken at a validation whose
    accuracy trend over `policy.trend_window` evaluations is no longer positive, and from then on the
    seed group learns at no more than the host group's scheduled rate."""
    run = fit(KEEP_ALL)
    [switch] = run.events("seed_lr")
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = sorted((r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r)

    def trend(end: int) -> float:  # least-squares slope per 1000 steps of the five validations up to `end`
        window = [(s, a) for s, a in validations if s <= end][-5:]
        ms, ma = sum(s for s, _ in window) / 5, sum(a for _, a in window) / 5
        return 1000 * sum((s - ms) * (a - ma) for s, a in window) / sum((s - ms) ** 2 for s, _ in window)

    steps = [s for s, _ in validations]
    assert switch["metric_trend_per_1k"] == pytest.approx(trend(switch["step"]), abs=1e-6) and trend(switch["step"]) <= 0
    assert all(trend(s) > 0 for s in steps[4:steps.index(switch["step"])])  # the first such validation
    host, seeds = run.trainer.optimizer.param_groups
    assert run.trainer.controller.seed_rate.host_lr == host["lr"]
    assert seeds["lr"] <= host["lr"]


@pytest.mark.parametrize("overrides", [(KEEP_ALL,), (CULL_ALL,)], ids=["fossilized", "culled"])
def test_final_params_are_initial_plus_fossilized_seeds(fit: Callable[..., Run], overrides: tuple[str, ...]) -> None:
    run = fit(*overrides)
    s = run.summary
    assert s["params_final"] == s["params_initial"] + sum(f["params"] for f in s["fossilized"])
    assert s["params_final"] == sum(p.numel() for p in run.trainer.model.parameters())
    # What the summary claims for each seed is what the saved model holds under that slot.
    weights = run.weights()
    for f in s["fossilized"]:
        prefix = f"{f['layer']}.seeds.{f['slot']}."
        assert f["params"] > 0
        assert sum(t.numel() for k, t in weights.items() if k.startswith(prefix)) == f["params"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_user_error(recipe: Path, tmp_path: Path) -> None:
    output = tmp_path / "runs"
    with pytest.raises(EsperError) as info:
        Trainer.from_recipe(recipe, [f"run.output_dir={output}", "run.device=cuda"])
    message = str(info.value)
    assert "run.device" in message and "cuda" in message.lower() and "no CUDA device" in message
    assert not output.exists(), "a run that cannot start must not leave a run directory behind"


def _threads_started_since(before: set[threading.Thread], within_s: float = 5.0) -> list[str]:
    """The threads alive now that were not in ``before``, after waiting up to ``within_s`` for
    threads told to stop to finish."""
    deadline = time.monotonic() + within_s
    while True:
        extra = [t.name for t in threading.enumerate() if t not in before]
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def test_a_construction_that_fails_part_way_closes_what_it_opened(recipe: Path, tmp_path: Path) -> None:
    """A pattern that matches nothing fails inside the growth controller, after the kernel store (its
    SQLite connection and threads) and the recorder were opened: they stayed open, and a later run in
    the same process crashed in SQLite about one time in three. The error is the same as before, nothing
    is left running, and the next run in this process trains."""
    workspace = [f"storage.workspace={tmp_path / 'ws'}", f"run.output_dir={tmp_path / 'runs'}"]
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as info:
        Trainer.from_recipe(recipe, [*workspace, "seeds.targets=[nothing.*]"])
    assert str(info.value).startswith("<command line>: seeds.targets.0: override 'seeds.targets=[nothing.*]': "
                                      "pattern 'nothing.*' matches no module that can host seeds")  # located
    assert _threads_started_since(before) == []
    for _ in range(3):
        summary = Trainer.from_recipe(recipe, [*workspace, "trainer.max_steps=20"]).fit()
        assert summary["steps"] == 20


def test_a_resume_refused_after_the_trainer_was_built_closes_what_it_opened(tmp_path: Path) -> None:
    """The data changed since the checkpoint: the refusal comes once the trainer is built, and it
    left the trainer's kernel store and recorder open as a failed construction did."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "table.npz"
    np.savez(data, x=rng.normal(size=(300, 8)).astype("float32"), y=rng.integers(0, 3, 300))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("source: digits\n  layout: flat", "source: file\n  path: table.npz"))
    settings = [f"storage.workspace={tmp_path / 'ws'}", f"run.output_dir={tmp_path / 'runs'}"]
    run = Path(Trainer.from_recipe(recipe, [*settings, "trainer.max_steps=20", "checkpoint.every_steps=10"])
               .fit()["run_dir"])
    np.savez(data, x=rng.normal(size=(300, 8)).astype("float32"), y=rng.integers(0, 3, 300))
    before = set(threading.enumerate())
    with pytest.raises(ConfigError, match="data.path: changed since"):
        Trainer.resume(run, ["trainer.max_steps=30"])
    assert _threads_started_since(before) == []


def test_a_fossilized_linear_seed_is_merged_into_its_host_and_adds_no_parameter(fit: Callable[..., Run]) -> None:
    """lowrank_adapter on a Linear host is (W + BA)x: kept, it is folded into W and its module is dropped."""
    run = fit(KEEP_ALL, "seeds.blueprints=[lowrank_adapter]")
    s = run.summary
    assert s["seeds"]["fossilized"] == 2 and all(f["merged"] and f["params"] == 0 for f in s["fossilized"])
    assert s["params_final"] == s["params_initial"]
    assert not any(".seeds." in k for k in run.weights())
    assert all(e.get("merged_into_host") for e in run.events("fossilize"))
    assert [(g.get("name"), len(g["params"])) for g in run.trainer.optimizer.param_groups][1:] == [("seeds", 0)]
    _check_optimizer_holds_only_model_parameters(run.trainer)


def test_merging_at_fossilize_leaves_the_model_function_unchanged() -> None:
    from esper_core.blueprints.builder import build, resolve
    from esper_core.blueprints.library import BlueprintLibrary
    from esper_core.seeds.manager import SlotRef, wrap
    from esper_core.seeds.merge import linear_delta, merge_into

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    manager = wrap(model, targets=["0"])
    layer = manager.layers["0"]
    seed = build(resolve(BlueprintLibrary.discover().get("lowrank_adapter").blueprint, layer.spec, 2))
    torch.nn.init.normal_(seed[1].weight)  # a trained seed: not zero any more
    ref = SlotRef("0", 0)
    manager.germinate(ref, "lowrank_adapter", "k", 0)
    manager.start_incubation(ref, seed)
    layer.start_blending(0)
    layer.start_probation(0)
    x = torch.randn(16, 6)
    before = model(x)
    assert linear_delta(seed, layer.spec) is not None and merge_into(layer.host, seed, 1.0)
    manager.fossilize(ref)
    layer.release_merged(0)
    assert torch.allclose(model(x), before, atol=1e-5) and "0" not in layer.seeds and layer.slots[0].merged


@dataclass
class CompiledRun:
    """A ``trainer.compile`` run whose graphs go to a backend that records, per compile, the thread it
    ran on, and per step, whether the step ran a compiled graph."""

    run: Run
    compile_threads: list[str]
    steps: list[tuple[int, bool, bool, bool]]  # (step, graph ran, every layer settled, topology lasts)
    notices: list[dict[str, Any]]  # what the run told its listeners (progress display)


def _compiled_run(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str,
                  background: bool = False, fail_off_thread: bool = False) -> CompiledRun:
    import threading

    from esper_core.training import compiled as compiled_module

    threads: list[str] = []
    executions: list[int] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        threads.append(threading.current_thread().name)
        if fail_off_thread and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("backend refused the graph")

        def run(*args: Any) -> Any:
            if threading.current_thread() is threading.main_thread():  # not a compile's own pass
                executions.append(1)
            return graph.forward(*args)
        return run

    original = compiled_module.compile_model
    monkeypatch.setattr(compiled_module, "compile_model", lambda model, mode, wrapped_layers, backend="inductor":
                        original(model, mode, wrapped_layers, recording_backend))
    torch._dynamo.reset()
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={tmp_path}", "trainer.compile=default", *overrides])
    steps: list[tuple[int, bool, bool, bool]] = []
    choose = trainer.whole_graph.model_for

    def recording_choice(batch: Any, step: int) -> torch.nn.Module | None:
        before = len(executions)
        chosen = choose(batch, step)
        settled = all(layer.settled() for layer in trainer.manager.layers.values())
        steps.append((step, chosen is not None, settled, trainer.controller.topology_lasts()))
        if steps[1:]:  # the graph the step before ran (if any) has run by now
            last = steps[-2]
            assert (before > last_count[0]) == last[1], f"step {last[0]}: graph ran != chosen"
        last_count[0] = before
        return chosen

    last_count = [0]
    trainer.whole_graph.model_for = recording_choice  # type: ignore[method-assign]
    if background:  # what esper train does on CUDA when the run need not be deterministic (no GPU here)
        assert not trainer.whole_graph.background and trainer.device.type == "cpu"
        trainer.whole_graph.background = True
    notices: list[dict[str, Any]] = []
    summary = trainer.fit(notices.append)
    return CompiledRun(Run(trainer, summary), threads, steps, notices)


def test_a_deterministic_compiled_run_compiles_its_dormant_and_its_grown_model_in_line(
        recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit: Callable[..., Run]) -> None:
    """``trainer.compile`` with ``run.deterministic: true``: steps run one compiled graph exactly
    while every layer is its host alone or the seeds can no longer change (growth over, fossilized
    seeds inside the graph), each compiled on the training thread; the others run eagerly. The graph
    computes what the eager model does: the run ends with the weights of the same run uncompiled."""
    compiled = _compiled_run(recipe, tmp_path, monkeypatch, KEEP_ALL)
    run = compiled.run
    assert run.summary["seeds"]["fossilized"] == 2
    assert compiled.compile_threads == ["MainThread"] * 2  # the dormant model and the grown one
    ran = [step for step, chosen, _, _ in compiled.steps if chosen]
    assert all(settled for _, chosen, settled, _ in compiled.steps if chosen)
    assert [step for step, chosen, settled, lasts in compiled.steps if settled and lasts and not chosen] == []
    dormant = [step for step in ran if step < 10]  # until the seeds germinate at step 10 (step 0 measures)
    assert dormant == list(range(1, 10))
    grown = [step for step in ran if step >= 10]  # from the step no seed is live with every slot taken
    assert grown == list(range(grown[0], 200)) and grown[0] < 100
    eager = fit(KEEP_ALL).weights()
    assert run.weights().keys() == eager.keys()
    assert all(torch.equal(run.weights()[k], eager[k]) for k in eager)


def test_a_compiled_run_that_may_vary_compiles_every_settled_topology_off_the_training_thread(
        recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit: Callable[..., Run]) -> None:
    """On CUDA with ``run.deterministic: false`` every topology whose seeds are all plain branches is
    compiled on a thread of its own from a copy of the model, while training goes on eagerly; later
    steps of that topology run the graph. Training the copy leaves the model untouched: the run ends
    with the weights of the same run uncompiled (up to rounding)."""
    compiled = _compiled_run(recipe, tmp_path, monkeypatch, KEEP_ALL, "run.deterministic=false", background=True)
    run = compiled.run
    assert run.summary["seeds"]["fossilized"] == 2
    # the dormant model at start-up on the training thread (like any compiled loop), then the model
    # with both seeds on probation (fossilizing them changes no pass) off it, from the step their
    # probation began: not only once growth is over
    assert compiled.compile_threads == ["MainThread", "esper-compile"]
    assert not run.events("graph_compiled")  # a notice (its timing varies), not a chained event
    notices = [e for e in compiled.notices if e["event"] == "graph_compiled"]
    assert [(e["seeds"], e["ok"]) for e in notices] == [(2, True)]
    assert "compiled graph for 2 seeds in" in describe(notices[0]) and "off the training thread" in describe(notices[0])
    ran = [step for step, chosen, _, _ in compiled.steps if chosen]
    assert ran[:9] == list(range(1, 10)) and all(settled for _, chosen, settled, _ in compiled.steps if chosen)
    probation = next(step for step, _, settled, _ in compiled.steps if settled and step > 10)
    assert notices[0]["started"] == probation < next(step for step, _, _, lasts in compiled.steps if lasts)
    assert ran[-1] == 199
    eager = fit(KEEP_ALL, "run.deterministic=false").weights()
    _assert_within_rounding(run.weights(), eager)


def test_a_topology_that_fails_to_compile_off_the_training_thread_runs_eagerly(
        recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fit: Callable[..., Run]) -> None:
    """A compile that fails in the background stops nothing: the listeners are told why, and that
    topology's steps run eagerly to the end of the run."""
    compiled = _compiled_run(recipe, tmp_path, monkeypatch, KEEP_ALL, "run.deterministic=false", background=True,
                             fail_off_thread=True)
    notices = [e for e in compiled.notices if e["event"] == "graph_compiled"]
    assert [(e["seeds"], e["ok"]) for e in notices] == [(2, False)]
    assert "backend refused the graph" in notices[0]["error"]
    assert describe(notices[0]).endswith("backend refused the graph)); that topology runs eagerly")
    assert [step for step, chosen, _, _ in compiled.steps if chosen] == list(range(1, 10))  # the dormant model only
    assert compiled.run.summary["steps"] == 200
    _assert_within_rounding(compiled.run.weights(), fit(KEEP_ALL, "run.deterministic=false").weights())


def test_span_seeds_run_inside_the_compiled_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A span seed reads the input its feeder layer keeps: inside one compiled graph that is an
    attribute written and read in the same pass. The MLP of ``recipes/growth-mlp.yaml``, once grown by
    span seeds, runs its steps compiled and ends with exactly the eager run's weights."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "growth-mlp.yaml"
    # one ensemble of four per layer: growth settles early enough in 600 steps for the grown model to compile
    small = ["data.teacher.n_samples=2000", "trainer.max_steps=600", "telemetry.progress=none",
             "policy.ensemble_size=4"]
    compiled = _compiled_run(recipe, tmp_path / "compiled", monkeypatch, *small)
    eager = _train(recipe, [f"run.output_dir={tmp_path / 'eager'}", *small])
    assert compiled.run.summary["seeds"] == eager.summary["seeds"] and eager.summary["seeds"]["fossilized"] >= 4
    assert compiled.compile_threads == ["MainThread"] * 2  # the dormant MLP and the grown one
    grown = [step for step, chosen, _, lasts in compiled.steps if chosen and lasts]
    assert grown and grown[-1] == 599
    weights, reference = compiled.run.weights(), eager.weights()
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


def _assert_within_rounding(weights: dict[str, torch.Tensor], eager: dict[str, torch.Tensor]) -> None:
    # Within rounding: PyTorch's is_compiling flag is process-wide, so while a compile runs the
    # optimizer's step takes its compile-friendly path (same arithmetic, rounded differently).
    assert weights.keys() == eager.keys()
    assert all(torch.allclose(weights[k], eager[k], rtol=1e-3, atol=1e-3) for k in eager)
