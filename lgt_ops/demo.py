"""`lgt demo`: the whole pipeline on the bundled sample with embedded defaults, offline.

Store: a local directory; lineage: SQLite; models: the simulator on a free localhost port
(for any role without a configured endpoint). The release it publishes is marked simulated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lgt_ops.config import settings_from_env
from lgt_ops.params import RunParams
from lgt_ops.runctx import new_cli_run

SAMPLE = Path(__file__).parent / "sample"
SAMPLE_FILES = ("manifest.jsonl", "coco_objects.json")
DEMO_SOURCE = "sources/sample/"


def upload_sample(store, prefix: str = DEMO_SOURCE) -> int:  # noqa: ANN001 - ObjectStore
    """Copy the bundled images and metadata into `prefix` (unchanged files are skipped)."""
    files = [SAMPLE / name for name in SAMPLE_FILES] + sorted((SAMPLE / "images").iterdir())
    n = 0
    for path in files:
        key = prefix + path.relative_to(SAMPLE).as_posix()
        info = store.head(key)
        if info is None or info.size != path.stat().st_size:
            store.put(key, path.read_bytes())
            n += 1
    return n


def upload_benchmarks(store, prefix: str) -> int:  # noqa: ANN001 - ObjectStore
    """Copy the sample's tiny evaluation benchmark (copies of two sample photos, resized,
    re-encoded and cropped) into the decontamination prefix, so the demo rejects them."""
    root = SAMPLE / "benchmarks"
    n = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(root).as_posix()
        info = store.head(key)
        if info is None or info.size != path.stat().st_size:
            store.put(key, path.read_bytes())
            n += 1
    return n


def run_demo(reset: bool = False) -> int:
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig
    from lgt_ops.pipeline import run_local
    from lgt_ops.stages.base import StageEnv
    from lgt_ops.summary import print_summary

    os.environ.setdefault("LGT_DATA_DIR", str(Path(".lgt") / "demo"))
    settings = settings_from_env()
    if reset:
        import shutil

        shutil.rmtree(settings.data_dir, ignore_errors=True)
    missing = [role for role, ep in settings.endpoints.items() if not ep.base_url]
    sim = BackgroundSimulator(SimConfig(latency_ms=20)).start() if missing else None
    try:
        if sim is not None:
            roles = ", ".join(missing)
            print(
                f"simulator (a test double, not a model) for {roles} at {sim.base_url}",
                file=sys.stderr,
            )
            settings = settings.with_endpoint_urls({role: sim.base_url for role in missing})
        env = StageEnv.open(settings, new_cli_run("demo"))
        env.store.ensure_bucket()
        uploaded = upload_sample(env.store)
        if env.settings.decontam.prefix:
            uploaded += upload_benchmarks(env.store, env.settings.decontam.prefix)
        print(
            f"sample: {uploaded} file(s) uploaded to {env.store.url}/{DEMO_SOURCE}", file=sys.stderr
        )
        params = RunParams(
            source=DEMO_SOURCE,
            release_name="lgt-demo",
            k_rollouts=4,
            allow_simulated=sim is not None,
        )
        env = env.with_settings(params.apply(env.settings))
        summary = run_local(env, params)
        print_summary(env, params, summary)
        print(f"\nlineage database: {settings.database_url}")
        return 0
    finally:
        if sim is not None:
            sim.stop()
