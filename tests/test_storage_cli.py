"""`esper inspect-cache`: tiers and entries, --json, --verify (exit 4 on corruption), --prune, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from esper_cli.inspect_cache import inspect_cache
from esper_core.compiler.artifact import MANIFEST, WEIGHTS, Kernel
from esper_core.recipe.schema import StorageConfig
from esper_core.storage import open_kernel_store

app = typer.Typer()
app.command("inspect-cache")(inspect_cache)
app.command("unused")(lambda: None)  # a second command keeps `inspect-cache` a subcommand, as in `esper`
NO_SERVICES = {"ESPER_REDIS_URL": "", "ESPER_DATABASE_URL": "", "ESPER_SIGNING_KEY": ""}


def run(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["inspect-cache", *map(str, args)], env={**NO_SERVICES, **(env or {})})


@pytest.fixture
def filled(tmp_path: Path, storage_kernels: list[Kernel]) -> Path:
    workspace = tmp_path / "ws"
    with open_kernel_store(StorageConfig(workspace=str(workspace)), env={}) as cache:
        for kernel in storage_kernels[:3]:
            cache.put(kernel)
        for _ in range(2):
            cache.memory.clear()
            cache.get(storage_kernels[0].address)
    return workspace


def test_reports_tiers_and_entries(filled: Path, storage_kernels: list[Kernel]) -> None:
    result = run("--workspace", filled, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tiers = {tier["name"]: tier for tier in report["tiers"]}
    assert list(tiers) == ["memory", "sql", "disk"] and all(t["reachable"] for t in tiers.values())
    assert tiers["disk"]["entries"] == tiers["sql"]["entries"] == 3
    assert tiers["sql"]["hits"] == 2 and tiers["memory"]["misses"] == 2 and tiers["sql"]["hit_rate"] == 1.0
    first = next(e for e in report["entries"] if e["address"] == storage_kernels[0].address)
    assert first["blueprint"] == "lowrank_adapter" and first["target"].startswith("linear 8->16")
    assert first["uses"] == 2 and first["tiers"] == ["sql", "disk"] and first["bytes"] > 10_000
    assert first["created"] <= first["last_used"]
    table = run("--workspace", filled)
    assert table.exit_code == 0 and "lowrank_adapter" in table.stdout and "Entries (3" in table.stdout


def test_unreachable_tier_is_reported_not_fatal(filled: Path) -> None:
    result = run("--workspace", filled, "--json", env={"ESPER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.output
    redis_tier = json.loads(result.stdout)["tiers"][1]
    assert redis_tier["name"] == "redis" and not redis_tier["reachable"] and "refused" in redis_tier["error"]


def test_passwords_in_urls_are_never_shown(filled: Path) -> None:
    """A password in a query parameter (accepted by libpq and redis-py) was printed as given."""
    env = {"ESPER_REDIS_URL": "redis://127.0.0.1:1/0?password=rdSECRET",
           "ESPER_DATABASE_URL": "postgresql://esper:pgSECRET@127.0.0.1:1/none?sslpassword=sslSECRET"}
    for args in (("--json",), ()):
        result = run("--workspace", filled, *args, env=env)
        assert "SECRET" not in result.output, result.output
        assert "password=***" in result.output and "esper:***@" in result.output


def test_verify_finds_corruption_and_exits_4(filled: Path, storage_kernels: list[Kernel]) -> None:
    assert run("--workspace", filled, "--verify").exit_code == 0
    address = storage_kernels[1].address
    weights = filled / "kernels" / address[:2] / address / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    result = run("--workspace", filled, "--verify", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["corrupt"] == [{"tier": "disk", "address": address, "reason":
                                                     "manifest.json: weights.safetensors does not match its "
                                                     "recorded sha256"}]
    assert f"error: disk tier: kernel {address}" in result.stderr and "Traceback" not in result.output


def test_a_kernel_file_replaced_by_a_fifo_or_a_device_link_is_a_bad_entry_not_a_hang(
        filled: Path, storage_kernels: list[Kernel]) -> None:
    """A FIFO in a kernel's directory blocked `inspect-cache --verify` (and the run's lookup) forever,
    and a link to /dev/zero would have been read until memory ran out."""
    fifo, linked = storage_kernels[0].address, storage_kernels[1].address
    (entry_dir(filled, fifo) / MANIFEST).unlink()
    os.mkfifo(entry_dir(filled, fifo) / MANIFEST)
    (entry_dir(filled, linked) / WEIGHTS).unlink()
    (entry_dir(filled, linked) / WEIGHTS).symlink_to("/dev/zero")
    result = inspect_in_subprocess(filled, "--verify")
    assert result.returncode == 4, result.stderr
    reasons = {c["address"]: c["reason"] for c in json.loads(result.stdout)["corrupt"] if c["tier"] == "disk"}
    assert reasons == {fifo: f"{MANIFEST}: is not a regular file (it is a FIFO)",
                       linked: f"{WEIGHTS}: cannot be read (a symbolic link)"}, reasons
    assert "Traceback" not in result.stderr
    (filled / "esper.db").unlink()  # entries the repository does not know are described from their manifest
    listed = inspect_in_subprocess(filled)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)["entries"]) == 3, listed.stderr


def inspect_in_subprocess(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`esper inspect-cache --json` in its own process: a hang fails the test instead of blocking the suite."""
    return subprocess.run([sys.executable, "-m", "esper_cli", "inspect-cache", "--workspace", str(workspace), "--json",
                           *args], capture_output=True, text=True, timeout=60, env={**os.environ, **NO_SERVICES})


def entry_dir(workspace: Path, address: str) -> Path:
    return workspace / "kernels" / address[:2] / address


def test_prune_by_size_and_age(filled: Path, storage_kernels: list[Kernel]) -> None:
    result = run("--workspace", filled, "--prune", "--max-bytes", 30_000, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    kept = {tier["name"]: tier for tier in report["tiers"]}
    assert kept["disk"]["bytes"] <= 30_000 and kept["sql"]["bytes"] <= 30_000 and kept["disk"]["entries"] == 2
    assert storage_kernels[0].address not in {p["address"] for p in report["pruned"]}  # the most used one stays
    assert run("--workspace", filled, "--prune", "--older-than", 30).exit_code == 0  # nothing that old
    gone = json.loads(run("--workspace", filled, "--prune", "--older-than", 0, "--json").stdout)
    assert {tier["name"]: tier["entries"] for tier in gone["tiers"]} == {"memory": None, "sql": 0, "disk": 0}


def test_a_missing_default_workspace_is_reported_without_creating_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A project that has not trained yet has no .esper: its (remote) tiers are still shown."""
    monkeypatch.chdir(tmp_path)
    result = run("--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tiers"][1]["error"] == "no database yet"
    assert not (tmp_path / ".esper").exists()


@pytest.mark.parametrize("verify", [[], ["--verify"]])
def test_a_workspace_that_is_missing_or_a_file_is_an_error_not_an_empty_cache(tmp_path: Path,
                                                                             verify: list[str]) -> None:
    """`--workspace` naming a regular file, or a path that does not exist (a typo), showed an empty
    cache, and with --verify said every entry was intact: exit 0 on a cache it never looked at."""
    afile = tmp_path / "afile"
    afile.write_text("not a workspace\n")
    for path, what in ((afile, "not a directory (a regular file)"), (tmp_path / "nowhere", "no such directory")):
        result = run("--workspace", path, *verify)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.stderr.startswith(f"error: command line: --workspace: {path}: {what}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "intact" not in result.output
    assert afile.read_text() == "not a workspace\n" and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args, message", [
    (["--prune"], "--prune needs --older-than DAYS or --max-bytes N"),
    (["--max-bytes", "5"], "only apply with --prune"),
])
def test_bad_options_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run("--workspace", tmp_path, *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_bad_database_url_is_a_clear_error(tmp_path: Path) -> None:
    result = run("--workspace", tmp_path, env={"ESPER_DATABASE_URL": "oracle://x@y/z"})
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: ESPER_DATABASE_URL: unsupported database 'oracle' "
                                     "(use sqlite or postgresql)")


@pytest.mark.parametrize("url, message", [
    ("redis://:pw@127.0.0.1:notaport/0", "redis://:***@127.0.0.1:notaport/0: the port must be a number from 0 to 65535"),
    ("redis://127.0.0.1:6379/abc", "redis://127.0.0.1:6379/abc: the database ('abc') must be a number"),
])
def test_a_malformed_redis_url_is_a_clear_error(url: str, message: str, tmp_path: Path) -> None:
    """A port that is not a number was a ValueError traceback; a database that is not a number was read
    as database 0 (another tenant's, perhaps)."""
    result = run("--workspace", tmp_path, env={"ESPER_REDIS_URL": url})
    assert result.exit_code == 2 and result.stderr.strip() == f"error: ESPER_REDIS_URL: {message}" \
        + ("" if "port" in message else ", as in redis://HOST:PORT/0"), result.output
