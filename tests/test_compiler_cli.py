"""`esper compile`: summary table, JSON report, --check, exit codes, recipes as targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from esper_cli.compile import compile_
from esper_core.blueprints.library import BUILTIN_DIR
from esper_core.compiler.store import LocalKernelStore

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer()
app.command("compile")(compile_)
app.command("unused")(lambda: None)  # a second command keeps `compile` a subcommand, as in `esper`


def run(*args: str):
    return CliRunner().invoke(app, ["compile", *map(str, args)])


def test_compiles_stores_and_prints_a_table(tmp_path: Path) -> None:
    store = tmp_path / "kernels"
    result = run(BUILTIN_DIR / "lowrank_adapter.yaml", BUILTIN_DIR / "dwsep_conv.yaml", "--linear", "16:8",
                 "--store", store)
    assert result.exit_code == 0, result.output
    assert "lowrank_adapter" in result.stdout and "1 compiled" in result.stdout and "skipped" in result.stdout
    assert len(list(LocalKernelStore(store))) == 1
    again = run(BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "16:8", "--store", store)
    assert again.exit_code == 0 and "1 cached" in again.stdout


def test_json_report_and_check_mode(tmp_path: Path) -> None:
    result = run(BUILTIN_DIR / "wide_mlp.yaml", "--linear", "16:8", "--linear", "8:8", "--rank", "2", "--check",
                 "--json", "--store", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["check"] and report["store"] is None and report["counts"]["checked"] == 2
    (blueprint,) = report["blueprints"]
    kernel = blueprint["kernels"][0]
    assert kernel["status"] == "checked" and kernel["target"]["rank"] == 2 and len(kernel["address"]) == 64
    assert kernel["params"] == 16 * 8 + 8 + 8 * 8 + 8 and kernel["flops_forward"] > 0 and kernel["latency_ms"] > 0
    assert all(entry["passed"] for entry in kernel["validation"].values())
    assert not any(tmp_path.iterdir())  # --check writes nothing


def test_failures_exit_1_with_one_located_message_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nhost: linear\nops:\n  - {op: linear, in: in, out: rank}\n"
                   "  - {op: linear, in: rank, out: out}\n")
    worse = tmp_path / "worse.yaml"
    worse.write_text("name: worse\nhost: linear\nops:\n  - {op: linear, in: in, out: out}\n")
    result = run(bad, worse, BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "8:4", "--json", "--store",
                 tmp_path / "kernels")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {bad}:5: ops.1.init: ") and "zero_at_init" in errors[0]
    report = json.loads(result.stdout)
    assert not report["ok"] and report["exit_code"] == 1 and report["counts"] == {
        "compiled": 1, "cached": 0, "checked": 0, "failed": 2}
    problems = {b["name"] or b["file"]: b["problems"] for b in report["blueprints"]}
    assert problems["bad"][0]["line"] == 5 and problems["bad"][0]["field"] == "ops.1.init"
    assert problems["lowrank_adapter"] == []


def test_blueprints_that_do_not_load_exit_2_and_count_as_failed(tmp_path: Path) -> None:
    """Issue 11 item 16: a schema error or a missing file is invalid input (exit 2), the other blueprints
    are still compiled, and the JSON counts every blueprint that did not load as failed."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nhost: linear\nops:\n  - {op: fancy}\n")
    missing = tmp_path / "missing.yaml"
    result = run(broken, missing, BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "8:4", "--json", "--store",
                 tmp_path / "kernels")
    assert result.exit_code == 2, result.output
    assert f"error: {broken}:4: ops.0.op: unknown op 'fancy'" in result.stderr
    assert f"error: {missing}: file not found" in result.stderr
    assert "Traceback" not in result.output
    report = json.loads(result.stdout)
    assert report["exit_code"] == 2 and report["counts"] == {"compiled": 1, "cached": 0, "checked": 0, "failed": 2}


def test_dimension_expressions_no_host_could_resolve_are_invalid_input(tmp_path: Path) -> None:
    """An unknown dimension name or unsupported syntax is a defect of the file whatever the host: exit
    2 like any blueprint that does not validate (it was exit 1, a failed compile), located at the field."""
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: unknown\nhost: linear\nops:\n  - {op: linear, in: in, out: hidden}\n"
                       "  - {op: linear, in: hidden, out: out, init: zeros}\n")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("name: syntax\nhost: linear\ndims:\n  hidden: rank ** 2\nops:\n"
                      "  - {op: linear, in: in, out: hidden}\n  - {op: linear, in: hidden, out: out, init: zeros}\n")
    result = run(unknown, syntax, "--linear", "16:8", "--check")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {unknown}:4: ops.0.out: unknown dimension 'hidden' in 'hidden' (known: in, out, rank)",
        f"error: {unknown}:5: ops.1.in: unknown dimension 'hidden' in 'hidden' (known: in, out, rank)",
        f"error: {syntax}:4: dims.hidden: unsupported syntax in 'rank ** 2': only integers, names, + - * //, "
        "min() and max() are allowed"]


def test_an_op_the_host_kind_does_not_allow_is_invalid_input(tmp_path: Path) -> None:
    """A conv2d op in a `host: linear` blueprint fails on every target: it was exit 1 (a failed compile,
    once per target), and with no target of its kind it was not reported at all."""
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: wrong\nhost: linear\nops:\n  - {op: conv2d, in: in, out: out, init: zeros}\n")
    result = run(wrong, "--linear", "16:8", "--linear", "8:4", "--check")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {wrong}:4: ops.0.op: op 'conv2d' cannot be used on a linear host "
                      "(allowed: dropout, gelu, linear, relu, sigmoid, silu, tanh)"]


def test_a_conv1d_blueprint_checks_against_a_conv1d_target_from_the_command_line(tmp_path: Path) -> None:
    """There was no --conv1d: a Conv1d blueprint could be checked only with --for a recipe, and --check
    without one said to give a target of its kind, which no option could express."""
    result = run(BUILTIN_DIR / "residual_conv1d.yaml", "--conv1d", "8:16:5:2:2:40", "--conv1d", "4:4:3:1:1",
                 "--check", "--json")
    assert result.exit_code == 0, result.output
    (blueprint,) = json.loads(result.stdout)["blueprints"]
    assert [k["target_label"] for k in blueprint["kernels"]] == ["conv1d 8->16 k5 s2 p2 d1 @ 8x40 rank 8",
                                                                 "conv1d 4->4 k3 s1 p1 d1 @ 4x16 rank 8"]
    assert all(k["status"] == "checked" for k in blueprint["kernels"])
    bad = run(BUILTIN_DIR / "residual_conv1d.yaml", "--conv1d", "8:16:5", "--check")
    assert bad.exit_code == 2
    assert "--conv1d: '8:16:5' is not IN:OUT:KERNEL:STRIDE:PADDING[:LENGTH]" in bad.stderr


def test_check_fails_for_a_blueprint_with_no_target_of_its_kind_unless_skips_are_allowed(tmp_path: Path) -> None:
    """Issue 11 item 16: `--check` that checked nothing for a blueprint is not a pass."""
    result = run(BUILTIN_DIR / "se_gate.yaml", BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "8:4", "--check")
    assert result.exit_code == 2, result.output
    assert f"error: {BUILTIN_DIR / 'se_gate.yaml'}: no conv2d target: --check checked nothing" in result.stderr
    report = json.loads(run(BUILTIN_DIR / "se_gate.yaml", BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "8:4",
                            "--check", "--json").stdout)
    assert [(b["name"], b["ok"]) for b in report["blueprints"]] == [("se_gate", False), ("lowrank_adapter", True)]
    allowed = run(BUILTIN_DIR / "se_gate.yaml", BUILTIN_DIR / "lowrank_adapter.yaml", "--linear", "8:4", "--check",
                  "--allow-skip")
    assert allowed.exit_code == 0, allowed.output
    stored = run(BUILTIN_DIR / "se_gate.yaml", "--linear", "8:4", "--store", tmp_path)  # warming a store: fine
    assert stored.exit_code == 0, stored.output


def test_no_factories_refuses_a_factory_recipe_before_importing_it(tmp_path: Path) -> None:
    """Issue 11 item 17: `--no-factories` (or ESPER_ALLOW_FACTORIES=0) refuses the recipe, exit 2."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "def make(**kwargs):\n    raise SystemExit(99)\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {source: factory, factory: 'evil_factory:make'}\nrun: {device: cpu}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = run(BUILTIN_DIR / "lowrank_adapter.yaml", "--for", recipe, "--check", "--no-factories")
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 2, result.output
    assert f"error: {recipe}:1: data.factory: names user code ('evil_factory:make')" in result.stderr
    assert not marker.exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    nothing = run(BUILTIN_DIR / "lowrank_adapter.yaml")
    assert nothing.exit_code == 2 and "nothing to compile" in nothing.stderr
    malformed = run(BUILTIN_DIR / "lowrank_adapter.yaml", "--conv2d", "3:3")
    assert malformed.exit_code == 2 and "--conv2d" in malformed.stderr


def test_budget_from_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {source: wine}\nmodel: {widths: [16]}\nseeds: {rank: 4}\n"
                      "policy: {max_added_params: 100}\nrun: {device: cpu}\n")
    result = run(BUILTIN_DIR / "lowrank_adapter.yaml", "--for", recipe, "--check")
    assert result.exit_code == 1
    assert "budget.params" in result.stderr and "policy.max_added_params" in result.stderr


def test_ci_command_on_the_digits_cnn_recipe() -> None:
    blueprints = sorted(BUILTIN_DIR.glob("*.yaml"))
    assert len(blueprints) == 8  # every shipped blueprint: the Conv2d ones checked, the others skipped
    result = run(*blueprints, "--for", REPO / "recipes" / "digits-cnn.yaml", "--device", "cpu", "--check", "--json",
                 "--allow-skip")  # the digits CNN wraps only Conv2d layers: the Linear blueprints are skipped
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    kinds = {b["name"]: b["skipped"] for b in report["blueprints"]}
    assert report["counts"]["checked"] >= 1 and len(kinds) == len(blueprints)
