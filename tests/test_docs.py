"""The documentation stays true: the generated blueprint reference matches the IR and the library,
every relative link in the README and docs/ points at a file (and heading) that exists, and every
alert's runbook link lands on a section of docs/operations.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from esper_cli.main import COMMANDS
from esper_core.blueprints import reference

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines()
                if line.startswith("#") and not line.startswith("#!")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_blueprint_reference_is_up_to_date() -> None:
    assert reference.main(["--check"]) == 0, "run: python -m esper_core.blueprints.reference"


def test_blueprint_reference_check_detects_a_stale_file(tmp_path: Path) -> None:
    page = tmp_path / "blueprints.md"
    assert reference.main(["--check", "--output", str(page)]) == 1
    assert reference.main(["--output", str(page)]) == 0 and reference.main(["--check", "--output", str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("| 768 |", "| 769 |"), encoding="utf-8")
    assert reference.main(["--check", "--output", str(page)]) == 1


def test_the_reference_documents_every_op_and_builtin() -> None:
    from esper_core.blueprints.ir import OP_NAMES
    from esper_core.blueprints.library import BlueprintLibrary

    text = reference.render_reference()
    for name in OP_NAMES:
        assert f"`{name}`" in text.split("## The builtin library")[0], name
    for name in BlueprintLibrary.discover().names():
        assert f"### Builtin: {name}" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}"


def test_every_alert_links_to_a_runbook_section() -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "esper-alerts.yml").read_text(encoding="utf-8"))
    sections = anchors(REPO / "docs" / "operations.md")
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        (anchor,) = re.findall(r"docs/operations\.md#([\w-]+)", rule["annotations"]["description"])
        assert anchor in sections, (rule["alert"], anchor)


def test_the_readme_lists_every_command() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"`esper {name}" in readme, name


TARGETS_RECIPE = """\
run: {name: docs, seed: 0, device: cpu}
data: {source: digits, layout: flat, batch_size: 32}
model: {arch: mlp, widths: [16]}
seeds:
  targets: ["layers.*", "features.*"]
  blueprints: [lowrank_adapter]
trainer: {max_steps: 10}
telemetry: {progress: none}
"""


def test_troubleshooting_quotes_the_error_a_target_matching_nothing_gives(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The page quoted an older wording ("matches no Linear or Conv2d module (matchable: ...)"): a user who
    searched it for the line they got found nothing. Its quote, with ``...`` for the module list, is the line
    a recipe whose second target matches nothing gets."""
    from typer.testing import CliRunner

    from esper_cli.main import app

    page = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    (quoted,) = re.findall(r"\*\*`(error: recipe\.yaml:\d+: seeds\.targets\.1: [^`]*)`", page)
    expected = re.escape(" ".join(quoted.split())).replace(r"\.\.\.", ".+")
    expected = re.sub(r"recipe\\\.yaml:\d+", r"recipe\\.yaml:\\d+", expected)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(TARGETS_RECIPE, encoding="utf-8")
    result = CliRunner().invoke(app, ["train", "recipe.yaml", f"storage.workspace={tmp_path / 'ws'}"])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(expected, result.stderr.strip()), (quoted, result.stderr)


def test_the_readme_names_every_builtin_blueprint() -> None:
    """The README's list of the builtin library once lacked span_linear and span_conv."""
    from esper_core.blueprints.library import BlueprintLibrary

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = readme.split("- **Blueprints** (`seeds.blueprints`)", 1)[1].split("\n\n", 1)[0]
    for name in BlueprintLibrary.discover().names():
        assert f"`{name}`" in listed, name


def test_every_name_the_api_page_documents_is_importable_from_esper_core() -> None:
    """docs/api.md opens with "Everything below is importable from esper_core", and says its calls raise
    ``ConfigError`` and ``CheckpointError`` and return a ``StepOutcome``; those three were only in submodules,
    so ``except esper_core.CheckpointError`` (the natural way to catch what ``load_grown`` raises) failed with
    an AttributeError instead. Torch's schedulers, builtins and the Lightning names of their own dotted
    headings are the only names the page gives that live elsewhere."""
    import builtins

    import torch

    import esper_core
    from esper_core.errors import CheckpointError

    page = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    names = (set(re.findall(r"`([A-Z][A-Za-z]+)[(`]", page)) | set(re.findall(r"^### `([a-z_]+)\(", page, re.M))
             | set(re.findall(r"^### .*` / `([a-z_]+)\(", page, re.M)))
    lightning = {"Callback", "EsperGrowth"}  # under `esper_core.integrations.lightning.` headings, or Lightning's
    documented = {n for n in names - lightning
                  if not hasattr(builtins, n) and not hasattr(torch.optim.lr_scheduler, n)}
    assert {"ConfigError", "CheckpointError", "StepOutcome", "GrowthController", "load_checkpoint"} <= documented
    missing = sorted(n for n in documented if not hasattr(esper_core, n))
    assert not missing, missing
    assert esper_core.CheckpointError is CheckpointError


RECIPE_KEY = re.compile(r"(?<![\w./-])(?:run|task|data|model|seeds|policy|trainer|checkpoint|telemetry|storage)"
                        r"(?:\.\w+)+(?![\w(/-]|\.\w)")


def recipe_key_exists(path: list[str]) -> bool:
    """Whether a dotted recipe key (``trainer.early_stopping.patience``; a list index such as
    ``seeds.targets.1`` too) names a field of the recipe schema."""
    from esper_core.recipe import Recipe

    schema = Recipe.model_json_schema()

    def resolve(node: dict) -> dict:
        if "$ref" in node:
            return schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        for option in node.get("anyOf", []):
            if resolve(option).get("properties") or resolve(option).get("type") == "array":
                return resolve(option)
        return node

    node: dict = schema
    for part in path:
        node = resolve(node)
        if node.get("type") == "array" and part.isdigit():
            node = node.get("items", {})
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            return False
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_recipe_key_the_docs_name_exists(page: Path) -> None:
    """The README and the guides name recipe keys in prose (`policy.merit_ratio`, `trainer.early_stopping`); a key
    renamed in the schema leaves them pointing at a field a recipe would be refused for. File names such as
    `model.pt2` and calls such as `trainer.test(...)` are not keys."""
    named = {key for code in re.findall(r"`([^`]+)`", page.read_text(encoding="utf-8"))
             for key in RECIPE_KEY.findall(code) if not re.search(r"\.(md|pt2|onnx|safetensors|json|yaml)$", key)}
    unknown = sorted(key for key in named if not recipe_key_exists(key.split(".")))
    assert not unknown, unknown


def test_the_operations_page_lists_every_series_a_run_exports() -> None:
    """docs/operations.md's table of series is what an operator builds queries from; it lacked
    `esper_val_metric{metric}` (the task's validation metric, the only one a regression or language-model run
    fills). Every `esper_*` family of a run's registry is in the table under its exposed name, and the table
    names nothing a run does not export."""
    from esper_core.telemetry.metrics import RunMetrics

    page = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    table = page.split("| series | type | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(esper_\w+)", table))
    suffix = {"counter": "_total", "info": "_info"}
    exported = {family.name + suffix.get(family.type, "") for family in RunMetrics("test").registry.collect()
                if family.name.startswith("esper_")}
    assert listed == exported, (sorted(exported - listed), sorted(listed - exported))


def test_the_readmes_grown_model_snippet_runs_on_a_quickstart_run(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """"Using the grown model" follows the quickstart, but its snippet fed the exported program
    `torch.randn(5, 64)` (the digits MLP's input, from before mnist1d became the quickstart): the program's
    shape guard refused it. The block runs as written on a short quickstart run, exported with `esper export`, and
    so does docs/export.md's loading of a safetensors export into the zoo network."""
    import torch
    from typer.testing import CliRunner

    from esper_cli.main import app

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using the grown model", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0].replace("runs/NAME", "runs/quickstart")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    overrides = ["data.mnist1d.n_samples=300", "trainer.max_steps=6", "trainer.eval_every=3", "policy.max_seeds=0",
                 "telemetry.progress=none", f"storage.workspace={tmp_path / 'ws'}"]
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "recipes/quickstart.yaml", *overrides])
    assert trained.exit_code == 0, trained.output
    exported = runner.invoke(app, ["export", "runs/quickstart", "--format", "pt2"])
    assert exported.exit_code == 0, exported.output
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # the documented snippet itself
    assert namespace["logits"].shape == (5, 10)
    assert namespace["plain"](namespace["x"]).shape == (5, 10)

    # docs/export.md's safetensors loading, which once said `build_model(rebuild_model)`: a call that fails
    exported = runner.invoke(app, ["export", "runs/quickstart", "--format", "safetensors"])
    assert exported.exit_code == 0, exported.output
    page = (REPO / "docs" / "export.md").read_text(encoding="utf-8")
    (loading,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "rebuild_model" in b]
    namespace = {}
    exec(compile(loading, "export.md", "exec"), namespace)
    assert namespace["model"](torch.randn(3, 40)).shape == (3, 10)


def test_every_option_the_readmes_cli_table_names_exists() -> None:
    """The README's table of commands is where a user looks an option up; an option renamed or removed in a
    command would leave the table naming one that click refuses ("No such option"). Each row's options
    are options of its command (of each subcommand it names, for `esper blueprints`)."""
    from esper_cli.main import load_command

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## The CLI", 1)[1].split("Global options", 1)[0]
    checked = 0
    for row in table.splitlines():
        found = re.match(r"\| `esper ([\w-]+)", row)
        if not found:
            continue
        command = load_command(found.group(1))
        cell = re.split(r"(?<!\\)\|", row)[1]  # a `\|` inside the usage is not a column break
        for usage in re.findall(r"`(esper [^`]+)`", cell):
            each = command.commands[usage.split()[2]] if hasattr(command, "commands") else command  # a group
            options = {opt for param in each.params for opt in (*param.opts, *param.secondary_opts)}
            named = set(re.findall(r"--[a-z][a-z0-9-]*", usage))
            assert named <= options, (usage, sorted(named - options))
            checked += len(named)
    assert checked >= 20, checked
