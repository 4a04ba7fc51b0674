"""The recipe schema: every key a recipe may hold, its type, default and meaning.

Each field's ``description`` is the user documentation: ``docs/recipe-reference.md`` is generated
from this module, so the reference can never drift from what the loader accepts. Unknown keys are
rejected everywhere (``extra="forbid"``) because a misspelt key that is silently ignored is the most
expensive kind of configuration bug in a long training run. Types are strict for the same reason:
``max_steps: true`` is not 1 step and ``lr: "0.1"`` is not a number (only an integer where a float is
expected is accepted, since YAML writes ``1`` for ``1.0``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator


class Section(BaseModel):
    """Base of every recipe section: strict about unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunConfig(Section):
    name: str = Field("run", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run name; the run directory is `<output_dir>/<name>`.")
    output_dir: str = Field("runs", min_length=1, description="Directory that holds run directories.")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed for every random number generator and for the data split.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` picks CUDA when available, else CPU; `cuda` fails if no GPU is present.")
    deterministic: bool = Field(
        True, description="Ask PyTorch for deterministic kernels (bit-exact reruns on the same hardware).")


MAX_SYNTHETIC_VALUES = 2**27
"""Most input values (``n_samples * n_features``) the synthetic generator makes: it holds them in float64
and in float32 (12 bytes each), 1.5 GiB at this bound. Larger data belongs in a file or a factory."""


class SyntheticConfig(Section):
    n_samples: int = Field(2000, ge=10, le=10_000_000, description="Number of generated samples.")
    n_features: int = Field(20, ge=1, le=100_000, description="Number of input features (`n_samples x n_features` "
                            "may not exceed 2^27 values).")
    n_classes: int = Field(3, ge=2, le=1000, description="Number of classes.")
    noise: float = Field(0.1, ge=0.0, le=10.0, description="Standard deviation of the added Gaussian noise.")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "SyntheticConfig":
        values = self.n_samples * self.n_features
        if values > MAX_SYNTHETIC_VALUES:
            raise ValueError(f"n_samples x n_features is {values:,} values, more than the {MAX_SYNTHETIC_VALUES:,} "
                             "the generator makes (12 bytes each in memory); use `source: file` or `factory` for "
                             "larger data")
        return self


class TeacherConfig(Section):
    n_samples: int = Field(20_000, ge=10, le=10_000_000, description="Number of generated samples.")
    n_features: int = Field(40, ge=1, le=100_000, description="Input size of the teacher network.")
    widths: list[int] = Field(default_factory=lambda: [64, 64], min_length=1, max_length=16,
                              description="Hidden widths of the random ReLU teacher.")
    n_classes: int = Field(10, ge=2, le=1000, description="Number of classes (the teacher's argmax).")

    @field_validator("widths")
    @classmethod
    def _widths_in_range(cls, widths: list[int]) -> list[int]:
        if any(w < 1 or w > 100_000 for w in widths):
            raise ValueError("every width must be between 1 and 100000")
        return widths


class Mnist1dConfig(Section):
    n_samples: int = Field(20_000, ge=10, le=10_000_000, description="Number of generated samples "
                           "(balanced over the ten classes).")
    length: int = Field(40, ge=8, le=4096, description="Points per signal.")


class TextConfig(Section):
    seq_len: int = Field(64, ge=2, le=65_536, description="Characters per training sequence (the model's context).")
    stride: int | None = Field(None, ge=1, le=65_536, description="Characters between the starts of consecutive "
                               "sequences (default: `seq_len`, non-overlapping).")


class DataConfig(Section):
    source: Literal["digits", "breast_cancer", "wine", "diabetes", "synthetic", "teacher", "mnist1d", "text",
                    "file", "factory"] = Field(
        "digits", description="Built-in dataset (`digits`, `breast_cancer`, `wine`, `diabetes` (regression); "
        "bundled, nothing is downloaded), a seeded generator (`synthetic`, `teacher`: a random ReLU teacher network "
        "on which small hosts underfit, `mnist1d`: MNIST-1D-style signals), `text` (a UTF-8 file at `path`, as "
        "character sequences for language modelling), `file` (`.npz` or `.csv` at `path`) or `factory`.")
    layout: Literal["image", "flat"] = Field(
        "flat", description="`image` gives `digits` as 1x8x8 images and keeps a `file` source's `x` as images "
        "(shape (N, C, H, W), or (N, H, W) read as one channel); `flat` (the default, also for an image file) "
        "flattens every sample to a feature vector. The other built-in and generated sources have no image "
        "layout (`image` is an error); `text` and `factory` ignore it.")
    path: str | None = Field(None, description="Data file for `source: file` or `text`; relative paths are "
                             "resolved against the recipe's directory. `.npz` needs arrays `x` and `y`; "
                             "`.csv` is numeric with a header row and the label in `label_column`.")
    label_column: str = Field("label", description="Label column of a `.csv` file.")
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                description="`package.module:function` returning a torch Dataset (map-style or "
                                "iterable), or a tuple `(train, val, test)` of them, for `source: factory`. Samples "
                                "are `(input, target)` pairs or dicts (the target under `task.target_key`). This is "
                                "code: it runs with your permissions; `ESPER_ALLOW_FACTORIES=0` refuses it.")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `factory`.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Generator settings.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="`teacher` generator settings.")
    mnist1d: Mnist1dConfig = Field(default_factory=Mnist1dConfig, description="`mnist1d` generator settings.")
    text: TextConfig = Field(default_factory=TextConfig, description="`text` source settings.")
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of samples held out for validation.")
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5, description="Share of samples held out for test.")
    standardize: bool = Field(True, description="Standardise floating-point features with statistics of the "
                              "training split (integer inputs such as token ids are never touched).")
    batch_size: int = Field(64, ge=1, le=65536, description="Training batch size.")
    eval_batch_size: int = Field(512, ge=1, le=65536, description="Batch size for validation and test.")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes for datasets that are not "
                             "in-memory tensors (0: load in the training process).")
    pin_memory: bool = Field(False, description="Pin batches in page-locked memory (faster copies to a GPU).")
    persistent_workers: bool = Field(True, description="Keep DataLoader workers alive between epochs "
                                     "(with `num_workers` > 0).")

    @model_validator(mode="after")
    def _source_needs(self) -> "DataConfig":
        if self.source in ("file", "text") and not self.path:
            raise ValueError(f"`path` is required when source is '{self.source}'")
        if self.source == "factory" and not self.factory:
            raise ValueError("`factory` is required when source is 'factory'")
        return self


class ModelConfig(Section):
    arch: Literal["mlp", "cnn", "transformer", "factory"] = Field(
        "mlp", description="`mlp` (widths), `cnn` (a small ResNet-style CNN), `transformer` (a small causal "
        "language model over token ids) or `factory`.")
    widths: list[int] = Field(default_factory=lambda: [64], min_length=0, max_length=32,
                              description="Hidden widths of the MLP.")
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=8,
                                description="Channels of the CNN's stages (one residual block each).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability in the zoo models.")
    d_model: int = Field(128, ge=8, le=16_384, description="Transformer width.")
    n_layers: int = Field(2, ge=1, le=64, description="Transformer blocks.")
    n_heads: int = Field(4, ge=1, le=256, description="Attention heads (must divide `d_model`).")
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                description="`package.module:function` returning an nn.Module, called "
                                "with `input_shape`, `num_classes` and `factory_kwargs`. This is code: it runs "
                                "with your permissions; `ESPER_ALLOW_FACTORIES=0` refuses it.")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for `factory`.")

    # Per-field checks are field validators so that errors point at the field's own line.
    @field_validator("widths")
    @classmethod
    def _widths_in_range(cls, widths: list[int]) -> list[int]:
        if any(w < 1 or w > 1_000_000 for w in widths):
            raise ValueError("every width must be between 1 and 1000000")
        return widths

    @field_validator("channels")
    @classmethod
    def _channels_in_range(cls, channels: list[int]) -> list[int]:
        if any(c < 1 or c > 65536 for c in channels):
            raise ValueError("every channel count must be between 1 and 65536")
        return channels

    @model_validator(mode="after")
    def _arch_needs(self) -> "ModelConfig":
        if self.arch == "factory" and not self.factory:
            raise ValueError("`factory` is required when arch is 'factory'")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self

    def growth_note(self) -> str | None:
        """What a problem with ``seeds.targets`` or ``seeds.exclude`` should add about this model, if anything.

        An MLP with no hidden widths is a legitimate (linear) model, but its head is the only layer that can
        grow: a target naming hidden layers then matches nothing because of ``model.widths``, not a typo in
        the pattern, and the error has to say so."""
        if self.arch == "mlp" and not self.widths:
            return "model.widths is empty: an MLP without hidden layers has only its head to grow"
        return None


METRICS_OF_KIND: dict[str, frozenset[str]] = {
    "classification": frozenset({"accuracy", "loss"}), "regression": frozenset({"rmse", "r2", "loss"}),
    "language_model": frozenset({"perplexity", "token_accuracy", "loss"}),
    "token_classification": frozenset({"token_accuracy", "perplexity", "loss"}), "custom": frozenset({"loss"})}
"""The validation figures each task kind reports (any of them may be the task's or early stopping's metric)."""


class TaskConfig(Section):
    kind: Literal["classification", "regression", "language_model", "token_classification", "custom"] = Field(
        "classification", description="What the model learns: `classification` (cross-entropy; metric accuracy), "
        "`regression` (MSE or Huber; metrics RMSE and R²), `language_model` (next-token cross-entropy on shifted "
        "targets; metric perplexity), `token_classification` (per-token cross-entropy; metric token accuracy) or "
        "`custom` (`function`).")
    loss: Literal["cross_entropy", "mse", "huber"] | None = Field(
        None, description="Regression loss (`mse` by default, or `huber`); the other built-in kinds use "
        "cross-entropy.")
    metric: Literal["accuracy", "rmse", "r2", "perplexity", "token_accuracy", "loss"] | None = Field(
        None, description="The metric verdicts, plateau detection and the summary use (default: accuracy, rmse, "
        "perplexity, token_accuracy, loss for the kinds above).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the training "
                                   "cross-entropy (evaluation, perplexity and verdicts use the plain negative "
                                   "log-likelihood).")
    huber_delta: float = Field(1.0, gt=0.0, le=1e6, description="Threshold of the Huber loss.")
    ignore_index: int = Field(-100, ge=-(2**31), le=2**31 - 1, description="Target value the token losses and "
                              "metrics skip (padding).")
    function: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="`custom`: a "
                                 "`package.module:function` called as `function(output, targets)` returning the "
                                 "scalar loss (its metric is that loss, lower is better). Recipes naming functions "
                                 "run code.")
    target_key: str = Field("labels", min_length=1, description="Key of the target in dict batches; every other "
                            "key is passed to the model as a keyword argument.")

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        allowed = METRICS_OF_KIND
        if self.kind == "custom" and not self.function:
            raise ValueError("`function` is required when kind is 'custom'")
        if self.kind != "custom" and self.function:
            raise ValueError("`function` applies only to kind 'custom'")
        if self.metric is not None and self.metric not in allowed[self.kind]:
            raise ValueError(f"metric '{self.metric}' does not apply to kind '{self.kind}' "
                             f"(choose from {', '.join(sorted(allowed[self.kind]))})")
        if self.loss is not None and (self.kind == "regression") != (self.loss in ("mse", "huber")):
            raise ValueError(f"loss '{self.loss}' does not apply to kind '{self.kind}'")
        return self


class SeedsConfig(Section):
    targets: list[str] = Field(default_factory=lambda: ["type:Linear"], min_length=1,
                               description="Which host layers to wrap: a glob on the module name "
                               "(`features.*`), `re:<regex>`, or `type:Linear` / `type:Conv2d` "
                               "(subclasses match). Matching nothing is an error.")
    exclude: list[str] = Field(default_factory=list, description="Patterns (same syntax) to leave unwrapped, "
                               "e.g. the classifier head.")
    per_layer: int = Field(8, ge=1, le=16, description="Seed slots per wrapped layer: by default as many as the "
                           "policy's default seed budget, so the verdicts can send every seed to the one layer where "
                           "width pays; a slot is used only when the policy grows there.")
    blueprints: list[str] = Field(default_factory=lambda: ["lowrank_adapter"], min_length=1,
                                  description="Blueprint names the policy may germinate (builtin or found "
                                  "in `blueprint_dirs`).")
    blueprint_dirs: list[str] = Field(default_factory=list,
                                      description="Extra directories of blueprint YAML files (`*.yaml`, `*.yml`), "
                                      "relative to the recipe.")
    rank: int = Field(8, ge=1, le=4096, description="Default value of the symbolic dim `rank`.")
    incubation_steps: int = Field(100, ge=1, le=10_000_000,
                                  description="Optimizer steps a seed trains gradient-isolated before blending.")
    blend_steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps of the alpha ramp 0 -> 1.")
    blend_schedule: Literal["linear", "cosine", "gated"] = Field(
        "linear", description="Alpha ramp; `gated` advances only while the training loss is not rising.")
    probation_steps: int = Field(50, ge=0, le=10_000_000,
                                 description="Optimizer steps at full weight before the counterfactual verdict.")
    embargo_steps: int = Field(100, ge=0, le=10_000_000,
                               description="Optimizer steps a slot stays closed after a cull.")
    eta: float = Field(1.0, gt=0.0, le=1e6, description="Incubation step size in per-sample units: the seed "
                       "regresses onto `-eta * dL/dy` (proximal term `||g||^2 / (2 eta)`).")
    fossilize_margin: float = Field(0.0, ge=-1e6, le=1e6,
                                    description="Counterfactual verdict, in the per-sample scores of the task's "
                                    "metric (oriented so that positive helps: correct or not for accuracy, minus the "
                                    "squared error for RMSE, the log-likelihood per token for perplexity): a seed is "
                                    "culled when the upper confidence bound of its mean score gain (seed on vs. "
                                    "muted, on the same held-out samples) is below this. 0 culls only seeds that "
                                    "clearly hurt.")
    verdict_confidence: float = Field(0.95, ge=0.5, le=0.9999, description="One-sided confidence of the verdict's "
                                      "bound: the gain's paired standard error is widened by the normal quantile "
                                      "of this.")
    loss_guard: float = Field(0.5, gt=0.0, le=1e6, description="A seed with which the held-out loss is non-finite or "
                              "more than this share worse than without it is culled whatever the metric says.")
    eval_batches: int = Field(4, ge=1, le=10_000, description="Held-out batches for counterfactual evaluation.")
    lr_scale: float = Field(2.0, gt=0.0, le=1000.0,
                            description="Learning rate of seed parameters relative to `trainer.lr` (in your own "
                            "loop: to the optimizer's learning rate when the controller is built) while the run "
                            "still improves (see `lr_schedule`).")
    merge_linear: bool = Field(True, description="Fold a fossilized seed that is an exact linear map of its host's "
                               "input (e.g. `lowrank_adapter` on a Linear host: (W + BA)x) into the host's weight: it "
                               "added no expressivity, and merged it costs no parameter.")
    lr_schedule: Literal["adaptive", "window", "host"] = Field(
        "adaptive", description="Seed learning rate. `window` (in `esper train`) keeps `trainer.lr x lr_scale` "
        "while the growth window is open and decays it (cosine) to zero by the end, so a seed born late still "
        "learns; `host` follows the host's schedule, times `lr_scale`; `adaptive` (the default) is `window` (in "
        "your own loop: constant) until the task's validation metric stops rising (its trend over the last "
        "`policy.trend_window` evaluations is no longer positive), and from then on at most the host's learning "
        "rate: new capacity that learns fast on a run that has begun to overfit only overfits faster (a run "
        "that cannot grow, `policy.max_seeds: 0`, never switches).")

    @field_validator("blueprints")
    @classmethod
    def _blueprints_once(cls, blueprints: list[str]) -> list[str]:
        """A name listed twice would be offered twice: the `policy.random` baseline would draw it twice as
        often, and the dry run would list it twice on every layer."""
        repeated = sorted({name for name in blueprints if blueprints.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} listed more than once; name each blueprint once")
        return blueprints


class SelectorConfig(Section):
    strategy: Literal["ucb1", "thompson", "epsilon_greedy", "greedy"] = Field(
        "ucb1", description="Bandit over (blueprint x layer kind) arms: `ucb1` (optimism), `thompson` (posterior "
        "sampling), `epsilon_greedy`, or `greedy` (best mean reward so far).")
    discount: float = Field(1.0, gt=0.0, le=1.0, description="Below 1, every new reward multiplies all older arm "
                            "statistics by this factor (the discounted variant, for rewards that drift).")
    exploration: float = Field(1.0, ge=0.0, le=100.0, description="Width of UCB's bonus and of Thompson's posterior, "
                               "in units of the observed reward spread.")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="Share of random choices for `epsilon_greedy`.")
    prior_weight: float = Field(1.0, ge=0.0, le=1000.0, description="Pulls the health-signal prior of an arm "
                                "counts for (0 ignores the prior).")
    cull_penalty: float = Field(0.001, ge=0.0, le=100.0, description="Metric gain subtracted from a culled "
                                "seed's counterfactual gain before it becomes its arm's reward (reward: gain per 1000 "
                                "added parameters).")
    rollback_penalty: float = Field(0.01, ge=0.0, le=100.0, description="A seed that caused a rollback is credited "
                                    "a metric gain of minus this (in the task's metric).")
    share_across_runs: bool = Field(False, description="Start from, and add to, the arm statistics of earlier runs "
                                    "kept in `<storage.workspace>/selector.json`.")


class PolicyConfig(Section):
    trigger: Literal["plateau", "periodic"] = Field(
        "periodic", description="Germinate every `period_steps` inside the growth window (the default: growth "
        "starts early, while seeds can still learn), or on a validation plateau.")
    period_steps: int = Field(100, ge=1, le=10_000_000, description="Steps between growth for `periodic`.")
    plateau_patience: int = Field(2, ge=1, le=10_000,
                                  description="Evaluations without improvement that make a plateau.")
    plateau_min_delta: float = Field(1e-3, ge=0.0, description="Improvement of the task's validation metric that "
                                      "counts (in its own units: 0.001 is 0.1 accuracy points).")
    growth_window: tuple[Annotated[float, Strict()], Annotated[float, Strict()]] = Field(
        (0.05, 0.7), strict=False, description="Fractions of `trainer.max_steps` inside which growth may start; the rest "
        "is kept for fine-tuning.")
    merit_every: int = Field(10, ge=1, le=100_000,
                             description="Steps between health measurements: gradient merit, activation statistics "
                             "and the residual functional gradient, on the device, read only when the policy decides; "
                             "taken only inside the growth window while a seed could still grow (seed budget "
                             "unspent and a slot free).")
    merit_decay: float = Field(0.8, ge=0.0, lt=1.0,
                               description="Exponential averaging of merit across measurements (batches).")
    placement: Literal["residual", "merit"] = Field(
        "residual", description="How layers are ranked for growth: `residual` by the size of the functional "
        "gradient at the layer's output that its own weights cannot express (the first-order loss decrease only "
        "new capacity there can buy), then, as verdicts arrive, by what each layer's seeds measurably bought (a layer "
        "with verdicts waits while another layer's first seeds await theirs); `merit` by gradient merit (favours the "
        "layer nearest the loss).")
    merit_ratio: float = Field(0.5, ge=0.0, le=1.0,
                               description="A layer is eligible only if its placement score is at least this share "
                               "of the best score among the layers that could take a seed (0: every layer, in score "
                               "order). Growth waits for a busy bottleneck rather than spreading to layers that need "
                               "capacity less.")
    max_germinations: int = Field(4, ge=1, le=1024, description="Seeds that may germinate at one decision: "
                                  "layers are planned in placement order until this many seeds are chosen; a layer's "
                                  "`ensemble` plan is taken whole, so with the defaults one decision grows two seeds in "
                                  "each of up to two layers.")
    max_seeds: int = Field(8, ge=0, le=10_000, description="Most seeds alive (training, blending, probation "
                           "or fossilized) at once.")
    max_added_params: int = Field(1_000_000, ge=0, description="Most parameters growth may add. A blueprint one "
                                  "seed of which exceeds it on a layer is never grown there, and its kernel for "
                                  "that layer is not compiled (`--dry-run` lists it as unusable).")
    max_added_flops: int | None = Field(None, ge=0, description="Most forward FLOPs per sample growth may add "
                                        "(analytic; none: no limit); a single seed over it is treated as for "
                                        "`max_added_params`.")
    max_latency_ms: float | None = Field(None, gt=0.0, description="Skip blueprints whose measured forward+backward "
                                         "latency on a layer exceeds this (measured once per blueprint and layer; "
                                         "none: no limit).")
    underfit_gap: float = Field(0.1, ge=0.0, le=10.0, description="Training counts as underfitting while the "
                                "validation loss exceeds the training loss by less than this share of it.")
    underfit_speedup: float = Field(2.0, ge=1.0, le=100.0, description="While underfitting, the period and the "
                                    "plateau patience are divided by this (grow faster).")
    trend_window: int = Field(5, ge=2, le=10_000, description="Recent losses the train and validation trends "
                              "(least-squares slopes) are fitted to, and recent validation metrics the trend that "
                              "`seeds.lr_schedule: adaptive` watches.")
    random: bool = Field(False, description="A baseline: replace every choice of when (growth every `period_steps` "
                         "x U(0.5, 1.5), the first one uniformly inside the first period of the window), where "
                         "(a uniformly random layer that can take a seed) and what (a uniformly random blueprint "
                         "within the budgets) by a seeded random one; budgets, lifecycle and verdicts are unchanged.")
    orchestrator: Literal["replace", "diversify", "specialize", "ensemble"] = Field(
        "ensemble", description="`ensemble` (the default): germinate up to `ensemble_size` seeds in the chosen "
        "layer at once (one per free slot), each judged on its own, so growth is dense and early; `diversify`: one "
        "seed per layer at a time, preferring blueprints the layer does not hold yet; `replace`: cull a full "
        "layer's weakest live seed for a new choice; `specialize`: replicate the best blueprint into layers of its "
        "kind.")
    ensemble_size: int = Field(2, ge=2, le=16, description="Seeds `ensemble` germinates together in one layer "
                               "(at most its free slots). Small ensembles leave the seed budget to the layers whose "
                               "first seeds' verdicts show that width pays there.")
    replace_after: int = Field(100, ge=0, le=10_000_000, description="Steps a live seed must have lived before "
                               "`replace` may cull it.")
    selector: SelectorConfig = Field(default_factory=SelectorConfig, description="Which blueprint to grow.")

    @field_validator("growth_window")
    @classmethod
    def _window_ordered(cls, window: tuple[float, float]) -> tuple[float, float]:
        start, end = window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"must satisfy 0 <= start < end <= 1 (got [{start}, {end}])")
        return window


class GovernorConfig(Section):
    enabled: bool = Field(True, description="Roll back to the last good snapshot when the loss is NaN/Inf or spikes.")
    window: int = Field(20, ge=3, le=10_000, description="Logged losses the spike statistics are computed over.")
    zscore: float = Field(6.0, gt=0.0, description="A logged loss above mean + zscore * std of the window is "
                          "suspicious.")
    spike_reads: int = Field(2, ge=1, le=100, description="Consecutive suspicious logged losses that make a spike "
                             "(one batch's loss is noisy; a fault persists).")
    max_rollbacks: int = Field(3, ge=0, le=1000,
                               description="Rollbacks after which the run stops with an error instead.")


class EarlyStoppingConfig(Section):
    patience: int = Field(5, ge=1, le=100_000, description="Validations in a row without improvement that stop "
                          "the run.")
    min_delta: float = Field(0.0, ge=0.0, description="Improvement of the metric that counts, in its own units.")
    metric: Literal["accuracy", "rmse", "r2", "perplexity", "token_accuracy", "loss"] | None = Field(
        None, description="The validation figure watched (default: the task's metric); `loss` is the validation "
        "loss. Its direction is its own (accuracy up, loss down).")
    during_growth: bool = Field(False, description="Count validations before the policy's growth window has "
                                "closed too; by default patience counts only after it, so a run never stops while "
                                "it may still grow (unless nothing can grow: `policy.max_seeds: 0`).")


class TrainerConfig(Section):
    max_steps: int = Field(1000, ge=1, le=100_000_000, description="Optimizer steps to train.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adamw", description="Optimizer (torch's; on the CPU its "
                                                       "fused kernel, several times faster per step than torch's "
                                                       "default there; on a GPU torch's default).")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    schedule: Literal["constant", "cosine", "linear", "step", "one_cycle"] = Field(
        "cosine", description="Learning-rate schedule over `max_steps`, after the warm-up: `constant`; `cosine` and "
        "`linear` decay to 0 at `max_steps`; `step` multiplies by `gamma` every `step_size` steps; `one_cycle` is "
        "PyTorch's OneCycleLR (from `lr`/25 up to `lr` during the warm-up, then cosine down to `lr`/25e4).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps, fewer than `max_steps` (for `one_cycle`: "
                              "the rise, by default 30% of `max_steps`).")
    step_size: int | None = Field(None, ge=1, description="`step` schedule: optimizer steps between decays.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="`step` schedule: the factor of each decay.")
    accumulate_steps: int = Field(1, ge=1, le=4096, description="Micro-batches of `data.batch_size` per optimizer "
                                  "step (gradient accumulation): their gradients are averaged, so a step sees "
                                  "`batch_size x accumulate_steps` samples. Every counter (`max_steps`, schedules, "
                                  "lifecycle, `eval_every`, checkpoints) counts optimizer steps; health is measured "
                                  "on the first micro-batch.")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the gradient norm to this value (the host and "
                                    "blended seeds together, each incubating seed on its own).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision of forward passes (training and evaluation); `fp16` also scales "
        "the loss (GradScaler). Seeds run under the same autocast, and their kernels are validated in it.")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field(
        "none", description="`torch.compile` mode for training steps (`none`: eager), with static shapes. A step "
        "runs the model as one compiled graph, fossilized seeds and seeds on probation inside it, once that "
        "topology is compiled; steps with an incubating or blending seed or a health measurement run eagerly. "
        "On CUDA with `run.deterministic: false` and mode `default`, each later topology compiles on a background "
        "thread while training goes on eagerly (no stall, but a cold compile slows training while it runs); "
        "otherwise only the dormant model and the grown one (no seed live, no growth left) compile, on the "
        "training thread, so which steps run compiled never depends on compile time. Under torchrun seeds run "
        "eagerly between compiled host regions.")
    eval_every: int = Field(50, ge=1, description="Steps between validation passes.")
    log_every: int = Field(10, ge=1, description="Steps between lines in metrics.jsonl (and loss reads).")
    governor: GovernorConfig = Field(default_factory=GovernorConfig, description="Anomaly rollback.")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="Stop when the validation metric stops "
                                                       "improving (none: train to `max_steps`).")

    @model_validator(mode="after")
    def _schedule_needs(self) -> "TrainerConfig":
        if self.schedule == "step" and self.step_size is None:
            raise ValueError("`step_size` is required when schedule is 'step'")
        if self.warmup_steps >= self.max_steps:  # a typo (5000 for 500) would otherwise train a whole run warming up
            raise ValueError(f"`warmup_steps` ({self.warmup_steps}) must be below `max_steps` ({self.max_steps}): "
                             "the learning rate would never reach `lr`")
        return self


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Write a checkpoint every N steps.")
    every_minutes: float | None = Field(None, gt=0.0, description="Write a checkpoint every N minutes.")
    keep: int = Field(3, ge=1, le=1000, description="Newest checkpoints kept; the one with the lowest "
                      "validation loss so far is kept as well (so at most `keep` + 1), whatever the task's metric "
                      "and `keep_best` say.")
    keep_best: bool = Field(False, description="`final/` holds the model (weights and seed topology) of the "
                            "validation with the best task metric instead of the last step's; the summary names "
                            "that step and gives the last step's metrics too. The best model is kept in memory "
                            "and in checkpoints (which grow by one copy of the weights).")


class TelemetryConfig(Section):
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="Terminal output: `auto` shows a live display on a terminal, plain lines otherwise.")
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="Serve Prometheus metrics on this port during training (0 picks "
                                     "a free port, shown in the progress output and recorded in `run_start`).")
    metrics_bind: str = Field("127.0.0.1", min_length=1, description="Address the metrics endpoint binds to; "
                              "the default keeps it off the network.")
    pushgateway_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", description="Also push the metrics to "
                                        "this Prometheus Pushgateway (`http://HOST:PORT`) every `pushgateway_every_s` "
                                        "and when the run ends, so a short run's series outlive it. A push that "
                                        "fails is logged and never fails the run.")
    pushgateway_every_s: float = Field(15.0, gt=0.0, le=86_400.0, description="Seconds between pushes to "
                                       "`pushgateway_url` during the run.")
    pushgateway_job: str = Field("esper", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", max_length=64,
                                 description="Pushgateway job name; each process pushes under its own "
                                 "`instance` (host:pid), so concurrent runs never overwrite each other.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files under `<run dir>/tensorboard` "
                              "(loss, validation metrics, parameters, seeds per state; each lifecycle event as text). "
                              "Needs the `[tensorboard]` extra.")
    mlflow_uri: str | None = Field(None, min_length=1, description="Log the recipe as parameters, the run's "
                                   "metrics and, at the end, its artifacts to this MLflow tracking URI "
                                   "(`sqlite:///mlflow.db`, `http://HOST:PORT`, ...). A resume continues the same "
                                   "MLflow run. Needs the `[mlflow]` extra.")
    mlflow_experiment: str = Field("esper", min_length=1, max_length=200, description="MLflow experiment the run "
                                   "is logged under (created when missing).")
    anomaly_window: int = Field(20, ge=4, le=10_000, description="Logged losses (and kernel builds) the anomaly "
                                "detector's statistics are computed over.")
    anomaly_spike_z: float = Field(4.0, gt=0.0, description="A logged loss this many standard deviations above "
                                   "the window's mean is recorded as a `loss_spike` anomaly.")
    anomaly_stall_improvement: float = Field(0.01, ge=0.0, le=1.0, description="A `loss_stall`: for "
                                             "`anomaly_window` logged losses the loss level (mean of the last half "
                                             "window) has not gone this share below its best so far.")
    anomaly_compile_failure_rate: float = Field(0.5, gt=0.0, le=1.0, description="Share of failed kernel builds "
                                                "in the window that is a `compile_failures` anomaly.")
    anomaly_memory_growth: float = Field(0.5, gt=0.0, description="Growth of resident memory over its baseline "
                                         "(0.5 = +50%) that is a `memory_growth` anomaly.")


class StorageConfig(Section):
    workspace: str = Field(".esper", description="Directory for the kernel store and the local database, "
                           "relative to the current directory.")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the asset repository "
                                     "(default: SQLite in the workspace; env `ESPER_DATABASE_URL`).")
    redis_url: str | None = Field(None, description="Redis URL of the shared kernel cache "
                                  "(optional; env `ESPER_REDIS_URL`).")
    memory_bytes: int = Field(64 * 2**20, ge=0, le=2**40, description="Bytes of kernels the in-process LRU "
                              "tier keeps (0 turns it off).")
    redis_deadline_ms: int = Field(100, ge=1, le=60_000, description="Longest one Redis call may take; a "
                                   "slower or failed call is a miss there and the lookup goes on below.")
    database_deadline_ms: int = Field(1000, ge=1, le=600_000, description="Longest one database call may "
                                      "take; a slower or failed call is a miss there and the lookup goes on below.")
    breaker_failures: int = Field(3, ge=1, le=1000, description="Consecutive failures (errors or missed "
                                  "deadlines) after which a tier is skipped for `breaker_reset_s`.")
    breaker_reset_s: float = Field(30.0, gt=0.0, le=86_400.0, description="Seconds a failing tier is skipped "
                                   "before one trial call checks whether it is back.")
    artifacts_url: str | None = Field(None, pattern=r"^s3://[^/?]+", description="S3-compatible location "
                                      "`s3://BUCKET/PREFIX[?endpoint_url=URL]`: the final model, summary, exports, "
                                      "report and every committed checkpoint are uploaded under `PREFIX/<run name>/` "
                                      "after their local commit (needs the `[s3]` extra; credentials from the usual "
                                      "AWS environment variables). An unreachable store never fails the run: "
                                      "`esper sync RUN_DIR` uploads what is missing.")
    s3_endpoint_url: str | None = Field(None, description="Endpoint of an S3-compatible store (MinIO, Ceph, ...) "
                                        "when `artifacts_url` names none (default: env `AWS_ENDPOINT_URL`, else AWS).")
    artifacts_timeout_s: float = Field(3.0, gt=0.0, le=600.0, description="Longest one connect or read of the "
                                       "artifact store may take.")
    artifacts_attempts: int = Field(2, ge=1, le=10, description="Tries per upload before the store is reported "
                                    "unreachable (once) and skipped for `breaker_reset_s`.")


class DistributedConfig(Section):
    timeout_s: float = Field(1800.0, ge=1.0, le=604_800.0, description="Under torchrun (several ranks): seconds a "
                             "collective waits for a rank that does not arrive (stuck in its own code such as a data "
                             "factory, stopped, deadlocked) before every waiting rank names it and stops, exit 6. Keep "
                             "it above the longest work one rank does while the others wait: rank 0 compiling kernels "
                             "and writing checkpoints, the slowest node building its data. A rank whose process died "
                             "is noticed at once.")


class Recipe(Section):
    """A whole recipe. Every section is optional; omitted sections take their defaults."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and placement.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="The loss and the metric.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the samples come from.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The host network.")
    seeds: SeedsConfig = Field(default_factory=SeedsConfig, description="Which layers host seeds and how seeds live.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="When and where to grow.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Optimisation.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint cadence.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Progress and metrics.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Kernel store and asset repository.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Training on several ranks "
                                           "under torchrun (ignored in one process).")
