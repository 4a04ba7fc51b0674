"""Run artifacts on S3-compatible storage, against a real S3 server started here on 127.0.0.1 (moto's).

One MLP run (low-rank seeds only, so a merged export has the user's original key names) uploads to
the module's server; the tests then check what arrived, resume from a checkpoint in the store
(bit-exactly, as from a local one), export straight from an ``s3://`` URL, refuse a corrupted object
and a download that breaks mid-object (one line, exit 3), and survive the server going down in the
middle of a second run (one warning, the run finishes, ``esper sync`` uploads what is missing once a
server is back).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from esper_core import load_run
from esper_core.checkpoints import store
from esper_core.export.load import open_run
from esper_core.export.run import held_out_inputs
from esper_core.training.models import build_model
from esper_core.training.trainer import Trainer
from run_helpers import esper

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

RECIPE = """\
run: {{name: {name}, seed: 0, device: cpu}}
data: {{source: digits, layout: flat, batch_size: 32}}
model: {{arch: mlp, widths: [16]}}
seeds: {{targets: ["layers.0"], per_layer: 2, blueprints: [lowrank_adapter], rank: 2, incubation_steps: 10,
        blend_steps: 10, probation_steps: 5, embargo_steps: 100000, fossilize_margin: -1.0}}
policy: {{trigger: periodic, period_steps: 15, growth_window: [0.05, 0.5], max_seeds: 2}}
trainer: {{max_steps: {steps}, lr: 0.01, eval_every: 10, log_every: 10}}
checkpoint: {{every_steps: 25, keep: 100}}
telemetry: {{progress: none}}
storage: {{workspace: "{workspace}", artifacts_url: "{url}", artifacts_timeout_s: 1.0}}
"""


class Server:
    """A moto S3 server on a loopback port of its own."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> Server:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def url(self, bucket: str, path: str = "runs") -> str:
        return f"s3://{bucket}/{path}?endpoint_url={self.endpoint}"


class CuttingProxy:
    """A loopback HTTP proxy in front of ``upstream`` that passes every exchange through unchanged,
    except that an object's GET response with a body over ``limit`` bytes stops halfway and the
    connection closes: a download that breaks mid-object, as a flaky network or a restarted server does."""

    def __init__(self, upstream: int, limit: int) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream_conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
                upstream_conn.request(self.command, self.path, body, dict(self.headers))
                response = upstream_conn.getresponse()
                data = response.read()
                cut = self.command == "GET" and "?" not in self.path and len(data) > limit  # objects, not listings
                proxy.cuts += cut
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if cut else data)
                self.wfile.flush()
                self.close_connection = cut

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self.cuts = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def aws_environment() -> Iterator[None]:
    """Credentials as users give them (environment variables); nothing else of the caller's AWS setup."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "esper-test-key")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "esper-test-secret")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server().start()
    running.client().create_bucket(Bucket="esper-runs")
    yield running
    running.stop()


def train(root: Path, name: str, url: str, steps: int, on_event: Any = None) -> Trainer:
    recipe = root / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, steps=steps, workspace=root / "workspace", url=url), encoding="utf-8")
    trainer = Trainer.from_recipe(recipe, [f"run.output_dir={root / 'runs'}"])
    trainer.fit(on_event)
    return trainer


@pytest.fixture(scope="module")
def uploaded(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return train(tmp_path_factory.mktemp("s3run"), "lowrank", server.url("esper-runs"), 100)


def test_every_committed_artifact_is_uploaded_with_its_sha256(server: Server, uploaded: Trainer) -> None:
    client, run_dir = server.client(), uploaded.run_dir
    # dotfiles (the run's .lock, temporaries of unfinished writes) are the process's, not artifacts
    expected = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert (run_dir / ".lock").is_file()
    assert {p.relative_to(run_dir).as_posix() for p in expected} >= {
        "final/model.safetensors", "final/topology.json", "final/manifest.json", "summary.json", "recipe.yaml",
        "checkpoints/LATEST", *(f"checkpoints/step-{s:08d}/{f}" for s in (25, 50, 75, 100)
                                for f in ("tensors.safetensors", "state.json", "manifest.json"))}
    for path in expected:
        key = f"runs/{run_dir.name}/{path.relative_to(run_dir).as_posix()}"
        obj = client.get_object(Bucket="esper-runs", Key=key)
        body = obj["Body"].read()
        assert body == path.read_bytes(), key
        assert obj["Metadata"]["sha256"] == sha256(path), key


def test_export_from_s3_gives_the_original_models_keys(server: Server, uploaded: Trainer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the download cache is .esper/remote under the working directory
    url = server.url("esper-runs", f"runs/{uploaded.run_dir.name}")
    done = esper("export", url, "--format", "safetensors", "--out", tmp_path / "out", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["within_tolerance"] and result["original_keys"]
    assert result["parameters"]["exported"] == result["parameters"]["host"]  # merged low-rank seeds add nothing
    # low-rank seeds fold into the host when they fossilize; export still lists each one it merged
    assert [(s["action"], s["state"]) for s in result["seeds"]] == [("merged", "FOSSILIZED")] * 2
    cached = tmp_path / ".esper" / "remote" / "esper-runs" / "runs" / uploaded.run_dir.name
    assert sha256(cached / "final" / "model.safetensors") == sha256(uploaded.run_dir / "final" / "model.safetensors")
    data = uploaded.data
    with torch.random.fork_rng():
        original = build_model(uploaded.loaded.recipe.model, data.input_shape, data.num_classes)
    original.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    x = held_out_inputs(open_run(uploaded.run_dir), 64)
    with torch.no_grad():
        assert (original.eval()(x) - uploaded.model.eval()(x)).abs().max() <= result["tolerance"]


def test_export_of_an_s3_checkpoint_with_an_endpoint_url(server: Server, uploaded: Trainer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--checkpoint was appended after the URL's ?endpoint_url=..., inside the endpoint: NoSuchBucket."""
    monkeypatch.chdir(tmp_path)
    name = store.checkpoint_name(50)
    url = server.url("esper-runs", f"runs/{uploaded.run_dir.name}")
    done = esper("export", url, "--format", "pt2", "--checkpoint", name, "--out", tmp_path / "out", "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["step"] == 50 and result["within_tolerance"]


def test_resume_from_s3_continues_bit_exactly(server: Server, uploaded: Trainer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = uploaded.run_dir.name
    url = f"s3://esper-runs/runs/{name}/checkpoints/step-00000050?endpoint_url={server.endpoint}"
    done = esper("resume", "--checkpoint", url)
    assert done.exit_code == 0, done.output
    resumed = tmp_path / ".esper" / "remote" / "esper-runs" / "runs" / name
    original, again = load_run(uploaded.run_dir).state_dict(), load_run(resumed).state_dict()
    assert original.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in original.items())


def test_a_corrupted_object_is_refused_naming_it(server: Server, uploaded: Trainer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    client, name = server.client(), uploaded.run_dir.name
    key = f"runs/{name}/checkpoints/step-00000075/tensors.safetensors"
    stored = client.get_object(Bucket="esper-runs", Key=key)
    body = bytearray(stored["Body"].read())
    body[len(body) // 2] ^= 0xFF  # bit rot: the recorded sha256 stays, the bytes change
    client.put_object(Bucket="esper-runs", Key=key, Body=bytes(body), Metadata=stored["Metadata"])
    url = f"s3://esper-runs/runs/{name}/checkpoints/step-00000075?endpoint_url={server.endpoint}"
    done = esper("resume", "--checkpoint", url)
    assert done.exit_code == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"s3://esper-runs/{key}" in lines[0] and "refused" in lines[0]
    assert "Traceback" not in done.output
    assert not (tmp_path / ".esper" / "remote" / "esper-runs" / "runs" / name / "checkpoints" / "step-00000075"
                / "tensors.safetensors").exists()


def test_a_download_that_breaks_mid_object_is_one_line_and_exit_3(server: Server, uploaded: Trainer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every large object's body stops halfway (the run's listing and small files pass): the export
    ends with one line naming the object, exit 3, and no partial file in the download cache."""
    monkeypatch.chdir(tmp_path)
    proxy = CuttingProxy(server.port, limit=4096)
    try:
        url = f"s3://esper-runs/runs/{uploaded.run_dir.name}?endpoint_url={proxy.endpoint}"
        done = esper("export", url, "--format", "safetensors", "--out", tmp_path / "out")
    finally:
        proxy.stop()
    assert proxy.cuts > 0
    assert done.exit_code == 3, done.output
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot download" in lines[0] and f"runs/{uploaded.run_dir.name}/" in lines[0], lines
    assert "Traceback" not in done.output
    cache = tmp_path / ".esper" / "remote"
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]


def test_an_outage_mid_run_warns_once_and_sync_uploads_what_is_missing(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    server = Server().start()
    server.client().create_bucket(Bucket="esper-outage")

    def stop_after_first_checkpoint(event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint" and event["step"] == 50:
            server.stop()  # the store vanishes after step 25's checkpoint was uploaded

    trainer = train(tmp_path, "outage", server.url("esper-outage"), 100, stop_after_first_checkpoint)
    run_dir = trainer.run_dir
    assert (run_dir / "summary.json").is_file()
    warnings = [line for line in capfd.readouterr().err.splitlines() if "unreachable" in line]
    assert len(warnings) == 1 and f"esper sync {run_dir}" in warnings[0]
    assert "esper-test-secret" not in warnings[0]

    back = Server(server.port).start()
    try:
        done = esper("sync", run_dir, "--json")
        assert done.exit_code == 0, done.output
        result = json.loads(done.stdout)
        assert "final/model.safetensors" in result["uploaded"] and "summary.json" in result["uploaded"]
        assert "checkpoints/step-00000075/tensors.safetensors" in result["uploaded"]
        assert "checkpoints/step-00000025/tensors.safetensors" in result["unchanged"]  # uploaded before the outage
        client = back.client()
        for path in (p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            head = client.head_object(Bucket="esper-outage", Key=f"runs/{run_dir.name}/{path.relative_to(run_dir)}")
            assert head["Metadata"]["sha256"] == sha256(path)
        again = json.loads(esper("sync", run_dir, "--json").stdout)
        assert again["uploaded"] == []
    finally:
        back.stop()


def test_a_password_in_the_endpoint_url_is_shown_as_stars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``?endpoint_url=http://user:pw@host`` is a URL inside a URL: its password went out as typed,
    in botocore's "Could not connect to the endpoint URL" text and in every message quoting the s3://
    URL. Each command fails here for real (nothing listens on the port), and shows the endpoint's host
    and port with the password as ``***``."""
    monkeypatch.chdir(tmp_path)
    port = free_port()  # nothing listens there: every request is refused at once
    endpoint = f"http://esper:topsecret@127.0.0.1:{port}"
    url = f"s3://esper-runs/runs/gone?endpoint_url={endpoint}"
    run = tmp_path / "runs" / "local"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(RECIPE.format(name="local", steps=10, workspace=tmp_path / "ws", url=url),
                                     encoding="utf-8")
    (run / "summary.json").write_text("{}", encoding="utf-8")
    shown = f"esper:***@127.0.0.1:{port}"
    for args, code, said in (
            (("export", url), 3, f"cannot list the run in the artifact store (EndpointConnectionError: Could not "
                                 f'connect to the endpoint URL: "http://{shown}/'),
            (("resume", "--checkpoint", url), 3, f'"http://{shown}/'),
            (("sync", run), 1, f'unreachable (EndpointConnectionError: Could not connect to the endpoint URL: '
                               f'"http://{shown}/'),
            (("export", f"{url}&colour=red"), 2, f"?endpoint_url=http://{shown}&colour=red: unknown URL parameter"),
            (("train", run / "recipe.yaml", f"storage.artifacts_url=s3:/esper-runs?endpoint_url={endpoint}"), 2,
             f"override 'storage.artifacts_url=s3:/esper-runs?endpoint_url=http://{shown}'")):
        done = esper(*args)
        assert done.exit_code == code, done.output
        assert len(done.stderr.strip().splitlines()) == 1 and said in done.stderr, done.stderr
        assert "topsecret" not in done.stdout + done.stderr
