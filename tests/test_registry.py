"""The stage registry: one class per stage, and everything else derived from `PIPELINE`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from lgt_ops import prompts, registry
from lgt_ops.config import ConfigError, MethodParams, settings_from_env
from lgt_ops.params import PARAM_SCHEMA, ParamsError, RunParams
from tests.conftest import ROOT


def _settings(**method: object):
    return settings_from_env({}).with_method(**method)


def _dependents(names: set[str]) -> set[str]:
    """The stages named and every stage downstream of them."""
    out = set(names)
    for stage in registry.PIPELINE:  # upstream stages come first
        if out & set(stage.upstream):
            out.add(stage.name)
    return out


def _other_value(info) -> object:
    default = info.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.1
    if isinstance(default, tuple):
        return default[:1] if len(default) > 1 else (*default, "x")
    choices = typing.get_args(info.annotation)  # a Literal: another of its values
    if default in choices:
        return next(c for c in choices if c != default)
    raise AssertionError(f"no other value for {default!r}")


FIELDS = sorted(registry.config_fields())


@pytest.mark.parametrize("field", FIELDS)
def test_a_config_field_changes_its_stages_fingerprints_and_their_dependents_only(field):
    _, info = registry.config_fields()[field]
    before = registry.fingerprints(_settings())
    after = registry.fingerprints(_settings(**{field: _other_value(info)}))
    owners = {s.name for s in registry.PIPELINE if field in s.Config.model_fields}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == _dependents(owners), field


def test_the_difficulty_thresholds_are_in_the_cot_fingerprint():
    before = registry.fingerprints(_settings())
    after = registry.fingerprints(_settings(easy_at_least=0.9))
    assert before["cot"] != after["cot"] and before["mcq"] == after["mcq"]


def test_a_prompt_text_edit_changes_that_stage_and_its_dependents(monkeypatch):
    real = prompts.load
    before = registry.fingerprints(_settings())

    def edited(prompt_id: str, version: str | None = None) -> prompts.PromptTemplate:
        t = real(prompt_id, version)
        if prompt_id != "cot":
            return t
        return prompts.PromptTemplate(t.id, t.version, t.sections, t.schema, "edited-text")

    monkeypatch.setattr(prompts, "load", edited)
    after = registry.fingerprints(_settings())
    changed = {name for name in before if before[name] != after[name]}
    assert changed == _dependents({"cot"})  # same id and version, other text


def test_the_model_changes_the_stages_of_its_role_and_their_dependents():
    s = _settings()
    eps = {**s.endpoints, "reasoner": s.endpoints["reasoner"].model_copy(update={"model": "m2"})}
    after = registry.fingerprints(s.model_copy(update={"endpoints": eps}))
    before = registry.fingerprints(s)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == _dependents({"expand"})


def test_unknown_settings_and_parameters_are_errors_naming_them():
    with pytest.raises(ConfigError, match="mcq_dedup_treshold"):
        settings_from_env({}).with_method(mcq_dedup_treshold=0.3)
    with pytest.raises(ValidationError, match="k_rolouts"):
        RunParams(k_rolouts=3)
    with pytest.raises(ParamsError, match="unknown parameter 'cot_temprature'"):
        RunParams.from_conf({"cot_temprature": 0.1})
    with pytest.raises(ParamsError, match="parameter 'easy_at_least'"):
        RunParams.from_conf({"easy_at_least": 2})


@pytest.mark.parametrize("knob", ["compose_operators", "expand_cues"])
def test_an_empty_list_knob_is_refused_in_the_merged_method_params(knob):
    # MethodParams inherits every stage config: each knob keeps its own check there.
    with pytest.raises(ValidationError, match="must not be empty"):
        MethodParams(**{knob: ()})


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"compose_operators": []}, "parameter 'compose_operators': [] should be non-empty"),
        ({"expand_cues": []}, "parameter 'expand_cues': [] should be non-empty"),
        ({"compose_operators": ["chain", "zip"]}, "parameter 'compose_operators': 'zip' is not"),
        ({"trace_min_chars": 500, "trace_max_chars": 200}, "trace_min_chars (500) must be below"),
        ({"trace_min_chars": 20_000}, "must be below trace_max_chars (12000)"),  # the default
        ({"easy_at_least": 0.2}, "hard_at_most (0.25) must be below easy_at_least (0.2)"),
    ],
)
def test_knob_values_a_stage_refuses_are_refused_at_trigger_time(conf, message):
    """Every rule of a stage config is checked by RunParams.from_conf (what the trigger guard
    and `start` run): the schema's, and the rules that span knobs."""
    with pytest.raises(ParamsError) as refused:
        RunParams.from_conf(conf)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    # Past the parameters (a setting applied in code), the same rule is a ConfigError: a
    # permanent failure, one line, exit 2, not a retried ValidationError.
    with pytest.raises(ConfigError, match="invalid method setting") as bad:
        settings_from_env({}).with_method(**conf)
    assert bad.value.permanent and bad.value.exit_code == 2 and "\n" not in bad.value.line()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("gs://bucket/images/", "gs:// is not read"),
        ("https://example.org/images/", "https:// is not read"),
        ("s3:///images/", "names no bucket"),
    ],
)
def test_a_source_that_names_nothing_readable_is_refused(source, message):
    with pytest.raises(ParamsError, match="parameter 'source'") as refused:
        RunParams.from_conf({"source": source})
    assert message in str(refused.value)
    for fine in ("sources/docci/", "s3://other-bucket/images/", "file:///data/images"):
        assert RunParams.from_conf({"source": fine}).source == fine


def test_the_compose_operators_knob_names_the_implemented_operators():
    from lgt_ops.composition import OPERATORS

    assert typing.get_args(registry.ComposeOperator) == OPERATORS
    assert MethodParams().compose_operators == OPERATORS


def test_every_method_knob_is_a_run_parameter_with_a_cli_option():
    from lgt_ops.cli import build_parser

    params = RunParams.from_conf({"cot_temperature": 0.2, "k_rollouts": 3})
    method = params.apply(_settings()).method
    assert (method.cot_temperature, method.cot_rollouts) == (0.2, 3)
    for field in FIELDS:
        name = "k_rollouts" if field == "cot_rollouts" else field
        assert name in PARAM_SCHEMA, field
    args = build_parser().parse_args(
        [
            "run",
            "--behaviour-tagger",
            "llm",
            "--expand-cues",
            "Wait,,Hmm,",
            "--easy-at-least",
            "0.8",
        ]
    )
    assert (args.behaviour_tagger, args.easy_at_least) == ("llm", 0.8)


_TOY = r"""
import json, sys
from pydantic import Field
from lgt_ops import registry


class ToyConfig(registry.StageConfig):
    toy_level: int = Field(default=3, ge=1)


class Toy(registry.Stage):
    name = "toy"
    role = "llm"
    template = "behaviours"
    upstream = ("filter",)
    Config = ToyConfig
    reply_tokens = 40_000  # more than the simulator's context: the preflight must say so
    structured = True

    @classmethod
    def plan(cls, env, spec, shard, sample_size):
        from lgt_ops.stages.runner import Plan, WorkItem
        return Plan(items=[WorkItem("toy-item", None, [])], considered=1)


registry.PIPELINE.insert(registry.PIPELINE.index(registry.Tag) + 1, Toy)

from lgt_ops import cli, params, pipeline
from lgt_ops.config import settings_from_env
from lgt_ops.env import StageEnv
from lgt_ops.runctx import new_cli_run

out = {"stages": list(params.STAGES), "form": params.PARAM_SCHEMA["stages"]["items"]["enum"]}
out["knob"] = params.PARAM_SCHEMA["toy_level"]["section"]
args = cli.build_parser().parse_args(["toy", "--toy-level", "5"])
settings = cli._params(args).apply(settings_from_env())
out["cli"] = [args.stage, settings.method.toy_level]
out["fingerprint_changes"] = (
    registry.fingerprints(settings)["toy"] != registry.fingerprints(settings_from_env())["toy"]
)
env = StageEnv.open(settings_from_env(), new_cli_run("test"))
env.show_progress = False
env.store.ensure_bucket()
env.store.put("sources/empty/placeholder.txt", b"nothing")
report = pipeline.dry_run_report(env, params.RunParams(source="sources/empty/"))
out["dry_run"] = report["stages"].get("toy")
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).get_dag("lgt_synthesis")
out["dag"] = {t.task_id: t.pool for t in dag.tasks if "toy" in t.task_id}
from lgt_ops.llm import needs, preflight
settings = settings_from_env()
(row,) = preflight.check(settings, ["toy"]).checks
out["preflight"] = [row.role, row.stages, row.needed_tokens, row.problem]
probe = preflight.probe_request(
    settings.endpoint("llm"), needs.role_needs(settings, ["toy"])["llm"], settings
)
out["probe_structured"] = probe.response_schema is not None
print(json.dumps(out))
"""


def test_a_toy_stage_is_one_class_and_one_registry_entry(airflow_db, tmp_path, sim):
    env = {**__import__("os").environ, "LGT_DATA_DIR": str(tmp_path / "lgt")}
    env["PYTHONPATH"] = str(ROOT)
    env["LGT_LLM_BASE_URL"] = sim.base_url  # the toy's endpoint, for the preflight
    done = subprocess.run(
        [sys.executable, "-c", _TOY, str(ROOT / "dags")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["stages"][-3:] == ["tag", "toy", "release"]
    assert "toy" in out["form"]
    assert out["knob"] == "Method: toy"
    assert out["cli"] == ["toy", 5]
    assert out["fingerprint_changes"]
    assert out["dry_run"]["ready_items"] == 1
    assert out["dag"] == {"shard_stages.toy": "lgt_llm"}
    # its needs (role, largest request, structured output) reach the preflight
    role, stages, needed, problem = out["preflight"]
    assert (role, stages) == ("llm", ["toy"])
    assert needed > 40_000
    assert f"toy stage sends requests of up to {needed} tokens" in problem
    assert out["probe_structured"]  # the probe asks for what the toy relies on


# -- the import graph -----------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """lgt_ops modules `path` imports, at the top or inside functions (not the type-only
    imports under `if TYPE_CHECKING:`, which never run)."""
    found = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules}


def test_the_lgt_ops_import_graph_has_no_cycle():
    paths = {_module_name(p): p for p in (ROOT / "lgt_ops").rglob("*.py")}
    graph = {m: _imports(path, set(paths)) - {m} for m, path in paths.items()}
    # a package's __init__ is not an edge to the package's modules' importers
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):  # a module inside package n importing n itself
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_lower_layers_import_no_stage():
    lower = ["sources.py", "annotations.py", "current.py", "airflow_adapter.py", "release"]
    for name in lower:
        for path in [ROOT / "lgt_ops" / name] if name.endswith(".py") else []:
            text = path.read_text()
            assert "lgt_ops.stages" not in text, path
        for path in (ROOT / "lgt_ops" / name).glob("*.py") if not name.endswith(".py") else []:
            assert "lgt_ops.stages" not in path.read_text(), path


def test_release_publish_honours_the_run_flags(tmp_path, sim, monkeypatch, capsys):
    from lgt_ops.cli import main
    from lgt_ops.env import StageEnv
    from lgt_ops.runctx import new_cli_run
    from tests.samples import upload_sample

    monkeypatch.setenv("LGT_DATA_DIR", str(tmp_path / "lgt"))
    for role in ("VLM", "LLM", "REASONER"):
        monkeypatch.setenv(f"LGT_{role}_BASE_URL", sim.base_url)
    store = StageEnv.open(settings_from_env(), new_cli_run("test")).store
    store.ensure_bucket()
    upload_sample(store, "sources/sample/")
    flags = ["--source", "sources/sample/", "--k-rollouts", "2", "--sample-size", "3"]
    stages = "ingest,annotate,mcq,blind,cot,compose,cot2,harden,expand,filter,pairs"
    assert main(["run", *flags, "--stages", stages]) == 0
    capsys.readouterr()
    assert main(["release", "publish", *flags, "--allow-simulated", "--release-name", "f"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    # made under k=2: without the flag, publish would look for k=10 outputs and find none
    assert rows["sft_stage1"] > 0 and rows["rl"] > 0, rows


def test_every_stage_names_the_tables_it_reads_and_writes_for_lineage():
    from lgt_ops.lineage_edges import TASK_TABLES

    assert set(registry.stage_names()) <= set(TASK_TABLES)  # a missing one fails its task


def test_the_blind_check_can_be_turned_off():
    from lgt_ops.dryrun import FanOut, fan_outs
    from lgt_ops.llm.needs import stage_needs

    off = _settings(blind_samples=0)
    assert registry.Blind.enabled(_settings()) and not registry.Blind.enabled(off)
    assert fan_outs(off)["blind"] == FanOut(0, 1)
    assert [n.stage for n in stage_needs(off, ["blind", "cot"])] == ["cot"]
