"""Kernel cache: hit latency per tier, and the hit rate of a second identical run.

    python benchmarks/cache.py [--json PATH] [--recipe PATH] [--redis URL] [--postgres URL] [--repeats N]

``hit_ms``: median wall time of ``cache.get`` for a typical kernel (lowrank_adapter on a 64->32
Linear, about 19 KB) when the hit comes from that tier: a cache holding only that tier below an
empty memory tier, memory cleared before each lookup (memory: a warm lookup). Every hit is verified
(content hash, plus HMAC as configured) and parsed. Targets: memory <= 0.1 ms, Redis <= 2 ms,
SQL <= 5 ms.

``rerun_hit_rate``: the trainer is not wired to the tiered cache yet, so a run's kernel lookups are
simulated: every kernel ``esper compile --for RECIPE`` would build (the recipe's layers x its
blueprints) is requested through a fresh cache over fresh tiers (misses, compiled, put), then again
through a second fresh cache (a new process: empty memory) over the same tiers; the figure is the
second pass's hit rate. Printed last.

Redis and PostgreSQL are used when reachable (defaults: ``ESPER_REDIS_URL`` or the local Redis, and
the local PostgreSQL's ``test`` database, in a schema made and dropped here); a tier that is not
reachable is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from esper_core.blueprints.host import HostSpec
from esper_core.blueprints.library import BUILTIN_DIR, BlueprintLibrary, load_blueprint
from esper_core.compiler.artifact import Kernel
from esper_core.compiler.kernels import KernelSpec
from esper_core.compiler.options import plan_compile
from esper_core.compiler.pipeline import compile_kernel
from esper_core.recipe.load import load_recipe
from esper_core.storage.cache import PersistentKernelCache, build_tiers
from esper_core.storage.memory import MemoryTier
from esper_core.storage.settings import StorageSettings, sqlite_url

REPO = Path(__file__).resolve().parents[1]
TARGETS_MS = {"memory": 0.1, "redis": 2.0, "sql": 5.0}


def reachable_redis(url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except Exception as exc:  # any failure: the tier is simply not benchmarked
        print(f"Redis at {url} not reachable ({type(exc).__name__}); skipped", file=sys.stderr)
        return None
    return url


@contextmanager
def postgres_schema(url: str) -> Iterator[str | None]:
    """A URL whose tables live in a fresh schema (dropped afterwards), or None if unreachable."""
    import psycopg

    try:
        connection = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except Exception as exc:
        print(f"PostgreSQL at {url} not reachable ({type(exc).__name__}); skipped", file=sys.stderr)
        yield None
        return
    schema = f"esper_bench_{uuid.uuid4().hex[:12]}"
    connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield url.replace("postgresql://", "postgresql+psycopg://", 1) + ("&" if "?" in url else "?") + \
            "options=" + quote(f"-csearch_path={schema}")
    finally:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        connection.close()


def hit_ms(settings: StorageSettings, tier: str, kernel: Kernel, repeats: int) -> float:
    """Median ms of a lookup served by ``tier`` (memory: a warm lookup)."""
    below = [t for t in build_tiers(settings) if t.name == tier] if tier != "memory" else []
    cache = PersistentKernelCache(MemoryTier(settings.memory_bytes), below, settings.signing_key)
    try:
        cache.put(kernel)
        cache.get(kernel.address)  # connections made, statements prepared
        samples = []
        for _ in range(repeats):
            if tier != "memory":
                cache.memory.clear()
            started = time.perf_counter()
            found = cache.get(kernel.address)
            samples.append((time.perf_counter() - started) * 1e3)
            assert found is not None and found.address == kernel.address, f"{tier}: miss"
        assert cache.stats()["tiers"][tier]["hits"] == repeats + (tier == "memory"), f"{tier}: served elsewhere"
        return statistics.median(samples)
    finally:
        cache.close()


def rerun_hit_rate(settings: StorageSettings, specs: list[KernelSpec]) -> tuple[float, dict[str, int], float]:
    """(hit rate of the second pass, hits per tier in it, seconds the first pass compiled for)."""
    started = time.perf_counter()
    with PersistentKernelCache.open(settings) as first:
        for spec in specs:
            if first.get(spec.address()) is None:
                first.put(compile_kernel(spec))
    compiling = time.perf_counter() - started
    with PersistentKernelCache.open(settings) as second:
        for spec in specs:
            second.get(spec.address())
        stats = second.stats()
    by_tier = {name: tier["hits"] for name, tier in stats["tiers"].items() if tier["hits"]}
    return stats["hit_rate"], by_tier, compiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "digits-cnn.yaml",
                        help="Recipe whose kernels the simulated runs look up (default recipes/digits-cnn.yaml).")
    parser.add_argument("--redis", default=os.environ.get("ESPER_REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres", default="postgresql://root@127.0.0.1:5432/test")
    parser.add_argument("--repeats", type=int, default=300, help="Timed lookups per tier (default 300).")
    args = parser.parse_args()

    blueprint = load_blueprint(BUILTIN_DIR / "lowrank_adapter.yaml").blueprint
    kernel = compile_kernel(KernelSpec(blueprint, HostSpec("linear", 64, 32), 8))
    plan = plan_compile(recipe=args.recipe)
    recipe = load_recipe(args.recipe)
    library = BlueprintLibrary.discover(args.recipe.parent / d for d in recipe.recipe.seeds.blueprint_dirs)
    blueprints = [library.get(name).blueprint for name in recipe.recipe.seeds.blueprints]
    specs = [t.spec(b) for b in blueprints for t in plan.targets if t.host.kind == b.host]

    redis_url = reachable_redis(args.redis)
    namespace = f"esper-bench-{uuid.uuid4().hex[:12]}"
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as root, postgres_schema(args.postgres) as postgres_url:
        workspace = Path(root)
        local = StorageSettings(workspace=workspace / "a", database_url=sqlite_url(workspace / "a"),
                                namespace=namespace)
        hits = {"memory": hit_ms(local, "memory", kernel, args.repeats * 10),
                "sql": hit_ms(local, "sql", kernel, args.repeats),
                "disk": hit_ms(local, "disk", kernel, args.repeats)}
        if redis_url:
            hits["redis"] = hit_ms(StorageSettings(workspace=workspace / "b", database_url=sqlite_url(workspace / "b"),
                                                   redis_url=redis_url, namespace=namespace),
                                   "redis", kernel, args.repeats)
        if postgres_url:
            hits["sql_postgresql"] = hit_ms(StorageSettings(workspace=workspace / "c", database_url=postgres_url),
                                            "sql", kernel, args.repeats)
        run_settings = StorageSettings(workspace=workspace / "run", database_url=postgres_url or
                                       sqlite_url(workspace / "run"), redis_url=redis_url, namespace=namespace)
        rate, served_by, compiling = rerun_hit_rate(run_settings, specs)
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(match=f"{namespace}:*"):
                client.delete(key)
    figures = {"hit_ms": hits, "targets_ms": TARGETS_MS, "kernel_bytes": sum(len(b) for b in kernel.files.values()),
               "rerun_hit_rate": rate, "rerun_hits_by_tier": served_by, "rerun_kernels": len(specs),
               "first_run_compile_s": compiling, "rerun_simulated": True, "recipe": str(args.recipe),
               "tiers_of_the_runs": ["memory", *(["redis"] if redis_url else []),
                                     "sql (postgresql)" if postgres_url else "sql (sqlite)", "disk"],
               "repeats": args.repeats, "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    print(f"{'tier':<16}{'hit ms (median)':>16}{'target ms':>12}")
    for name, value in hits.items():
        target = TARGETS_MS.get(name.split("_")[0])
        print(f"{name:<16}{value:>16.3f}{'-' if target is None else f'<= {target:g}':>12}")
    print(f"typical kernel: {figures['kernel_bytes']:,} bytes; {figures['cpus']} CPUs, "
          f"1-min load average {figures['load_average_1min']:.1f}")
    print(f"first run: {len(specs)} kernels compiled and stored in {compiling:.1f} s; second run served by "
          f"{served_by} (simulated: the trainer is not wired to the cache yet)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"rerun_hit_rate: {rate:.3f} ({len(specs)} kernel lookups of a second identical run)")


if __name__ == "__main__":
    main()
