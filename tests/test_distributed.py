"""Training under torchrun (gloo, two processes on the CPU): the ranks grow identically, match one
process with the same global batch, resume bit-exactly after a rank is killed, and refuse a resume
with another world size."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from esper_cli.progress import describe
from esper_core.checkpoints import store
from esper_core.distributed import PeerLost
from esper_core.distributed.launch import relayed
from esper_core.training.loaders import TrainBatches
from esper_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
run: {name: dd, seed: 3, device: cpu}
data: {source: digits, layout: flat, batch_size: 16}
model: {arch: mlp, widths: [16]}
seeds: {targets: ["type:Linear"], exclude: [head], per_layer: 1, blueprints: [wide_mlp],
        incubation_steps: 8, blend_steps: 8, probation_steps: 4, fossilize_margin: -1.0}
policy: {trigger: periodic, period_steps: 10, growth_window: [0.1, 0.6], max_seeds: 2}
trainer: {max_steps: 60, lr: 0.01, eval_every: 10, log_every: 5}
checkpoint: {every_steps: 20}
telemetry: {progress: none}
"""
"""A run that grows one seed on its hidden layer at step 10 and keeps it (periodic trigger, one
target, one blueprint): every decision is the same for any split of the global batch."""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]


def _esper(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper_cli", *args]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


_VOLATILE = {"time", "prev", "seq", "run_id", "seconds", "elapsed_s", "wall_time_s", "kernel_wait_s", "artifacts",
             "recipe_sha256", "run_dir"}  # times, ids, chain links; the two runs differ in run.output_dir


def _comparable(run_dir: Path) -> list[dict]:
    """The run's events without what differs between any two runs (times, ids, chain links) and without
    the segment boundaries a resume adds."""
    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE}
        return value
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [strip(e) for e in events if e["event"] not in ("run_start", "run_resume", "kernels_ready", "checkpoint")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run in a fresh workspace, with what each rank held at the end
    (``rank0``/``rank1`` files)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "recipe.yaml").write_text(RECIPE)
    result = subprocess.run(_torchrun(str(ROOT / "tests/distributed_worker.py"), str(root / "recipe.yaml"), str(root),
                                      f"run.output_dir={root / 'runs'}", f"storage.workspace={root / 'ws'}",
                                      "telemetry.metrics_port=0"),
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_after_growth_every_rank_holds_the_same_model_and_topology(two_ranks: Path) -> None:
    a, b = load_file(str(two_ranks / "rank0.safetensors")), load_file(str(two_ranks / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(".seeds." in k for k in a), sorted(a)  # a seed grew
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ranks = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["topology"] == ranks[1]["topology"]
    assert ranks[0]["rebuilds"] >= 2  # DDP built once, rebuilt when the seed started incubating
    # in the fresh workspace rank 0 compiled the kernels; rank 1 found them in the shared store
    assert ranks[0]["compiled_here"] > 0 and ranks[1]["compiled_here"] == 0, ranks
    run = two_ranks / "runs" / "dd"
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("run_start") == 1 and "germinate" in events and "fossilize" in events  # rank 0 alone wrote
    # ... and rank 1 wrote nothing into the runs directory (it shares only the workspace, the kernel cache)
    assert any(path.startswith(str(run)) for path in ranks[0]["wrote"]), ranks[0]["wrote"]
    assert not [path for path in ranks[1]["wrote"] if path.startswith(str(two_ranks / "runs"))], ranks[1]["wrote"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_final"] > summary["params_initial"]


def test_with_metrics_port_0_every_rank_s_endpoint_is_recorded_and_shown(two_ranks: Path) -> None:
    """Port 0 picks a free port on each rank; only rank 0's was recorded and printed, so nobody could
    find rank 1's endpoint. Rank 0 now gathers them all."""
    start = json.loads((two_ranks / "runs" / "dd" / "events.jsonl").read_text().splitlines()[0])
    urls = start["metrics_urls"]
    assert len(urls) == 2 and urls[0] == start["metrics_url"] and len(set(urls)) == 2, urls
    shown = describe({"event": "metrics_endpoint", "url": urls[0], "ranks": urls})
    assert shown == f"metrics: rank 0 {urls[0]}, rank 1 {urls[1]}"


def test_two_ranks_train_as_one_process_with_the_same_global_batch(two_ranks: Path, tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    single = Trainer.from_recipe(tmp_path / "recipe.yaml", [f"run.output_dir={tmp_path}", "data.batch_size=32"])
    summary = single.fit()
    ddp, one = _losses(two_ranks / "runs" / "dd"), _losses(Path(summary["run_dir"]))
    assert [s for s, _ in ddp] == [s for s, _ in one] and len(ddp) == 12
    for (step, a), (_, b) in zip(ddp, one):
        assert a == pytest.approx(b, rel=1e-5), step
    ddp_summary = json.loads((two_ranks / "runs" / "dd" / "summary.json").read_text())
    assert ddp_summary["val_accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-9)
    assert ddp_summary["seeds"] == summary["seeds"]


def _worker_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the workers the launcher process started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher:
            ranks = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0])] = int(entry.name)
    return found


def test_kill_nine_of_one_rank_then_resume_is_bit_exact(two_ranks: Path, tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = tmp_path / "runs"
    launcher = subprocess.Popen(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                       f"run.output_dir={out}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    marker = out / "dd" / "checkpoints" / store.checkpoint_name(20)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:] if launcher.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = _worker_pids(launcher.pid)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0
    run = out / "dd"
    assert not (run / "final").exists(), "the kill came too late to interrupt the run"

    resumed = subprocess.run(_esper("resume", "--checkpoint", str(run), "--nproc-per-node", "2"),
                             capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = two_ranks / "runs" / "dd"
    assert (run / "final/model.safetensors").read_bytes() == (reference / "final/model.safetensors").read_bytes()
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert _comparable(run) == _comparable(reference)


def test_resuming_with_another_world_size_is_refused_with_exit_3(two_ranks: Path) -> None:
    result = subprocess.run(_esper("resume", "--checkpoint", str(two_ranks / "runs" / "dd")),
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 3, result.stderr
    assert "checkpointed by 2 rank(s) and this resume has 1" in result.stderr and "Traceback" not in result.stderr


def test_the_ranks_batches_together_are_the_one_process_batch() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(100).float().unsqueeze(1))
    one = TrainBatches(data, 20, seed=5)
    ranks = [TrainBatches(data, 10, seed=5, rank=r, world=2) for r in (0, 1)]
    for _ in range(12):  # across two epoch boundaries (5 global batches per epoch)
        whole = one.next()[0]
        assert torch.equal(torch.cat([r.next()[0] for r in ranks]), whole)
    assert {tuple(r.position().items()) for r in ranks} == {tuple(one.position().items())}


def test_distributed_benchmark_smoke_runs_both_models_and_ends_with_the_key_figure(tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("distributed min ratio ") and "scaling_cnn" in last and "scaling_lm" in last, last
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["config"] for r in report["results"]] == ["cnn", "lm"] and report["nproc"] == 2
    for result in report["results"]:
        assert result["world_size"] == 2 and all(v > 0 for v in result["median"].values())
        assert result["ratio"] == result["median"]["esper"] / result["median"]["plain"]
        assert result["scaling"] == result["median"]["plain"] / result["plain_single_steps_per_s"]
        assert result["ddp_rebuild_s"] is not None  # a seed grew, so DDP was rebuilt at least once


def test_ranks_stay_identical_with_bf16_autocast_and_torch_compile(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = subprocess.run(_torchrun(str(ROOT / "tests/distributed_worker.py"), str(tmp_path / "recipe.yaml"),
                                      str(tmp_path), f"run.output_dir={tmp_path / 'runs'}", "trainer.precision=bf16",
                                      "trainer.compile=default", "trainer.max_steps=30", "checkpoint.every_steps=null"),
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and any(".seeds." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the same seeds and DDP rebuilds; only rank 0 compiles kernels, so compiled_here differs by design
    assert [(h["topology"], h["rebuilds"]) for h in held] == [(held[0]["topology"], held[0]["rebuilds"])] * 2


def _train_until_a_checkpoint(tmp_path: Path, recipe: str, within_s: float,
                              *overrides: str) -> tuple[subprocess.Popen[str], Path]:
    """`esper train --nproc-per-node 2` of ``recipe`` in the background, once its step-20 checkpoint exists;
    returns the launcher (stderr piped) and the runs directory."""
    (tmp_path / "recipe.yaml").write_text(recipe)
    out = tmp_path / "runs"
    launcher = subprocess.Popen(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                       f"run.output_dir={out}", *overrides),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    marker = out / "dd" / "checkpoints" / store.checkpoint_name(20)
    deadline = time.monotonic() + within_s
    while not marker.exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return launcher, out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_the_launcher_stops_every_rank_with_a_checkpoint_and_exit_128_plus_n(tmp_path: Path,
                                                                                      signum: int) -> None:
    """Ctrl-C or SIGTERM to `esper train --nproc-per-node 2` was torch-elastic's SignalException
    traceback and exit 1, although the ranks had written their checkpoint."""
    launcher, out = _train_until_a_checkpoint(tmp_path, RECIPE.replace("max_steps: 60", "max_steps: 100000"), 120)
    launcher.send_signal(signum)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and f"{signal.Signals(signum).name} received" in err
    # only Esper's lines: torch-elastic's "W1202 ... api.py:753] Received 2 death signal, shutting down workers" is not one
    assert all(line.startswith("error: ") for line in err.splitlines()), err
    events = [json.loads(line) for line in (out / "dd" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == signal.Signals(signum).name


def test_kill_nine_of_one_rank_ends_with_one_line_naming_it_and_exit_137(tmp_path: Path) -> None:
    """The surviving rank's next collective failed inside gloo: a RuntimeError traceback from DDP's
    backward, then torch-elastic's own error line. Now the survivor says in one line that it lost
    contact (and how to resume), and the launcher's last line names the rank that died, exit 128 + 9.
    A static run (max_seeds 0): nothing to compile, so the two ranks are training within seconds."""
    recipe = RECIPE.replace("max_steps: 60", "max_steps: 100000").replace("max_seeds: 2", "max_seeds: 0")
    launcher, out = _train_until_a_checkpoint(tmp_path, recipe, 60, f"storage.workspace={tmp_path / 'ws'}")
    workers = _worker_pids(launcher.pid)
    os.kill(workers[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "Traceback" not in err and "gloo" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: distributed: rank 1 (pid {workers[1]}) was killed by SIGKILL"), err
    # rank 0's own line, unless the launcher's SIGTERM ended it first (after it had closed everything)
    survivor = "error: distributed: rank 0 lost contact with another rank ("
    assert all(line.startswith(survivor) and f"esper resume --checkpoint {out / 'dd'} --nproc-per-node 2" in line
               for line in lines[:-1]), err


_RANKED_DATA = """\
import os

import torch


def make():
    \"\"\"Different samples on every rank: the generator is seeded from RANK.\"\"\"
    generator = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    x = torch.randn(300, 8, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
"""


def test_data_that_differs_between_ranks_is_refused_once_naming_the_factory(tmp_path: Path) -> None:
    """A data factory that is not the same on every rank trained silently on a mixture no process
    sees (DDP kept the replicas identical, so no digest noticed); now the ranks compare a digest of
    their data first and stop with one located line, exit 2 (not one copy per rank)."""
    (tmp_path / "ranked_data.py").write_text(_RANKED_DATA)
    recipe = RECIPE.replace("data: {source: digits, layout: flat,", 'data: {source: factory, factory: "ranked_data:make",')
    (tmp_path / "recipe.yaml").write_text(recipe)
    result = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                   f"run.output_dir={tmp_path / 'runs'}", "policy.max_seeds=0"),
                            capture_output=True, text=True, timeout=120,
                            env={**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'recipe.yaml'}:2: data.factory: the data differs between ranks (rank 1 "
                      "differs from rank 0): a factory must return the same samples on every rank, so seed any "
                      "randomness it uses from its arguments, never from the time, the process or RANK"], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def _listening_after_a_free_port() -> socket.socket:
    """A socket listening on a port P of 127.0.0.1 whose predecessor P - 1 is free (when this returns)."""
    for _ in range(100):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", taken.getsockname()[1] - 1))
            except OSError:
                taken.close()
                continue
        taken.listen()
        return taken
    raise AssertionError("no free pair of ports")


def test_a_metrics_port_taken_on_rank_1_is_named_first_and_once(tmp_path: Path) -> None:
    """Rank 1 serves on telemetry.metrics_port + 1: when that port was taken, its error said port P + 1
    without saying why, and came after rank 0's 'lost contact' line (its consequence)."""
    taken = _listening_after_a_free_port()
    port = taken.getsockname()[1]
    with taken:
        (tmp_path / "recipe.yaml").write_text(RECIPE)
        result = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                       f"run.output_dir={tmp_path / 'runs'}", "policy.max_seeds=0",
                                       f"telemetry.metrics_port={port - 1}"),
                                capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].endswith(f"cannot serve metrics on 127.0.0.1:{port} (telemetry.metrics_port + 1: each rank of a "
                              "node serves on its own port, the port plus its LOCAL_RANK): Address already in use"), errors
    assert all("lost contact" in line for line in errors[1:]) and "Traceback" not in result.stderr, result.stderr


def test_the_launcher_shows_each_rank_error_once_the_cause_before_its_consequences(tmp_path: Path) -> None:
    """What `esper --nproc-per-node` prints of the lines its workers left (:func:`relayed`): the same
    recipe error from every rank once, and a rank's own failure before the other ranks' 'lost contact'."""
    (tmp_path / "rank-0").write_text(f"{PeerLost.exit_code} consequence\nerror: distributed: rank 0 lost contact\n")
    (tmp_path / "rank-1").write_text("2\nerror: recipe.yaml:1: run.device: no CUDA\n")
    (tmp_path / "rank-2").write_text("2\nerror: recipe.yaml:1: run.device: no CUDA\n")
    (tmp_path / ".rank-3.tmp").write_text("2\nerror: half written\n")  # not yet renamed: not read
    assert relayed(tmp_path) == ["error: recipe.yaml:1: run.device: no CUDA", "error: distributed: rank 0 lost contact"]


_SLOW_DATA = """\
import os
import time
from pathlib import Path

import torch


def make(marker):
    \"\"\"Digits-sized data, slowly: a Ctrl-C arrives while every rank is still building its trainer.\"\"\"
    Path(marker + os.environ["RANK"]).touch()
    time.sleep(60)
    x = torch.zeros(300, 8)
    return torch.utils.data.TensorDataset(x, torch.zeros(300, dtype=torch.long))
"""


def test_ctrl_c_before_training_starts_says_interrupted_once(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the group; before a run installs its own handlers each rank
    printed 'interrupted' itself (N ranks, N lines). Now the launcher prints it once; exit 130."""
    (tmp_path / "slow_data.py").write_text(_SLOW_DATA)
    recipe = RECIPE.replace("data: {source: digits, layout: flat,",
                            f'data: {{source: factory, factory: "slow_data:make", factory_kwargs: '
                            f'{{marker: "{tmp_path / "building-"}"}},')
    (tmp_path / "recipe.yaml").write_text(recipe)
    launcher = subprocess.Popen(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                       f"run.output_dir={tmp_path / 'runs'}", "policy.max_seeds=0"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"building-{rank}").exists() for rank in (0, 1)):  # both ranks inside the factory
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and err.splitlines() == ["interrupted"], err[-3000:]


def test_a_single_node_rendezvous_port_already_held_is_refused_at_once(tmp_path: Path) -> None:
    """`--rdzv-endpoint HOST:PORT` on one node with PORT held by another program: torchrun fell back to
    being a client of it and waited without a word (over 380 s measured). Now one line naming the option,
    exit 2, before any rank starts; a free port still trains."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        refused = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                        "--rdzv-endpoint", f"127.0.0.1:{port}", f"run.output_dir={tmp_path / 'runs'}"),
                                 capture_output=True, text=True, env=_env(), timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"error: command line: --rdzv-endpoint: port {port} is already in use on this machine"), refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "runs").exists()
    trained = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                    "--rdzv-endpoint", f"127.0.0.1:{port}", f"run.output_dir={tmp_path / 'runs'}",
                                    "trainer.max_steps=5", "policy.max_seeds=0", "checkpoint.every_steps=null"),
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert trained.returncode == 0, trained.stderr[-3000:]


_STUCK_DATA = """\
import os
import time

import torch


def make():
    \"\"\"Rank 1 never returns: user data-loading code blocked forever (a dead NFS mount, a lock).\"\"\"
    while os.environ["RANK"] == "1":
        time.sleep(1)
    x = torch.zeros(300, 8)
    return torch.utils.data.TensorDataset(x, torch.zeros(300, dtype=torch.long))
"""


def _stalled_line(rank: int, then: str) -> str:
    return (f"error: distributed: rank {rank} did not arrive at a collective within 3 s (distributed.timeout_s), "
            f"so the run stops: it is stuck (blocked in its own code such as a data factory, stopped, or "
            f"deadlocked) or slower than the timeout; {then}")


def test_a_rank_blocked_in_its_data_factory_is_named_after_distributed_timeout_s_exit_6(tmp_path: Path) -> None:
    """A rank stuck in user code made every other rank wait for the collective timeout, hard-coded at
    30 minutes, and then end with gloo's traceback. Now the wait is `distributed.timeout_s` and the
    launcher prints one line naming the rank that did not come, exit 6."""
    (tmp_path / "stuck_data.py").write_text(_STUCK_DATA)
    recipe = RECIPE.replace("data: {source: digits, layout: flat,", 'data: {source: factory, factory: "stuck_data:make",')
    (tmp_path / "recipe.yaml").write_text(recipe)
    began = time.monotonic()
    result = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "2",
                                   f"run.output_dir={tmp_path / 'runs'}", "policy.max_seeds=0",
                                   "distributed.timeout_s=3"),
                            capture_output=True, text=True, timeout=120,
                            env={**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert result.returncode == PeerLost.exit_code, result.stderr[-3000:]
    assert result.stderr.splitlines() == [_stalled_line(1, "it had written no checkpoint to continue from")], \
        result.stderr[-3000:]
    assert time.monotonic() - began < 45 and not (tmp_path / "runs").exists()


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_stopped_rank_is_named_after_distributed_timeout_s_and_the_run_resumes_from_its_checkpoint(
        tmp_path: Path) -> None:
    """A rank that stops (SIGSTOP) while training: rank 0 waited 30 minutes, then called it 'lost contact
    ... that rank's process ended', and the launcher blamed the SIGKILL torchrun sent the stopped rank
    (exit 137). Now rank 0 names it after `distributed.timeout_s`, keeps the checkpoint and events, and
    the launcher exits 6. torchrun kills a stopped rank 30 s after its SIGTERM; the test does it at once."""
    recipe = RECIPE.replace("max_steps: 60", "max_steps: 100000").replace("max_seeds: 2", "max_seeds: 0")
    launcher, out = _train_until_a_checkpoint(tmp_path, recipe, 60, f"storage.workspace={tmp_path / 'ws'}",
                                              "distributed.timeout_s=3")
    workers = _worker_pids(launcher.pid)
    os.kill(workers[1], signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while not _ended(workers[0]):
        assert time.monotonic() < deadline, "rank 0 still waits"
        time.sleep(0.05)
    os.kill(workers[1], signal.SIGKILL)  # torchrun's own SIGKILL, 30 s after the SIGTERM a stopped process ignores
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == PeerLost.exit_code, err[-3000:]
    assert err.splitlines() == [_stalled_line(1, "continue from its last checkpoint with: esper resume --checkpoint "
                                                f"{out / 'dd'} --nproc-per-node 2")], err[-3000:]
    events = [json.loads(line) for line in (out / "dd" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint" for e in events)
    assert store.find(out / "dd", True, print).path.name.startswith("step-")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_node_waiting_for_the_others_says_so_once_and_gives_up_after_rdzv_join_timeout(tmp_path: Path) -> None:
    """One node of a two-node job whose other node never comes waited at the rendezvous without a word
    (600 s, torchrun's join timeout), then ended with torch's RendezvousTimeoutError traceback. Now it
    says once what it waits for and how to stop, and `--rdzv-join-timeout` ends the wait with one line, exit 6."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    endpoint = f"127.0.0.1:{_free_port()}"
    began = time.monotonic()
    result = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "1", "--nnodes", "2",
                                   "--rdzv-endpoint", endpoint, "--rdzv-id", "job7", "--rdzv-join-timeout", "3",
                                   f"run.output_dir={tmp_path / 'runs'}"),
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == PeerLost.exit_code, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"waiting at the rendezvous {endpoint} (id job7) until all 2 nodes have joined: start the same "
        "command on the other nodes (the same --nnodes, --rdzv-endpoint and --rdzv-id, each its own --node-rank); "
        "Ctrl-C stops, and the wait ends by itself after 3 s (--rdzv-join-timeout)",
        f"error: distributed: fewer than 2 nodes joined the rendezvous {endpoint} (id job7) within 3 s "
        "(--rdzv-join-timeout): start the same command on every node, or wait longer"], result.stderr[-3000:]
    assert time.monotonic() - began < 30 and not (tmp_path / "runs").exists()


def test_the_default_rendezvous_id_is_the_run_name_and_recipe_hash(tmp_path: Path) -> None:
    """Without --rdzv-id every job took the id 'esper', so two unrelated jobs at one endpoint joined each
    other's rendezvous. Now it comes from the run: nodes started with the same recipe still agree."""
    from esper_core.recipe.load import load_recipe

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    overrides = [f"run.output_dir={tmp_path / 'runs'}"]
    expected = f"dd-{load_recipe(tmp_path / 'recipe.yaml', overrides).sha256[:12]}"
    endpoint = f"127.0.0.1:{_free_port()}"
    result = subprocess.run(_esper("train", str(tmp_path / "recipe.yaml"), "--nproc-per-node", "1", "--nnodes", "2",
                                   "--rdzv-endpoint", endpoint, "--rdzv-join-timeout", "1", *overrides),
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == PeerLost.exit_code and f"(id {expected})" in result.stderr.splitlines()[0], \
        result.stderr[-3000:]
