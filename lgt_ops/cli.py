"""The `lgt` command: every pipeline step, the simulator, releases, and the demo.

An expected failure (lgt_ops.failures) prints one line, `lgt: <what failed, which
item/endpoint, what to do>`, and exits with its code (README "Failures and exit codes");
tracebacks only with -v.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lgt_ops import failures
from lgt_ops.config import Settings, settings_from_env
from lgt_ops.params import PARAM_SCHEMA, SHARD_STAGES, RunParams
from lgt_ops.runctx import new_cli_run

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("lgt_ops.cli")
_OPENED: list[Any] = []  # StageEnvs this command opened; their pipeline runs close at exit


def _settings() -> Settings:
    return settings_from_env()


def _env(run_type: str = "cli"):  # noqa: ANN202 - StageEnv, imported lazily for a fast --help
    from lgt_ops.env import StageEnv

    env = StageEnv.open(_settings(), new_cli_run(run_type))
    _OPENED.append(env)
    return env


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- db / store ------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from lgt_ops.db import make_engine, upgrade
    from lgt_ops.db.engine import reaching
    from lgt_ops.db.migrate import current_version

    engine = make_engine(_settings().database_url)
    with reaching(engine):
        applied = upgrade(engine)
        version = current_version(engine)
    print(
        f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''};"
        f" schema version {version}"
    )
    return 0


def cmd_store_init(args: argparse.Namespace) -> int:
    from lgt_ops.storage import store_from_settings

    store = store_from_settings(_settings())
    store.ensure_bucket()
    print(f"store ready: {store.url}")
    return 0


# -- simulator -------------------------------------------------------------------------------
def cmd_sim_serve(args: argparse.Namespace) -> int:
    from lgt_ops.llm.simulator import SimConfig, serve

    overrides = {
        k: v for k, v in vars(args).items() if k in SimConfig.model_fields and v is not None
    }
    serve(args.host, args.port, SimConfig(**overrides))
    return 0


# -- endpoints -------------------------------------------------------------------------------
def cmd_endpoints_check(args: argparse.Namespace) -> int:
    """The run's preflight alone: print the table; a problem exits non-zero with one line."""
    from lgt_ops.llm import preflight
    from lgt_ops.storage import store_from_settings

    params = _params(args)
    settings = params.apply(_settings())
    store = store_from_settings(settings) if settings.image_spec.transport != "data_url" else None
    report = preflight.check(settings, params.stages, store)
    if args.json:
        _print(report.rows())
    elif report.checks:
        print(preflight.format_table(report.rows()))
        for line in report.warnings():
            print(line)
    else:
        print("the selected stages call no endpoint")
    report.raise_if_failed()
    return 0


# -- stages ----------------------------------------------------------------------------------
def _params(args: argparse.Namespace) -> RunParams:
    conf: dict[str, Any] = {}
    for name in PARAM_SCHEMA:
        value = getattr(args, name, None)
        if value is not None:
            conf[name] = value
    return RunParams.from_conf(conf)


def cmd_ingest(args: argparse.Namespace) -> int:
    from lgt_ops.stages import ingest

    env = _env()
    result, stats = ingest.ingest_all(env, args.source)
    _print({"scan": result.as_dict(), "ingest": stats.as_dict()})
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from lgt_ops.env import Shard
    from lgt_ops.pipeline import run_stage

    params = _params(args)
    env = _env().for_run(params)
    stats = run_stage(
        env,
        args.stage,
        params.model_copy(update={"stages": (args.stage,)}),
        Shard.parse(args.shard),
    )
    _print(stats.as_dict() if stats else {})
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lgt_ops.pipeline import run_local
    from lgt_ops.summary import print_summary

    params = _params(args)
    env = _env().for_run(params)
    summary = run_local(env, params)
    print_summary(env, params, summary)
    return 0


# -- releases --------------------------------------------------------------------------------
def cmd_release_publish(args: argparse.Namespace) -> int:
    from lgt_ops.pipeline import release

    params = _params(args).model_copy(update={"stages": ("release",)})
    env = _env().for_run(params)  # the fingerprints the run flags select, as `lgt run` had
    published = release(env, params)
    assert published is not None
    inc = published.manifest.get("incremental", {})
    _print(
        {
            "release": published.release_id,
            "uri": published.uri,
            "content_sha256": published.content_sha256,
            "rows": published.counts,
            "parts": {  # reused: copied unchanged from the previous version
                "written": inc.get("parts_written"),
                "reused": inc.get("parts_reused"),
            },
        }
    )
    return 0


def cmd_release_list(args: argparse.Namespace) -> int:
    from lgt_ops.release.manage import list_releases

    rows = list_releases(_env(), args.name)
    if args.json:
        _print(rows)
        return 0
    if not rows:
        print("no published release" + (f" named {args.name}" if args.name else ""))
    for r in rows:
        flags = ("latest " if r["latest"] else "") + ("SIMULATED" if r["simulated"] else "")
        counts = ", ".join(f"{k}={v}" for k, v in sorted(r["counts"].items()))
        print(f"{r['release_id']:<32} {r['created_at'][:19]}  {flags:<17} {counts}")
    return 0


def cmd_release_verify(args: argparse.Namespace) -> int:
    from lgt_ops.release.manage import verify

    result = verify(_env(), args.release_id)
    for problem in result.problems:
        print(f"FAIL {problem}")
    state = "ok" if result.ok else f"{len(result.problems)} problem(s)"
    print(
        f"{args.release_id}: {result.files_checked} file(s) checked against the manifest: {state}"
    )
    return failures.EXIT_OK if result.ok else failures.EXIT_VERIFY_FAILED


def cmd_release_validate(args: argparse.Namespace) -> int:
    from lgt_ops.release.quality import unjudged
    from lgt_ops.release.validate import validate

    report = validate(_env(), args.release_id)
    if args.json:
        _print({"release": args.release_id, **report.as_dict()})
    else:
        for f in report.figures:
            shown = f"{f.value:.4f}" if f.metric.endswith("_deviation") else f"{int(f.value)}"
            state = "ok  " if f.passed else "FAIL"
            limit = "not judged" if unjudged(f.metric, f.max_allowed) else f"max {f.max_allowed:g}"
            print(
                f"{state} {f.metric:<24} {f.scope:<18} {shown:>8} ({limit}, n={f.n})"
                + (f": {f.detail}" if f.detail else "")
            )
        state = "ok" if report.ok else f"{len(report.failed)} check(s) failed"
        print(f"{args.release_id}: {len(report.figures)} quality check(s): {state}")
    return failures.EXIT_OK if report.ok else failures.EXIT_VERIFY_FAILED


def cmd_release_diff(args: argparse.Namespace) -> int:
    from lgt_ops.release.manage import diff

    d = diff(_env(), args.a, args.b).as_dict()
    if not args.ids:
        d.pop("added_ids")
        d.pop("removed_ids")
    if args.json:
        _print(d)
        return 0
    print(f"{args.a} -> {args.b}")
    print(f"{'split':<20}{'rows a':>8}{'rows b':>8}{'added':>8}{'removed':>9}")
    for split, n in d["rows"].items():
        print(f"{split:<20}{n['a']:>8}{n['b']:>8}{d['added'][split]:>8}{d['removed'][split]:>9}")
    for kind, values in d["questions"].items():
        changed = {v: n for v, n in values.items() if n["a"] != n["b"]}
        detail = ", ".join(f"{v}: {n['a']} -> {n['b']}" for v, n in changed.items()) or "same"
        print(f"questions by {kind}: {detail}")
    for split, ids in d.get("added_ids", {}).items():
        for row_id in ids:
            print(f"+ {split} {row_id}")
    for split, ids in d.get("removed_ids", {}).items():
        for row_id in ids:
            print(f"- {split} {row_id}")
    return 0


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from lgt_ops.demo import run_demo

    return run_demo(reset=args.reset)


# -- parser ----------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _kind(schema: dict[str, Any]) -> str:
    types = schema.get("type", "string")
    types = [types] if isinstance(types, str) else types
    return next((t for t in types if t != "null"), "string")


def _add_param(p: argparse.ArgumentParser, name: str, schema: dict[str, Any]) -> None:
    """One CLI option from a run parameter's schema (every parameter has one)."""
    flag, kind = f"--{name.replace('_', '-')}", _kind(schema)
    help_text = schema.get("description", "").replace("%", "%%")
    if kind == "boolean" and schema.get("default") is False:
        p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        return
    convert: Any = {
        "integer": int,
        "number": float,
        "array": _csv,
        "boolean": lambda s: s.lower() in ("1", "true", "yes"),
    }.get(kind, str)
    enum = [v for v in schema.get("enum", []) if v is not None] or None
    if kind == "array":
        help_text += " (comma-separated)"
    p.add_argument(flag, dest=name, type=convert, choices=enum, help=help_text)


def _add_run_params(p: argparse.ArgumentParser, *, stages: bool = True) -> None:
    """The run parameters as options, generated from PARAM_SCHEMA (the form's source)."""
    for name, schema in PARAM_SCHEMA.items():
        if name in ("stages", "dry_run") and not stages:
            continue
        _add_param(p, name, schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lgt", description="LGT-ETL: grounded visual reasoning data"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_store_commands(sub)
    _add_sim_command(sub)
    _add_endpoints_command(sub)
    _add_pipeline_commands(sub)
    _add_release_commands(sub)
    demo = sub.add_parser("demo", help="the whole pipeline on the bundled sample, offline")
    demo.add_argument("--reset", action="store_true", help="start from an empty demo directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def _add_store_commands(sub: Subparsers) -> None:
    """`lgt db upgrade` and `lgt store init`."""
    db = sub.add_parser("db", help="lineage database").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply pending migrations").set_defaults(func=cmd_db_upgrade)

    store = sub.add_parser("store", help="object store").add_subparsers(
        dest="store_cmd", required=True
    )
    store.add_parser("init", help="create the bucket if missing").set_defaults(func=cmd_store_init)


def _add_sim_command(sub: Subparsers) -> None:
    """`lgt sim serve`, one option per simulator setting."""
    sim = sub.add_parser("sim", help="the OpenAI-compatible simulator (a test double)")
    simsub = sim.add_subparsers(dest="sim_cmd", required=True)
    serve = simsub.add_parser("serve", help="serve /v1/chat/completions")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    from lgt_ops.llm.simulator.config import SimConfig

    for name, field in SimConfig.model_fields.items():
        kind = field.annotation if field.annotation in (int, float, bool) else str
        if kind is bool:
            serve.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                type=lambda s: s.lower() in ("1", "true", "yes"),
            )
        else:
            serve.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    serve.set_defaults(func=cmd_sim_serve)


def _add_endpoints_command(sub: Subparsers) -> None:
    eps = sub.add_parser("endpoints", help="model endpoints").add_subparsers(
        dest="endpoints_cmd", required=True
    )
    chk = eps.add_parser(
        "check",
        help="preflight: check the endpoints the selected stages need (model, context,"
        " image input, structured output, thinking)",
    )
    _add_run_params(chk)
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(func=cmd_endpoints_check)


def _add_pipeline_commands(sub: Subparsers) -> None:
    """`lgt ingest`, one subcommand per shard stage (from the registry), `lgt run`."""
    ing = sub.add_parser("ingest", help="scan a source prefix and ingest new or changed images")
    ing.add_argument("--source")
    ing.set_defaults(func=cmd_ingest)

    for stage in SHARD_STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage on one shard")
        _add_run_params(p, stages=False)
        p.add_argument("--shard", default="0/1", help="INDEX/COUNT (default 0/1: all images)")
        p.set_defaults(func=cmd_stage, stage=stage)

    run = sub.add_parser("run", help="run the pipeline end to end in this process")
    _add_run_params(run)
    run.set_defaults(func=cmd_run)


def _add_release_commands(sub: Subparsers) -> None:
    rel = sub.add_parser("release", help="publish and manage releases")
    relsub = rel.add_subparsers(dest="release_cmd", required=True)
    pub = relsub.add_parser("publish", help="publish the current outputs as a new version")
    _add_run_params(pub, stages=False)
    pub.set_defaults(func=cmd_release_publish)
    lst = relsub.add_parser("list", help="published releases, newest first")
    lst.add_argument("--name", help="only releases of this name")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_release_list)
    ver = relsub.add_parser("verify", help="re-hash every file of a release against its manifest")
    ver.add_argument("release_id", help="NAME/VERSION")
    ver.set_defaults(func=cmd_release_verify)
    val = relsub.add_parser(
        "validate", help="measure a release's quality figures again; exit 1 if any check fails"
    )
    val.add_argument("release_id", help="NAME/VERSION")
    val.add_argument("--json", action="store_true")
    val.set_defaults(func=cmd_release_validate)
    dif = relsub.add_parser("diff", help="rows added/removed and question mix between releases")
    dif.add_argument("a", help="NAME/VERSION (older)")
    dif.add_argument("b", help="NAME/VERSION (newer)")
    dif.add_argument("--ids", action="store_true", help="list every added/removed row id")
    dif.add_argument("--json", action="store_true")
    dif.set_defaults(func=cmd_release_diff)


def _close_runs(status: str, detail: str | None = None) -> None:
    """Close the pipeline run this command opened, if it made one and left it running."""
    from lgt_ops.runs import close_pipeline_run

    for env in _OPENED:
        try:
            close_pipeline_run(env, status, detail)
        except Exception:  # noqa: BLE001 - e.g. the lineage DB is what failed
            log.debug("could not close run %s", env.run.run_id, exc_info=True)
    _OPENED.clear()


def _report(exc: BaseException, verbose: bool) -> int:
    """One line on stderr for `exc` (a traceback too with -v); the exit code."""
    if verbose:
        traceback.print_exception(exc)
    failure = failures.describe(exc)
    if failure is None:
        what = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        print(f"lgt: unexpected error: {what}; run with -v for the traceback", file=sys.stderr)
        return failures.EXIT_INTERNAL
    print(f"lgt: {failure.line()}", file=sys.stderr)
    return failure.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Progress lines off a terminal are INFO records (lgt_ops.progress): keep them.
        logging.getLogger("lgt_ops.progress").setLevel(logging.INFO)
    try:
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:
        _close_runs("failed", "interrupted")
        return failures.EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends as one line and an exit code
        _close_runs("failed", " ".join(str(exc).split())[:4000] or type(exc).__name__)
        return _report(exc, args.verbose)
    _close_runs("success" if code == 0 else "failed")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
