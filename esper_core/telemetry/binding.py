"""Binding a run's results to its event chain, and signing the chain's head.

The chain proves the events; these functions extend the proof to what a reader of the run looks at:

- :func:`artifact_digests` hashes the final artifacts (:data:`ARTIFACTS`); the trainer records
  them in the chained ``run_end`` event as ``"artifacts"``, so editing the model, the topology, the
  metrics or the recipe after the run breaks the binding, named by file.
- :func:`summary_figures` is ``summary.json`` less the keys written after ``run_end`` (the run
  directory, the chain head and its signature); the trainer records it in ``run_end`` as
  ``"summary"``, so an edited accuracy in ``summary.json`` no longer matches.
- :func:`sign_head` signs the chain head with ``ESPER_SIGNING_KEY`` (HMAC-SHA256); the trainer stores
  it as ``summary.json``'s ``events_head_signature``. Without the key a consistently rewritten chain
  (every hash recomputed, summary included) cannot be told from the original; with it, it can.

:func:`binding_problems` checks all three and returns located problems (exit 4), notes (what
could not be checked, and why) and the :data:`Signature` state; :func:`evidence` says in one
sentence what that state proves, so no output calls a log verified that nobody could check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from esper_core.errors import CheckpointError, ConfigError, Problem
from esper_core.safe_read import UnsafeInput, read_head, sha256_regular
from esper_core.signing import keyed_digest, same
from esper_core.storage.settings import SIGNING_KEY_ENV, signing_key
from esper_core.telemetry.events import RunDirError, read_json

ARTIFACTS = ("final/model.safetensors", "final/topology.json", "final/manifest.json", "metrics.jsonl", "recipe.yaml")
"""Run files that are final when ``run_end`` is recorded (``summary.json`` is bound by its figures)."""
UNBOUND_SUMMARY_KEYS = frozenset({"run_dir", "events_head", "events_head_signature"})
"""Keys of ``summary.json`` that cannot be in ``run_end``: the directory moves when a run is copied,
and the head (and its signature) are computed from ``run_end`` itself."""
_HEAD_DOMAIN = b"esper events head v1\x00"

Located = tuple[int, dict[str, Any]]
"""A record and the line it is on."""
Signature = Literal["verified", "not checked", "unsigned", "unfinished", "failed"]
"""What the head signature check established: checked with the key; signed but no key set; never
signed; no signed head yet (the run has not finished); or a located problem (missing or wrong)."""
_EVIDENCE: dict[Signature, str] = {
    "verified": f"chain head signature verified with {SIGNING_KEY_ENV}: the log is tamper-evident, since no one "
                "without the key can rewrite it and sign the new head",
    "not checked": f"summary.json is signed (events_head_signature) but {SIGNING_KEY_ENV} is not set: the signature "
                   "could not be checked, so the hash chain is internally consistent but not tamper-evident here; "
                   f"set {SIGNING_KEY_ENV} to the key the run was trained with to verify it",
    "unsigned": "the run is not signed: its hash chain is internally consistent, but not tamper-evident without a "
                "signing key (whoever rewrites events.jsonl and summary.json, recomputing every hash, passes the "
                f"checks of the run directory); set {SIGNING_KEY_ENV} when training for a tamper-evident log",
    "unfinished": "the run has not finished, so no signed head anchors its log yet: its hash chain is internally "
                  "consistent, but not tamper-evident",
}


def evidence(signature: Signature | None) -> str | None:
    """What ``signature`` proves against tampering, in one sentence; ``None`` where a located problem
    already says it (``failed``) or nothing was checked (a broken chain)."""
    return _EVIDENCE.get(signature) if signature is not None else None


def artifact_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of each of :data:`ARTIFACTS` in ``run_dir`` (all must exist: call after writing ``final/``).
    ``recipe.yaml`` was written when the run started and may have been removed or replaced (a directory, a
    FIFO) while it trained: that is a :class:`CheckpointError` naming it (exit 3), raised before ``run_end``
    is recorded, never a traceback; the run's last checkpoint is intact."""
    digests = {}
    for name in ARTIFACTS:
        try:
            digests[name] = sha256_regular(run_dir / name)
        except (OSError, UnsafeInput) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CheckpointError(Problem(str(run_dir / name), f"{what}: the run stopped before recording its results "
                                          "(its last checkpoint is intact); restore the file and resume")) from None
    return digests


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``run_end`` binds of ``summary``: every key except :data:`UNBOUND_SUMMARY_KEYS`."""
    return {key: value for key, value in summary.items() if key not in UNBOUND_SUMMARY_KEYS}


def sign_head(head: str, key: bytes | None = None) -> str | None:
    """HMAC-SHA256 (hex) of the chain head under ``key`` (default ``ESPER_SIGNING_KEY``); ``None``
    without a key."""
    key = key if key is not None else signing_key()
    return None if key is None else keyed_digest(key, _HEAD_DOMAIN, head.encode("ascii")).hex()


def check_resume_key(run_dir: Path) -> None:
    """Refuse to continue a signed run without the key that signs it (``ConfigError``, exit 2): its
    next summary would carry no signature, and the audit with the key would then call the run
    tampered with. A run is signed when its ``run_start`` says so or its summary has a signature; a
    summary signed by another key than the one set is refused too (the extended run would verify
    with neither)."""
    try:
        first = json.loads(read_head(run_dir / "events.jsonl", 1 << 16).split(b"\n", 1)[0] or b"{}")
        signed = isinstance(first, dict) and first.get("signed") is True
    except (OSError, UnsafeInput, ValueError):
        signed = False  # a damaged log is the audit's to report; the resume's checks of the checkpoint still run
    try:
        summary = read_json(run_dir / "summary.json") or {}
    except RunDirError:
        summary = {}
    key = signing_key()
    if (signed or summary.get("events_head_signature") is not None) and key is None:
        raise ConfigError(Problem(SIGNING_KEY_ENV, f"{run_dir} is signed, but {SIGNING_KEY_ENV} is not set: set the "
                                  "key it was trained with to resume it (without it the run's audit trail would lose "
                                  "its signature)"))
    if key is not None and summary.get("events_head_signature") is not None \
            and _signature_check(run_dir / "summary.json", summary)[0] is not None:
        raise ConfigError(Problem(SIGNING_KEY_ENV, f"{run_dir} was signed with another key than "
                                  f"{SIGNING_KEY_ENV}: resume it with the key it was trained with"))


def binding_problems(run_dir: Path, records: list[Located], summary: dict[str, Any] | None,
                     log_name: str) -> tuple[list[Problem], list[str], Signature]:
    """Problems (artifacts, summary figures, signature), notes and the signature state for a run
    whose chain is consistent."""
    problems: list[Problem] = []
    notes: list[str] = []
    ends = [(line, r) for line, r in records if r.get("event") == "run_end"]
    if not ends:
        if summary is not None:
            problems.append(Problem(str(run_dir / "summary.json"), f"the run has a summary but {log_name} has no "
                                    "run_end event: the summary was not written by this run"))
            return problems, notes, "failed"
        return problems, notes, "unfinished"
    line, end = ends[-1]
    where = f"{log_name}:{line}"
    artifacts = end.get("artifacts")
    if isinstance(artifacts, dict):
        problems += _artifact_problems(run_dir, artifacts, where)
    else:
        notes.append(f"the run_end event ({where}) binds no artifacts (a run written before artifact binding): "
                     f"{', '.join(ARTIFACTS)} were not checked")
    figures = end.get("summary")
    if isinstance(figures, dict) and summary is not None:
        problems += _summary_problems(run_dir / "summary.json", summary_figures(summary), figures, where)
    elif summary is not None:
        notes.append(f"the run_end event ({where}) binds no summary figures: summary.json was not checked")
    if summary is None:  # a finished log without its summary: the chain walk has already failed it
        return problems, notes, "failed"
    problem, signature = _signature_check(run_dir / "summary.json", summary)
    problems += [problem] if problem else []
    start = next(((line, r) for line, r in records if r.get("event") == "run_start"), None)
    if signature == "unsigned" and start is not None and start[1].get("signed") is True:
        # stripping the signature must not pass a signed run off as one that never had a key (no key
        # is needed to see this; a forger who also rewrites run_start is caught only with the key)
        problems.append(Problem(str(run_dir / "summary.json"), f"no events_head_signature, but the run_start event "
                                f"({log_name}:{start[0]}) records that the run was signed: the signature was removed",
                                field="events_head_signature"))
        signature = "failed"
    return problems, notes, signature


def _artifact_problems(run_dir: Path, artifacts: dict[str, Any], where: str) -> list[Problem]:
    problems = []
    for name, digest in artifacts.items():
        path = run_dir / name
        if name not in ARTIFACTS:
            problems.append(Problem(str(path), f"bound in the run_end event ({where}) but not a run artifact"))
            continue
        try:
            actual = sha256_regular(path)
        except FileNotFoundError:
            problems.append(Problem(str(path), f"missing: the run_end event ({where}) binds it"))
            continue
        except (UnsafeInput, OSError) as exc:
            problems.append(Problem(str(path), f"{exc}: the run_end event ({where}) binds a regular file"))
            continue
        if not isinstance(digest, str) or not same(actual, digest):
            problems.append(Problem(str(path), f"sha256 {actual} does not match the one bound in the run_end event "
                                    f"({where}): the file was edited or replaced after the run"))
    return problems


def _summary_problems(path: Path, actual: dict[str, Any], bound: dict[str, Any], where: str) -> list[Problem]:
    problems = []
    for key in sorted(set(actual) | set(bound)):
        if key not in actual:
            problems.append(Problem(str(path), f"missing, but the run_end event ({where}) records {_show(bound[key])}",
                                    field=key))
        elif key not in bound:
            problems.append(Problem(str(path), f"not recorded in the run_end event ({where}): added after the run",
                                    field=key))
        elif _canonical(actual[key]) != _canonical(bound[key]):
            problems.append(Problem(str(path), f"{_show(actual[key])} does not match {_show(bound[key])} in the "
                                    f"run_end event ({where}): summary.json was edited", field=key))
    return problems


def _signature_check(path: Path, summary: dict[str, Any]) -> tuple[Problem | None, Signature]:
    signature = summary.get("events_head_signature")
    head = summary.get("events_head")
    key = signing_key()
    if key is None:
        return None, "unsigned" if signature is None else "not checked"
    if signature is None:
        return Problem(str(path), f"no events_head_signature, but {SIGNING_KEY_ENV} is set: the run was not "
                                  "signed, or its signature was removed"), "failed"
    expected = sign_head(head, key) if isinstance(head, str) and head.isascii() else None
    if expected is None or not isinstance(signature, str) or not same(signature.encode(), expected.encode()):
        return Problem(str(path), f"events_head_signature does not match {SIGNING_KEY_ENV}: the chain was "
                                  "rewritten, or another key signed it", field="events_head_signature"), "failed"
    return None, "verified"


def _canonical(value: Any) -> str:
    """Comparable text of a JSON value (NaN equals NaN here: a diverged loss is recorded as NaN)."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


def _show(value: Any) -> str:
    text = "NaN" if isinstance(value, float) and math.isnan(value) else json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."
