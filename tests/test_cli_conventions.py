"""The conventions a command-line user expects of `esper`, checked on the installed console script:
``--version``, shell completion, a ``--help`` that does not import PyTorch, defaults in option help,
``-q``/``-v`` logging, ``NO_COLOR``, tables that never cut a word at 80 columns, ``esper blueprints``
and ``esper schema``. Every command here starts in well under a second except the ones that load the
blueprint library (which builds modules with PyTorch)."""

from __future__ import annotations

import importlib
import json
import os
import pty
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from esper_cli.main import COMMANDS, configure_logging, load_command
from test_cli import esper_command, subprocess_env

REPO = Path(__file__).resolve().parents[1]


def esper(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*esper_command(), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**subprocess_env(), **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)


def test_version_names_the_distribution() -> None:
    done = esper("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"esper-morph {metadata.version('esper-morph')}"


def test_help_and_version_import_neither_torch_nor_numpy() -> None:
    for args in (["--help"], ["--version"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "esper_cli", *args], capture_output=True,
                              text=True, timeout=60, env=subprocess_env())
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
        assert "esper_cli" in imported and not imported & {"torch", "numpy", "rich", "sqlalchemy", "pydantic_core"}, \
            sorted(imported & {"torch", "numpy", "rich", "sqlalchemy", "pydantic_core"})


def test_the_listed_help_of_each_command_is_its_own_docstring() -> None:
    done = esper("--help")
    assert done.returncode == 0
    for name, (_, _, short) in COMMANDS.items():
        command = load_command(name)
        assert (command.help or "").strip().splitlines()[0] == short, name
        assert re.search(rf"^  {re.escape(name)}\s", done.stdout, re.MULTILINE), name


def from_bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``esper ARGS`` typed in a bash: completion detects the shell from the parent process."""
    line = shlex.join([*esper_command(), *args]) + "; exit $?"  # a second command keeps bash the parent
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120,
                          env={**subprocess_env(), **(env or {})}, stdin=subprocess.DEVNULL)


def test_completion_script_is_generated_installed_and_completes(tmp_path: Path) -> None:
    shown = from_bash("--show-completion")
    assert shown.returncode == 0 and "_ESPER_COMPLETE=complete_bash" in shown.stdout, shown.stderr
    installed = from_bash("--install-completion", env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert installed.returncode == 0, installed.stderr
    script = next((tmp_path / ".bash_completions").glob("esper*"))
    assert "_ESPER_COMPLETE=complete_bash" in script.read_text(encoding="utf-8")
    assert str(script) in (tmp_path / ".bashrc").read_text(encoding="utf-8")

    def complete(words: str) -> list[str]:
        done = esper(env={"_ESPER_COMPLETE": "complete_bash", "COMP_WORDS": words,
                          "COMP_CWORD": str(len(words.split()) - 1)})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("esper re") == ["resume", "report"]
    assert complete("esper blueprints s") == ["show"]
    assert complete("esper report --loss") == ["--loss-scale"]


def _help(*args: str) -> str:
    """A command's help with its line wrapping undone."""
    return " ".join(esper(*args, "--help").stdout.split())


def test_option_help_shows_defaults() -> None:
    report = _help("report")
    assert "[default: RUN/report; for two runs RUN/report/vs-NAME_B]" in report
    assert "[default: md,html,json]" in report and "[default: log]" in report
    show = _help("blueprints", "show")
    assert "[default: 8; x>=1]" in show and "[default: 64 for linear, 16 for conv1d and conv2d]" in show
    assert "[default: print it on stdout]" in _help("schema")
    assert "(default .esper)" in _help("inspect-cache")


def test_quiet_and_verbose_set_the_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    log = logging.getLogger("esper_core.storage.guard")
    try:
        for (quiet, verbose), level in {(True, 0): logging.ERROR, (False, 0): logging.WARNING,
                                        (False, 1): logging.INFO, (False, 2): logging.DEBUG}.items():
            assert configure_logging(quiet, verbose) == level
            for emitted in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
                log.log(emitted, "probe %s", logging.getLevelName(emitted))
            err = capsys.readouterr().err
            shown = {name for name in ("DEBUG", "INFO", "WARNING", "ERROR") if f"probe {name}" in err}
            assert shown == {n for n in ("DEBUG", "INFO", "WARNING", "ERROR") if logging.getLevelName(n) >= level}
            assert "WARNING esper_core.storage.guard: probe WARNING" in err or level > logging.WARNING
    finally:
        configure_logging(False, 0)
    # The command line wires the flags in: -vv logs the version line at DEBUG, the default does not.
    debug = esper("-vv", "blueprints", "list", "--json")
    assert debug.returncode == 0 and re.search(r"^DEBUG esper_cli.main: esper-morph \S+ on Python", debug.stderr, re.M)
    assert esper("blueprints", "list", "--json").stderr == ""
    clash = esper("-q", "-v", "blueprints", "list")
    assert clash.returncode == 2 and "choose one of --quiet and --verbose" in clash.stderr


@pytest.mark.parametrize("args", [
    ["compile", "--rank", "-1", "lowrank.yaml"], ["compile", "--rank", "two", "lowrank.yaml"],
    ["compile", "--max-flops", "-1", "lowrank.yaml"], ["export", "runs/x", "--samples", "0"],
    ["export", "runs/x", "--tolerance", "-0.5"], ["inspect-cache", "--prune", "--max-bytes", "-5"],
    ["inspect-cache", "--prune", "--older-than", "nan"], ["blueprints", "show", "lowrank_adapter", "--rank", "0"],
    ["train", "no-such-recipe.yaml", "--nproc-per-node", "2", "--node-rank", "-1"],
    ["train", "no-such-recipe.yaml", "--nproc-per-node", "0"], ["resume", "--checkpoint", "runs/x", "--nproc-per-node", "-2"],
], ids=" ".join)
def test_a_refused_option_value_is_one_error_line_and_exit_2(args: list[str]) -> None:
    # In-process: the parser refuses these before a command runs, and each would import torch in a subprocess.
    from typer.testing import CliRunner

    from esper_cli.main import app

    done = CliRunner().invoke(app, args)
    option = next(arg for arg in reversed(args) if arg.startswith("--"))
    assert done.exit_code == 2, done.output
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stdout == "", done.output
    assert done.stderr.startswith(f"error: command line: {option}: "), done.stderr


def _on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run `esper ARGS` with a pseudo-terminal as stdout (so rich may use colour) and return its output."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([*esper_command(), *args], stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                               env={k: v for k, v in {**subprocess_env(), **env}.items() if v is not None})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(leader)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_no_color_is_respected_on_a_terminal(tmp_path: Path) -> None:
    colour = re.compile(r"\x1b\[[0-9;]*(3[0-8]|9[0-7])[0-9;]*m")  # foreground colour codes
    # A Redis tier that is down: its status is printed in red, the reachable tiers in green.
    base = {"TERM": "xterm-256color", "COLUMNS": "120", "ESPER_REDIS_URL": "redis://127.0.0.1:9/0"}
    args = ["inspect-cache", "--workspace", str(tmp_path)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at once: each spends seconds importing torch
        coloured_run = pool.submit(_on_a_terminal, args, {**base, "NO_COLOR": None})
        plain = _on_a_terminal(args, {**base, "NO_COLOR": "1"})
        coloured = coloured_run.result()
    assert colour.search(coloured), "rich printed no colour on a terminal: the check would prove nothing"
    assert "unreachable" in plain and "\x1b[" in plain and not colour.search(plain)  # styles stay, colour goes


def _words(values: list[str]) -> set[str]:
    return {word for value in values for word in str(value).split() if len(word) > 1}


def _assert_fits_80(text: str, values: list[str]) -> None:
    """Table lines fit 80 columns and no expected word is cut; other lines (a YAML file, a path) are
    printed whole for the terminal to wrap."""
    lines = [line for line in text.splitlines() if set(line) & set("│┃┏┗└┡┌╇╋━─")] or text.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    cut = [word for word in _words(values) if word not in text]
    assert not cut, f"cut or folded: {cut}\n{text}"
    assert "…" not in text


def test_tables_never_cut_a_word_at_80_columns(tmp_path: Path) -> None:
    env = {"COLUMNS": "80", "ESPER_REDIS_URL": "redis://127.0.0.1:9/0"}
    workspace = tmp_path / "a-workspace-with-a-rather-long-directory-name" / "and-another-level"
    workspace.mkdir(parents=True)  # a named workspace that does not exist is an error (exit 2), not a table
    commands = {"listed": (["blueprints", "list"], env), "rows": (["blueprints", "list", "--json"], {}),
                "shown": (["blueprints", "show", "residual_conv"], env),
                "example": (["blueprints", "show", "residual_conv", "--json"], {}),
                "cache": (["inspect-cache", "--workspace", workspace], env),
                "cache_json": (["inspect-cache", "--workspace", workspace, "--json"], env),
                "help": (["--help"], env)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(esper, *args, env=extra) for name, (args, extra) in commands.items()}
        out = {name: future.result().stdout for name, future in futures.items()}
    rows = json.loads(out["rows"])
    _assert_fits_80(out["listed"], [r["name"] for r in rows] + [r["description"] for r in rows])
    example = json.loads(out["example"])["example"]
    _assert_fits_80(out["shown"], [op["op"] for op in example["ops"]] + [f"{example['params']:,}"])
    report = json.loads(out["cache_json"])
    _assert_fits_80(out["cache"], [t["name"] for t in report["tiers"]] + [t.get("error") or "" for t in report["tiers"]])
    assert all(t["where"] in out["cache"] for t in report["tiers"])  # on lines of their own, never cut
    _assert_fits_80(out["help"], list(COMMANDS))


def test_blueprints_show_resolves_the_example_host() -> None:
    data = json.loads(esper("blueprints", "show", "wide_mlp", "--in", "10", "--out", "3", "--rank", "2",
                            "--json").stdout)
    example = data["example"]
    assert example["host_label"] == "Linear(10, 3)" and example["dims"]["hidden"] == 8
    assert [(op["op"], op["in"], op["out"]) for op in example["ops"]] == [("linear", 10, 8), ("relu", None, None),
                                                                         ("linear", 8, 3)]
    assert example["params"] == (10 * 8 + 8) + (8 * 3 + 3)
    assert "name: wide_mlp" in data["yaml"] and data["ir"]["host"] == "linear"
    text = esper("blueprints", "show", "wide_mlp", env={"COLUMNS": "120"}).stdout
    assert "hidden: 4 * rank" in text and "dims: in = 64, out = 32, rank = 8, hidden = 32" in text
    unknown = esper("blueprints", "show", "no_such")
    assert unknown.returncode == 2 and "unknown blueprint 'no_such'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_schema_is_the_recipe_models_json_schema(tmp_path: Path) -> None:
    import jsonschema

    out = tmp_path / "recipe.schema.json"
    done = esper("schema", "--out", out)
    assert done.returncode == 0 and done.stdout.strip() == f"wrote {out}"
    schema = json.loads(out.read_text(encoding="utf-8"))
    assert json.loads(esper("schema").stdout) == schema
    from esper_core.recipe.schema import Recipe

    assert set(schema["properties"]) == set(Recipe.model_fields)
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    quickstart = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    assert list(validator.iter_errors(quickstart)) == []
    bad = quickstart | {"trainer": {**quickstart.get("trainer", {}), "max_stepz": 3}}
    assert any("max_stepz" in error.message for error in validator.iter_errors(bad))
    missing = esper("schema", "--out", tmp_path / "no" / "such" / "dir.json")
    assert missing.returncode == 2 and "--out: cannot write the schema" in missing.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_module_imports_on_its_own(name: str) -> None:
    importlib.import_module(COMMANDS[name][0])
