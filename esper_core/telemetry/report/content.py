"""What a run report says, as one JSON-ready dict: the single source that every format renders.

``report.json`` is this dict; the Markdown and HTML renderers only lay it out, so the three formats
cannot disagree. Every figure comes from the run's own files: nothing is recomputed from a model.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from esper_core.recipe.load import FACTORY_FIELDS
from esper_core.seeds.lifecycle import any_adding
from esper_core.telemetry.binding import evidence
from esper_core.telemetry.report.load import Record, RunFiles
from esper_core.telemetry.run import build_info
from esper_core.training.factory_sources import file_state, named_modules

SCHEMA = "esper-report/1"

LIFECYCLE = {"germinate": "germinated", "incubate": "training", "blend": "blending", "probation": "probation",
             "fossilize": "fossilized", "cull": "culled", "rollback": "rolled_back", "reopen": "dormant"}
"""The slot state each lifecycle event leaves behind."""
_OCCUPYING = {"germinated", "training", "blending", "probation", "fossilized"}
_STANDARD = {"event", "step", "seq", "prev", "time", "layer", "slot", "blueprint", "state", "_line"}


def build(files: RunFiles) -> dict[str, Any]:
    """The report of one run; see the module docstring."""
    start = _first(files.events, "run_start")
    end = _last(files.events, "run_end")
    summary = files.summary or {}
    metric = str(summary.get("metric") or "accuracy")  # runs from before tasks existed were classifiers
    steps = summary.get("steps") or (end or {}).get("step") or max((r["step"] for r in files.metrics), default=0)
    lifecycle = slot_timelines(files, steps)
    return {
        "schema": SCHEMA,
        "generated_at": _iso(datetime.now(timezone.utc).timestamp()),
        "generated_by": build_info(),
        "run": _identity(files, start, end, steps),
        "audit": files.audit.to_json() | _recipe_check(files) | _evidence(files),
        "code": _code(files),
        "changes": [change(e) for e in files.events if e.get("event") not in ("run_start", "run_end")],
        "kernels": _kernels(files.events),
        "checkpoints": files.checkpoints,
        "anomalies": [_plain(e) for e in files.events if e.get("event") == "anomaly"],
        "final": {"metric": metric, **{k: summary.get(k) for k in (
            f"val_{metric}", f"test_{metric}", "val_loss", "test_loss", "params_initial", "params_final", "seeds",
            "fossilized")}, "seeds_muted": _muted(summary.get("seeds_muted"), summary.get("seeds"), metric)},
        "budgets": _budgets(files, lifecycle),
        "series": _series(files.metrics, metric),
        "lifecycle": lifecycle,
        "warnings": files.warnings + ([] if files.summary else ["summary.json is missing: the run did not finish"]),
    }


def _muted(figures: Any, seeds: Any, metric: str) -> dict[str, Any] | None:
    """The task's metric on validation and test with every seed muted (what growth is worth), or
    ``None`` for a run whose summary has no such figures (one from before they existed, or damaged), and
    for one where no seed contributes to the final model (a static run, ``policy.max_seeds=0``, or one
    whose seeds were all culled): its summary still holds muted figures, the unmuted ones again, and
    rows repeating them under "with every seed muted" suggested that growth had been measured."""
    if not isinstance(figures, dict):
        return None
    if isinstance(seeds, dict) and not any_adding(seeds):
        return None
    return {k: figures.get(k) for k in (f"val_{metric}", f"test_{metric}")}


def _identity(files: RunFiles, start: Record | None, end: Record | None, steps: int) -> dict[str, Any]:
    recipe_run = _mapping(files.recipe.get("run"))
    data = _mapping(files.recipe.get("data"))
    summary = files.summary or {}
    return {
        "name": recipe_run.get("name", files.run_dir.name), "dir": str(files.run_dir),
        "recipe_sha256": files.recipe_sha256, "seed": recipe_run.get("seed"),
        "versions": _mapping((start or {}).get("versions")),
        "data": {k: data[k] for k in ("source", "layout", "path", "factory", "batch_size", "val_fraction",
                                      "test_fraction") if data.get(k) is not None},
        "model": _model(_mapping(files.recipe.get("model"))),
        "device": summary.get("device") or (start or {}).get("device"),
        "started_at": _iso(start.get("time")) if start else None,
        "ended_at": _iso(end.get("time")) if end else None,
        "wall_time_s": summary.get("wall_time_s"), "steps": steps,
        "finished": files.summary is not None,
        "metrics_url": (start or {}).get("metrics_url"),
    }


def _model(model: dict[str, Any]) -> dict[str, Any]:
    """The model keys that matter for its architecture (the resolved recipe lists every default)."""
    relevant = {"mlp": ("widths", "dropout"), "cnn": ("channels", "dropout"),
                "factory": ("factory", "factory_kwargs")}.get(str(model.get("arch")), ())
    return {k: model[k] for k in ("arch", *relevant) if k in model}


def _recipe_check(files: RunFiles) -> dict[str, Any]:
    problems = files.integrity
    return {"recipe_ok": not problems, "recipe_detail": "; ".join(map(str, problems)) if problems else "recipe.yaml "
            "matches its recorded sha256 and the results match those bound in the event chain"}


def _code(files: RunFiles) -> dict[str, Any]:
    """The factory code the run recorded, each module with its recorded sha256 and whether the file at
    the recorded path still holds those bytes, and one sentence saying what was checked and what was
    not. A file that differs is a finding, not an audit failure: the run's own files are intact, the
    code beside its recipe changed since (a resume of the run would refuse it)."""
    code = files.code
    if code is None:
        return {"recorded_in": None, "bound": False, "recipe_dir": None, "modules": [],
                "detail": "not checked: the run has neither final/manifest.json nor a checkpoint recording its code"}
    recorded = {"recorded_in": code.where, "bound": code.bound,
                "recipe_dir": str(code.recipe_dir) if code.recipe_dir is not None else None, "modules": []}
    if code.sources is None:
        return recorded | {"detail": f"not checked: {code.where} {code.missing}"}
    where = code.where + (", which run_end binds" if code.bound else ", the latest checkpoint (not bound to the "
                                                                      "event chain)")
    if not code.sources:
        return recorded | {"detail": f"no code of the user's recorded in {where}: the recipe names no module, or "
                                     "only standard-library or installed ones"}
    fields = named_modules({f"{section}.{key}": _mapping(files.recipe.get(section)).get(key)
                            for section, key in FACTORY_FIELDS})
    modules = []
    for name, source in code.sources.items():
        state, detail = file_state(source)
        modules.append({"module": name, "field": fields.get(name), "file": source.file,
                        "path": source.shown(code.recipe_dir), "sha256": source.sha256, "state": state,
                        "detail": detail})
    found = ", ".join(f"{m['path']} {m['detail']}" for m in modules)
    count = f"{len(modules)} module{'s' if len(modules) > 1 else ''}"
    relative = code.recipe_dir is not None and any(m["path"] != m["file"] for m in modules)
    paths = f"; paths relative to the recipe's directory, {code.recipe_dir}" if relative else ""
    return recorded | {"modules": modules,
                       "detail": f"{count} recorded in {where}{paths}: {found}. Checked: each named module's own "
                                 "file, read at its recorded path; not checked: the modules they import, nor which "
                                 "file an import would find now (esper resume checks that)"}


def _evidence(files: RunFiles) -> dict[str, Any]:
    """The signature's state and what it proves: ``tamper_evident`` only where a rewrite of the log
    would have been detected (a signature checked with the key), as ``esper report --verify`` says."""
    return {"signature": files.signature, "tamper_evident": files.tamper_evident, "evidence": evidence(files.signature)}


def change(event: Record) -> dict[str, Any]:
    """One entry of the change history: the event's fields plus a sentence saying what and why."""
    return _plain(event) | {"where": _where(event), "detail": describe_change(event)}


def describe_change(e: Record) -> str:
    """The reason and measured effect of one event, in words."""
    kind = e.get("event")
    if kind == "germinate":
        return f"{e.get('reason', 'no reason recorded')}; adds {_int(e.get('params'))} parameters"
    if kind in ("fossilize", "cull") and "metric_gain" in e:
        verdict = "kept" if kind == "fossilize" else "removed"
        guard = "; the loss blew up with it" if e.get("blew_up") else ""
        return (f"muting the seed changes val {e.get('metric', 'metric')} {_num(e.get('metric_with'))} -> "
                f"{_num(e.get('metric_without'))} (gain {_num(e.get('metric_gain'))} ± {_num(e.get('stderr'))} over "
                f"{_int(e.get('samples'))} samples, bound {_num(e.get('upper_bound'))} vs margin "
                f"{_num(e.get('margin'))}) and val loss {_num(e.get('val_loss_with'))} -> "
                f"{_num(e.get('val_loss_without'))}{guard}: {verdict}")
    if kind in ("rollback", "anomaly"):
        return str(e.get("reason", "")) + (f" (from step {e['from_step']})" if "from_step" in e else "")
    if kind == "checkpoint":
        return f"checkpoint {e.get('name', '')}"
    if kind == "run_resume":
        return f"resumed from checkpoint {e.get('checkpoint', '')}"
    if kind == "interrupted":
        return f"{e.get('signal', 'signal')} received; checkpoint {e.get('checkpoint', '')}"
    known = {"incubate": "incubation starts (gradient-isolated)", "blend": "blending into the host starts",
             "probation": "full weight; probation before the verdict", "reopen": "embargo over; the slot is free again"}
    if isinstance(kind, str) and kind in known:
        return known[kind]
    if "reason" in e:
        return str(e["reason"])
    # An event kind this report does not know yet: show its own scalar fields rather than nothing.
    return ", ".join(f"{k}={v}" for k, v in sorted(e.items())
                     if k not in _STANDARD and isinstance(v, (str, int, float, bool)))


def _kernels(events: list[Record]) -> list[dict[str, Any]]:
    """Every kernel germinated, with where it went and how its seed ended."""
    live: dict[tuple[str, str], dict[str, Any]] = {}  # slot -> its current kernel entry
    kernels = []
    for e in events:
        key = (str(e.get("layer")), str(e.get("slot")))  # str: a hand-edited log may hold any JSON there
        if e.get("event") == "germinate":
            live[key] = {"address": e.get("kernel"), "blueprint": e.get("blueprint"), "layer": e.get("layer"),
                         "slot": e.get("slot"), "params": e.get("params"), "step": e.get("step"), "outcome": "live"}
            kernels.append(live[key])
        elif e.get("event") in ("fossilize", "cull", "rollback") and key in live:
            live.pop(key)["outcome"] = LIFECYCLE[e["event"]]
    return kernels


def slot_timelines(files: RunFiles, steps: int) -> list[dict[str, Any]]:
    """Per slot, the intervals ``[start, end)`` it spent in each non-dormant state, replayed from events."""
    start = _first(files.events, "run_start") or {}
    per_layer = min(_count(_mapping(files.recipe.get("seeds")).get("per_layer")) or 1, 64)
    layers = start.get("layers")
    slots: dict[str, list[list[Any]]] = {f"{layer}#{i}": [] for layer in (layers if isinstance(layers, list) else [])
                                         for i in range(per_layer)}
    for e in files.events:
        state = LIFECYCLE.get(str(e.get("event")))
        if state is None or "layer" not in e:
            continue
        intervals = slots.setdefault(f"{e['layer']}#{e.get('slot')}", [])
        if intervals and intervals[-1][2] is None:
            intervals[-1][2] = e.get("step", 0)
        if state != "dormant":
            intervals.append([state, e.get("step", 0), None])
    return [{"slot": key, "intervals": [{"state": s, "start": a, "end": steps if b is None else b}
                                        for s, a, b in intervals]} for key, intervals in slots.items()]


def _budgets(files: RunFiles, lifecycle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    policy = _mapping(files.recipe.get("policy"))
    summary = files.summary or {}
    boundaries = sorted({i["start"] for slot in lifecycle for i in slot["intervals"]})
    peak_seeds = max((sum(1 for slot in lifecycle if any(i["state"] in _OCCUPYING and i["start"] <= t < i["end"]
                                                         for i in slot["intervals"]))
                      for t in boundaries), default=0)
    initial = _count(summary.get("params_initial"))
    if initial is None:
        initial = _count((_first(files.events, "run_start") or {}).get("params"))
    params = [r["params"] for r in files.metrics if _count(r.get("params")) is not None]
    final = _count(summary.get("params_final", params[-1] if params else None))
    added_final = final - initial if final is not None and initial is not None else None
    added_peak = max(params) - initial if params and initial is not None else added_final
    return [
        _budget("policy.max_seeds", "seeds alive or fossilized at once (peak)", policy.get("max_seeds"), peak_seeds),
        _budget("policy.max_added_params", "parameters added by growth (final)", policy.get("max_added_params"),
                added_final, peak=added_peak),
    ]


def _budget(key: str, what: str, limit: Any, used: Any, **extra: Any) -> dict[str, Any]:
    within = None if limit is None or used is None else used <= limit
    return {"key": key, "what": what, "limit": limit, "used": used, "within": within, **extra}


def _series(rows: list[Record], metric: str) -> dict[str, list[list[float]]]:
    def pick(key: str) -> list[list[float]]:
        return [[r["step"], r[key]] for r in rows if isinstance(r.get(key), (int, float))]
    return {"loss": pick("loss"), "val_loss": pick("val_loss"), "val_metric": pick(f"val_{metric}"),
            "params": pick("params")}


def _plain(event: Record) -> dict[str, Any]:
    """An event without the chain's bookkeeping fields, plus its line and time for reference."""
    out = {k: v for k, v in event.items() if k not in ("_line", "prev", "time")}
    out["line"] = event.get("_line")
    out["at"] = _iso(event.get("time"))
    return out


def _where(e: Record) -> str:
    return f"{e['layer']}#{e.get('slot')}" if "layer" in e else ""


def _first(events: list[Record], kind: str) -> Record | None:
    return next((e for e in events if e.get("event") == kind), None)


def _last(events: list[Record], kind: str) -> Record | None:
    return next((e for e in reversed(events) if e.get("event") == kind), None)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    """An integer figure of the run's files, or ``None`` when a damaged or edited file holds something else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _iso(t: Any) -> str | None:
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    try:
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):  # a time no clock can show: an edited record
        return None


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "?"


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) else "?"


def _int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"
