"""The growth controller among the tools of a user's own loop: PyTorch's learning-rate schedulers, an
fp16 ``GradScaler``, gradient accumulation, model copies taken between steps, and the mistakes a user
makes wiring it up (each gets a clear message instead of a failure many steps later)."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esper_core
from esper_core import Evaluation, GrowthController, KasminaLayer
from esper_core.compiler.store import LocalKernelStore
from esper_core.errors import CheckpointError, ConfigError
from esper_core.growth import optimizer as optim
from esper_core.recipe.schema import PolicyConfig
from esper_core.seeds.lifecycle import SeedState
from factories import TwoLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(512, 8, generator=DATA), torch.randint(0, 4, (512,), generator=DATA)
SEEDS = {"targets": ["fc1"], "blueprints": ["wide_mlp"], "incubation_steps": 20, "blend_steps": 20,
         "probation_steps": 10}
POLICY = {"trigger": "periodic", "period_steps": 10, "growth_window": [0.0, 0.8]}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> LocalKernelStore:
    return LocalKernelStore(tmp_path_factory.mktemp("kernels"))


def evaluate(model: nn.Module) -> Evaluation:
    with torch.no_grad():
        out = model(X[:256])
    correct = (out.argmax(1) == Y[:256]).double()
    return Evaluation(float(correct.mean()), True, "accuracy", float(F.cross_entropy(out, Y[:256])), correct)


def controller(model: nn.Module, optimizer: torch.optim.Optimizer, kernels: LocalKernelStore, **options) -> GrowthController:
    options.setdefault("policy", POLICY)
    return GrowthController(model, optimizer, example=X[:2], max_steps=120, store=kernels, seeds=SEEDS, **options)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, growth: GrowthController, rows: slice,
             before_update: Callable[[], None] = lambda: None,
             scheduler_step: Callable[[float], None] = lambda loss: None) -> None:
    """One step of the user's loop (their scheduler stepped after the optimizer), validating every ten."""
    loss = F.cross_entropy(model(X[rows]), Y[rows])
    optimizer.zero_grad()
    loss.backward()
    growth.after_backward()
    before_update()
    optimizer.step()
    scheduler_step(float(loss.detach()))
    growth.after_step(loss)
    if growth.step % 10 == 0:
        growth.after_validation(evaluate(model))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, growth: GrowthController,
          scheduler_step: Callable[[float], None], steps: int = 120) -> list[tuple[float, float]]:
    """The user's loop; at every optimizer step, the seed group's learning rate and the one the
    controller's schedule gives for that step."""
    seed_lrs: list[tuple[float, float]] = []

    def seen() -> None:
        seed_lrs.append((optim.seed_group(optimizer)["lr"], growth._lr_of_seeds(growth.step)))
    for step in range(steps):
        one_step(model, optimizer, growth, slice((step * 32) % 512, (step * 32) % 512 + 32), seen, scheduler_step)
    return seed_lrs


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 0.99 ** k),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=200),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, step_size_up=20),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=2),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=20), torch.optim.lr_scheduler.ExponentialLR(o, 0.99)],
        milestones=[20]),
}


@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_keep_working_as_seeds_come_and_go(name: str, built: str, kernels: LocalKernelStore) -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)  # CyclicLR cycles the momentum too
    if built == "before":  # a scheduler made with the optimizer is handed over; one made after covers the group
        scheduler = SCHEDULERS[name](optimizer)
        growth = controller(model, optimizer, kernels, evaluate=evaluate, schedulers=[scheduler])
    else:
        growth = controller(model, optimizer, kernels, evaluate=evaluate)
        scheduler = SCHEDULERS[name](optimizer)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    seed_lrs = train(model, optimizer, growth, lambda loss: scheduler.step(loss) if plateau else scheduler.step())
    kinds = {e["event"] for e in growth.recorder.events}
    assert {"germinate", "blend"} <= kinds and kinds & {"fossilize", "cull"}, kinds
    # the seed group's rate is the controller's at every step, whatever the scheduler wrote there
    assert all(used == pytest.approx(own) for used, own in seed_lrs)
    assert [g.get("name") for g in optimizer.param_groups][-1] == "seeds"


def test_a_scheduler_built_before_and_not_handed_over_is_named_in_a_warning(kernels: LocalKernelStore) -> None:
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    with pytest.warns(UserWarning, match="schedulers=\\[...\\]"):
        controller(model, optimizer, kernels, evaluate=evaluate)


def _incubating(model: nn.Module, kernels: LocalKernelStore, **options) -> tuple[GrowthController, torch.optim.Optimizer]:
    """A controller whose seed on ``fc1`` is incubating (germinated at step 10, its kernel ready)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: every pass sees the same weights
    growth = controller(model, optimizer, kernels, evaluate=evaluate, **options)
    for _ in range(12):
        one_step(model, optimizer, growth, slice(0, 32))
    assert [ref for ref, layer in growth.manager.slots() if layer.slots[ref.index].state == SeedState.TRAINING]
    return growth, optimizer


def _seed_grads(growth: GrowthController) -> list[torch.Tensor]:
    return [p.grad.clone() for p in optim.seed_group(growth.optimizer)["params"]]


def test_an_fp16_grad_scaler_and_accumulation_leave_the_incubation_pull_as_one_full_batch_gives(
        kernels: LocalKernelStore) -> None:
    torch.manual_seed(0)
    base = TwoLinear()
    models = [copy.deepcopy(base) for _ in range(3)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    plain, _ = _incubating(models[0], kernels)
    scaled, scaled_opt = _incubating(models[1], kernels, scaler=scaler)
    accumulated, accumulated_opt = _incubating(models[2], kernels, accumulate_steps=4)

    for growth in (plain, scaled, accumulated):
        growth.optimizer.zero_grad()
    F.cross_entropy(models[0](X[:32]), Y[:32]).backward()
    scaler.scale(F.cross_entropy(models[1](X[:32]), Y[:32])).backward()
    scaler.unscale_(scaled_opt)
    for part in range(4):  # the loop divides each micro-batch's loss by their number
        rows = slice(8 * part, 8 * part + 8)
        (F.cross_entropy(models[2](X[rows]), Y[rows]) / 4).backward()
    assert scaler.get_scale() == 2.0 ** 16  # the loss really was scaled
    reference = _seed_grads(plain)
    for other in (scaled, accumulated):
        for a, b in zip(reference, _seed_grads(other), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_the_model_can_be_copied_between_any_two_steps(kernels: LocalKernelStore) -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, evaluate=evaluate)
    for _ in range(60):  # measurements every few steps arm a probe between after_step and after_backward
        one_step(model, optimizer, growth, slice(0, 32))
        snapshot = copy.deepcopy(model)  # an EMA or best-model snapshot
        assert all(layer.probe is None for layer in snapshot.modules() if hasattr(layer, "probe"))
        with torch.no_grad():
            assert torch.equal(snapshot(X[:8]), model(X[:8]))
    assert any(e["event"] == "germinate" for e in growth.recorder.events)


def test_seeds_that_cannot_be_judged_are_named_in_one_warning(kernels: LocalKernelStore) -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels)  # no evaluate: verdicts cannot run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, growth, lambda loss: None)
    said = [str(w.message) for w in caught if "no evaluate function" in str(w.message)]
    assert len(said) == 1 and "stay in probation" in said[0]


def test_wiring_mistakes_are_refused_at_once_with_what_to_do(kernels: LocalKernelStore) -> None:
    model = TwoLinear()
    temperature = nn.Parameter(torch.ones(()))  # a learnable loss weight kept outside the model
    with pytest.raises(ValueError, match="not the model's.*registered on the model"):
        controller(model, torch.optim.AdamW([*model.parameters(), temperature]), kernels)
    with pytest.raises(ValueError, match="not the model's"):
        controller(model, torch.optim.AdamW(TwoLinear().parameters()), kernels)  # another model's optimizer
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        controller(model, [*model.parameters()], kernels)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_steps"):
        GrowthController(TwoLinear(), None, example=X[:2], max_steps=0, store=kernels)
    growth = controller(TwoLinear(), None, kernels)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Evaluation"):
        growth.after_validation(0.5)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="after_backward"):  # no pass ran, so the armed measurement saw none
        assert growth.after_step(1.25).rolled_back is False  # a loss read with .item() is fine


@pytest.mark.parametrize("mistake, said", [
    ("never called", "after_backward() was not called between loss.backward() and optimizer.step()"),
    ("after zero_grad", "after_backward() found no gradients on the wrapped layers"),
])
def test_a_misplaced_after_backward_is_named_in_one_warning(mistake: str, said: str, kernels: LocalKernelStore) -> None:
    """Placement read merit 0.0 for every layer and grew by a tie, silently."""
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, evaluate=evaluate, policy={**POLICY, "placement": "merit"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            loss = F.cross_entropy(model(X[:32]), Y[:32])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if mistake == "after zero_grad":
                growth.after_backward()
            growth.after_step(loss)
    assert [str(w.message) for w in caught if said in str(w.message)] == [next(
        str(w.message) for w in caught if said in str(w.message))], [str(w.message) for w in caught]


def test_a_kernel_that_cannot_be_compiled_is_a_warning_in_an_own_loop(tmp_path) -> None:
    """The failure was only an event in recorder.events: a script whose every kernel failed trained
    without ever growing and exited 0, saying nothing."""
    blueprints = tmp_path / "blueprints"
    blueprints.mkdir()
    (blueprints / "broken.yaml").write_text(  # resolves, then fails the compiler's checks: a non-zero output at init
        "name: broken\nhost: linear\nops:\n  - {op: linear, in: in, out: rank}\n  - {op: linear, in: rank, out: out}\n")
    model = TwoLinear()
    with pytest.warns(UserWarning, match="kernel broken for layer fc1 cannot be compiled.*zero_at_init"):
        GrowthController(model, torch.optim.AdamW(model.parameters()), example=X[:2], max_steps=120,
                         store=LocalKernelStore(tmp_path / "kernels"), blueprint_dirs=[blueprints],
                         seeds={**SEEDS, "blueprints": ["broken"]}, policy=POLICY)


def test_a_mistyped_setting_names_the_argument_and_field(kernels: LocalKernelStore) -> None:
    """It was pydantic's raw ValidationError."""
    with pytest.raises(ConfigError) as refused:
        controller(TwoLinear(), None, kernels, policy={**POLICY, "period_step": 10})
    assert [str(p) for p in refused.value.problems] == [
        "GrowthController: policy.period_step: unknown key, did you mean 'period_steps'? (allowed: "
        + ", ".join(PolicyConfig.model_fields) + ")"]


def test_an_example_the_model_cannot_run_is_a_config_error_naming_it(kernels: LocalKernelStore) -> None:
    """It was torch's traceback from inside the wrapped model, and the model stayed wrapped."""
    model = TwoLinear()
    with pytest.raises(ConfigError) as refused:
        GrowthController(model, None, example=torch.randn(2, 5), max_steps=120, store=kernels, seeds=SEEDS)
    assert [str(p) for p in refused.value.problems] == [
        "GrowthController: example: the model cannot run an example of shape (2, 5): RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied (2x5 and 8x16)"]
    assert isinstance(refused.value.__cause__, RuntimeError)  # the model's own error, for a debugger
    assert not any(isinstance(m, KasminaLayer) for m in model.modules()) and model.training  # nothing changed


def test_a_task_from_a_dict_evaluates_on_the_model_s_device() -> None:
    """``Task({...})`` raised AttributeError on a dict and evaluate() needed an undocumented device."""
    from esper_core import Task

    task = Task({"kind": "classification"})
    result = task.evaluate(TwoLinear(), [(X[:64], Y[:64])])
    assert result.name == "accuracy" and result.higher_is_better and result.scores.shape == (64,)
    with pytest.raises(ConfigError, match="Task: kind: must be one of"):
        Task({"kind": "clasification"})


def test_perplexity_is_the_plain_likelihood_s_under_label_smoothing() -> None:
    """With task.label_smoothing the reported perplexity (and validation loss) was exp of the smoothed
    loss: 45.7 for a model whose true perplexity was 33.9."""
    from esper_core import Task

    torch.manual_seed(0)
    logits = torch.randn(4, 16, 11) * 3
    tokens = torch.randint(0, 11, (4, 16))

    class Fixed(nn.Module):  # a "language model" whose next-token logits are fixed
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits * self.scale

    result = Task({"kind": "language_model", "label_smoothing": 0.2}).evaluate(Fixed(), [(tokens, tokens)])
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert result.name == "perplexity" and result.metric == pytest.approx(float(nll.exp()), rel=1e-6)


@pytest.mark.parametrize("mistake, said", [
    ({"seeds": {**SEEDS, "blueprints": ["wide_mpl"]}}, "seeds.blueprints.0: unknown blueprint"),
    ({"seeds": {**SEEDS, "blueprints": ["span_linear"]}}, "blueprints.0: blueprint 'span_linear' grows on a pair"),
    ({"seeds": SEEDS, "governor": {"window": 0}}, "governor.window"),
])
def test_a_refused_controller_leaves_the_model_unwrapped_so_the_corrected_call_works(
        mistake: dict, said: str, kernels: LocalKernelStore) -> None:
    """Blueprints and the governor's settings were checked after the layers were wrapped: the model
    stayed wrapped, and the corrected call was refused too ("the model is already wrapped")."""
    model = TwoLinear()
    with pytest.raises(ConfigError, match=said):
        GrowthController(model, None, example=X[:2], max_steps=120, store=kernels, **mistake)
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    assert list(controller(model, None, kernels).manager.layers) == ["fc1"]


def test_a_setting_the_model_refuses_is_named_as_the_controller_s_argument(kernels: LocalKernelStore) -> None:
    """An own loop has no recipe, yet these read ``<recipe>: seeds.targets.0: ...``."""
    with pytest.raises(ConfigError) as refused:
        GrowthController(TwoLinear(), None, example=X[:2], max_steps=120, store=kernels,
                         seeds={**SEEDS, "targets": ["fc3"]})
    assert [str(p) for p in refused.value.problems] == [
        "GrowthController: seeds.targets.0: pattern 'fc3' matches no module that can host seeds (Linear, Conv1d, "
        "Conv2d, transformers' Conv1D); matchable: fc1, fc2"]


def test_an_example_without_a_batch_dimension_is_a_config_error_naming_it(kernels: LocalKernelStore) -> None:
    """``example=x[0]`` (one sample) runs through a Linear, so the model accepted it; then the kernel spec
    raised ``ValueError: a linear host with 8 inputs cannot take samples of shape ()`` from the compiler's
    internals, and the model stayed wrapped."""
    model = TwoLinear()
    with pytest.raises(ConfigError) as refused:
        GrowthController(model, None, example=X[0], max_steps=120, store=kernels, seeds=SEEDS)
    assert [str(p) for p in refused.value.problems] == [
        "GrowthController: example: layer fc1: a linear host with 8 inputs cannot take samples of shape (): the "
        "example must be a batch of inputs as the training loop passes them (e.g. x[:2], not x[0])"]
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())


def test_an_evaluate_that_does_not_return_an_evaluation_is_named_at_its_first_call(kernels: LocalKernelStore) -> None:
    """``evaluate=lambda m: accuracy(m)`` (a float) got as far as the first verdict, then failed inside
    Esper as ``AttributeError: 'float' object has no attribute 'scores'``."""
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, evaluate=lambda m: evaluate(m).metric)
    with pytest.raises(TypeError, match=r"^evaluate\(model\) must return an esper_core.Evaluation.*, not float$"):
        train(model, optimizer, growth, lambda loss: None)


def test_an_evaluation_takes_tensors_and_lists_and_refuses_what_is_not_a_number(kernels: LocalKernelStore) -> None:
    """Scores given as a list failed at the first verdict (``'list' object has no attribute 'numel'``),
    and a metric given as a string was compared as one."""
    made = Evaluation(torch.tensor(0.75), True, "accuracy", loss=torch.tensor(0.5), scores=[1, 0, 1, 1])
    assert (made.metric, made.loss) == (0.75, 0.5) and type(made.metric) is float and type(made.loss) is float
    assert made.scores.dtype == torch.float64 and made.scores.tolist() == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(TypeError, match=r"^Evaluation\(metric=...\): one number.*, not str$"):
        Evaluation("0.75", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Evaluation\(higher_is_better=...\): True or False, not str$"):
        Evaluation(0.75, "max")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Evaluation\(scores=...\): one number per held-out sample"):
        Evaluation(0.75, True, scores="all")  # type: ignore[arg-type]

    def listed(model: nn.Module) -> Evaluation:  # a user's evaluation that builds its scores in Python
        found = evaluate(model)
        return Evaluation(found.metric, True, "accuracy", found.loss, found.scores.tolist())

    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, evaluate=listed)
    train(model, optimizer, growth, lambda loss: None)
    judged = [e for e in growth.recorder.events if e["event"] in ("fossilize", "cull")]
    assert judged and all(e["samples"] == 256 for e in judged)  # paired per sample, from the list


def test_a_loss_of_many_values_is_refused_naming_its_shape(kernels: LocalKernelStore) -> None:
    """Per-sample losses (``reduction="none"``) passed to after_step failed inside the governor as
    ``RuntimeError: output with shape [] doesn't match the broadcast shape [32]``."""
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, evaluate=evaluate)
    per_sample = F.cross_entropy(model(X[:32]), Y[:32], reduction="none")
    optimizer.zero_grad()
    per_sample.mean().backward()
    growth.after_backward()
    optimizer.step()
    said = r"^after_step\(loss\): the step's loss is one number, not a tensor of shape \(32,\) \(pass the value"
    with pytest.raises(ValueError, match=said):
        growth.after_step(per_sample)
    assert growth.step == 0  # refused before anything moved: the corrected call counts the step
    assert growth.after_step(per_sample.mean()).rolled_back is False and growth.step == 1


@pytest.mark.parametrize("argument, value, said", [
    ("check_every", 0, "check_every must be a positive number of steps, not 0"),  # was a ZeroDivisionError at step 1
    ("seed", 1.5, "seed must be an integer, not 1.5"),  # was numpy's "TypeError: seed must be integer"
    ("evaluate", 0.5, "evaluate must be a function of the model that returns an esper_core.Evaluation, not float"),
    ("schedulers", "one", "schedulers must be a list of the learning-rate schedulers built on the optimizer before "
     "the controller (schedulers=[scheduler]), not StepLR"),  # was "TypeError: 'StepLR' object is not iterable"
])
def test_a_mistyped_argument_is_refused_at_once_naming_it(argument: str, value: object, said: str,
                                                         kernels: LocalKernelStore) -> None:
    """Each was accepted and failed later, inside Esper or NumPy, or as another library's message."""
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    if argument == "schedulers":
        value = torch.optim.lr_scheduler.StepLR(optimizer, 10)  # one scheduler, not a list of them
    with pytest.raises((TypeError, ValueError), match=f"^{re.escape(said)}$"):
        controller(model, optimizer, kernels, **{argument: value})
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    growth = controller(model, torch.optim.AdamW(model.parameters(), lr=0.01), kernels, evaluate=evaluate)
    with pytest.raises(TypeError, match="^after_validation\\(evaluate=...\\): a function of the model"):
        growth.after_validation(evaluate(model), evaluate=0.5)  # type: ignore[arg-type]


def test_a_model_without_parameters_is_refused_naming_it(kernels: LocalKernelStore) -> None:
    """It was a bare ``StopIteration`` from looking up the model's device."""
    with pytest.raises(TypeError, match="^model has no parameters: growth adds seeds beside its layers"):
        GrowthController(nn.Sequential(nn.ReLU()), None, example=X[:2], max_steps=120, store=kernels, seeds=SEEDS)


def test_resuming_with_another_optimizer_or_other_layers_is_refused_naming_both(
        tmp_path: Path, kernels: LocalKernelStore) -> None:
    """An SGD checkpoint loaded into Adam without a word, and the first step failed inside torch with
    ``KeyError: 'exp_avg'``; other target layers were refused as wrapping "different layers than the
    recipe", in a loop that has no recipe."""
    torch.manual_seed(0)
    model = TwoLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    growth = controller(model, optimizer, kernels, evaluate=evaluate)
    train(model, optimizer, growth, lambda loss: None, steps=30)
    esper_core.save_checkpoint(tmp_path, model=model, optimizer=optimizer, growth=growth)

    model = TwoLinear()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    with pytest.raises(CheckpointError, match=r"does not fit this model and optimizer \(the checkpoint's optimizer "
                                              r"is SGD, this one is Adam\)$"):
        esper_core.load_checkpoint(tmp_path, model=model, optimizer=adam, growth=controller(model, adam, kernels))
    model = TwoLinear()
    sgd = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"\(the checkpoint's seeds grow on fc1, and this model wraps fc1, fc2: "
                                              r"seeds.targets must select the same layers\)$"):
        esper_core.load_checkpoint(tmp_path, model=model, optimizer=sgd, growth=GrowthController(
            model, sgd, example=X[:2], max_steps=120, store=kernels, seeds={**SEEDS, "targets": ["fc1", "fc2"]}))
    model = TwoLinear()
    sgd = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    resumed = controller(model, sgd, kernels, evaluate=evaluate)
    esper_core.load_checkpoint(tmp_path, model=model, optimizer=sgd, growth=resumed)  # the same setup still loads
    train(model, sgd, resumed, lambda loss: None, steps=5)
    assert resumed.step == 35


def test_a_checkpoints_directory_that_is_a_link_is_never_written_or_read_through(
        tmp_path: Path, kernels: LocalKernelStore) -> None:
    """``save_checkpoint(DIR)`` wrote its checkpoints (and deleted the leftovers of earlier saves)
    wherever a ``DIR/checkpoints`` link planted there pointed, and ``load_checkpoint`` read them from there."""
    model = TwoLinear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    growth = controller(model, optimizer, kernels)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".tmp-a file of the user's").write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    message = r"checkpoints: a symbolic link in place of the run's own checkpoints directory"
    with pytest.raises(CheckpointError, match=message):
        esper_core.save_checkpoint(tmp_path / "run", model=model, optimizer=optimizer, growth=growth)
    with pytest.raises(CheckpointError, match=message):
        esper_core.load_checkpoint(tmp_path / "run", model=model, optimizer=optimizer, growth=growth)
    assert [p.name for p in elsewhere.iterdir()] == [".tmp-a file of the user's"]


def test_a_controller_that_can_never_grow_adds_no_seed_group_and_still_resumes(
        tmp_path: Path, kernels: LocalKernelStore) -> None:
    """With ``max_seeds: 0`` no seed can exist, so the optimizer keeps only its own groups (an empty one
    still costs the optimizer its per-group work at every step); a checkpoint of it resumes, also into
    a controller that may grow, which then adds the group around the restored state."""
    model = TwoLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    growth = controller(model, optimizer, kernels, policy={**POLICY, "max_seeds": 0})
    assert len(optimizer.param_groups) == 1 and optim.seed_group(optimizer) is None
    for step in range(20):
        one_step(model, optimizer, growth, slice(step * 16, step * 16 + 16))
    esper_core.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, growth=growth)
    again = TwoLinear()
    adam = torch.optim.AdamW(again.parameters(), lr=0.01)
    esper_core.load_checkpoint(tmp_path / "ckpt", model=again, optimizer=adam,
                               growth=controller(again, adam, kernels, policy={**POLICY, "max_seeds": 0}))
    assert torch.equal(again.fc1.host.weight, model.fc1.host.weight) and len(adam.param_groups) == 1
    grows = TwoLinear()
    adam = torch.optim.AdamW(grows.parameters(), lr=0.01)
    esper_core.load_checkpoint(tmp_path / "ckpt", model=grows, optimizer=adam, growth=controller(grows, adam, kernels))
    assert [g.get("name") for g in adam.param_groups][-1] == optim.SEEDS
    assert torch.equal(adam.state[grows.fc1.host.weight]["exp_avg"], optimizer.state[model.fc1.host.weight]["exp_avg"])


def test_blueprint_directories_given_as_the_seeds_key_or_as_strings_are_searched(tmp_path, monkeypatch) -> None:
    """``seeds={"blueprint_dirs": [...]}``, a key api.md documents, was ignored ("unknown blueprint"), and
    ``blueprint_dirs=["mine"]`` (strings, not Paths) failed with ``AttributeError: 'str' object has no
    attribute 'is_dir'`` from inside the blueprint library."""
    mine = tmp_path / "mine"
    mine.mkdir()
    builtin = Path(esper_core.__file__).parent / "blueprints" / "library" / "wide_mlp.yaml"
    (mine / "narrow_mlp.yaml").write_text(builtin.read_text().replace("name: wide_mlp", "name: narrow_mlp"))
    monkeypatch.chdir(tmp_path)  # the seeds key resolves against the working directory, as a path in a script does
    store = LocalKernelStore(tmp_path / "kernels")
    seeds = {**SEEDS, "blueprints": ["narrow_mlp"]}
    for options in ({"seeds": {**seeds, "blueprint_dirs": ["mine"]}},
                    {"seeds": seeds, "blueprint_dirs": [str(mine)]}):
        growth = GrowthController(TwoLinear(), None, example=X[:2], max_steps=120, store=store, start=False,
                                  **options)
        assert growth.catalog.blueprints_for("fc1") == ["narrow_mlp"]
    with pytest.raises(TypeError, match=r"blueprint_dirs must be a list of directories.*\['mine'\]"):
        GrowthController(TwoLinear(), None, example=X[:2], max_steps=120, store=store, start=False, seeds=seeds,
                         blueprint_dirs="mine")  # type: ignore[arg-type]


def test_a_scaler_store_or_clipping_norm_of_the_wrong_type_is_refused_at_the_call(kernels: LocalKernelStore) -> None:
    """``scaler=True`` was accepted, then failed inside autograd's backward at the first incubating seed
    (``'bool' object has no attribute 'is_enabled'``, many steps later); ``clip_grad_norm_(None)`` failed
    inside torch's clipping, and ``store=".esper"`` inside the kernel supply."""
    with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler \(or None\), not bool"):
        controller(TwoLinear(), None, kernels, scaler=True)
    with pytest.raises(TypeError, match=r"store must be a kernel store .*open_kernel_store.*, not str"):
        GrowthController(TwoLinear(), None, example=X[:2], max_steps=120, store=".esper", seeds=SEEDS)  # type: ignore
    model = TwoLinear()
    growth = controller(model, torch.optim.SGD(model.parameters(), lr=0.1), kernels)
    for norm in (None, "1.0", True, -1.0):
        with pytest.raises(ValueError if norm == -1.0 else TypeError, match=r"clip_grad_norm_\(max_norm\)"):
            growth.clip_grad_norm_(norm)  # type: ignore[arg-type]
    from esper_core.integrations.lightning import EsperGrowth
    with pytest.raises(TypeError, match=r"EsperGrowth\(clip_grad_norm=\.\.\.\)"):
        EsperGrowth(example=X[:2], clip_grad_norm="1.0")  # type: ignore[arg-type]
