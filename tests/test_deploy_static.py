"""Static checks of the deployment artefacts (no Docker engine, no helm binary, no network).

Covers the Dockerfile and .dockerignore, docker-compose.yml and deploy/, the Helm chart in
helm/lgt-etl (Chart.yaml, values.yaml vs values.schema.json, templates) and docs/deploy.md.
Everything here is a file read plus parsing; the chart is also rendered, by a small Go-template
interpreter (tests/gotemplate.py), to check what it produces. The module runs in about 2 s.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from lgt_ops.config import endpoint_from_env
from tests.gotemplate import Chart, TemplateError, parse

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "lgt-etl"
TEMPLATES = CHART / "templates"
DOCS = ROOT / "docs" / "deploy.md"

# The `lgt` subcommands that exist. The lead keeps this list true to lgt_ops/cli.py; every
# `lgt X Y` invoked by compose or Helm must be one of them.
KNOWN_LGT_COMMANDS = {"db upgrade", "sim serve", "store init"}

ROLES = ("vlm", "llm", "reasoner")
CONNECTION_IDS = ("LGT_S3", "LGT_POSTGRES", "LGT_VLM", "LGT_LLM", "LGT_REASONER")
POOLS = {"lgt_vlm", "lgt_llm", "lgt_reasoner"}
LGT_ENV = {
    "LGT_DATABASE_URL",
    "LGT_STORE_URL",
    "LGT_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "LGT_SOURCE_PREFIX",
    "LGT_RELEASE_NAME",
} | {
    f"LGT_{r.upper()}_{k}" for r in ROLES for k in ("BASE_URL", "MODEL", "API_KEY", "MAX_INFLIGHT")
}
DEFAULT_MODELS = {
    "vlm": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llm": "Qwen/Qwen2.5-7B-Instruct",
    "reasoner": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
}
AIRFLOW_IMAGE = "apache/airflow:3.3.2-python3.11"
DAGS_FOLDER = "/opt/airflow/dags"
PLUGINS_FOLDER = "/opt/airflow/plugins"
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
CELERY_SERVICES = {"redis", "airflow-worker"}
ONE_SHOT_SERVICES = {"minio-init", "airflow-init"}

# `lgt X Y` as a shell word sequence or as an exec-form list: "lgt", "X", "Y".
LGT_CMD_RE = re.compile(
    r"""(?:^|[\s"'\[,;&|(`])lgt["']?(?:\s*,\s*["']|\s+)([a-z][a-z0-9-]*)["']?(?:\s*,\s*["']|\s+)"""
    r"""([a-z][a-z0-9-]*)(?=["'\s,\]`;)]|$)""",
    re.MULTILINE,
)
# ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:?x}, ${VAR?x}, $VAR (but not the $$ escape).
INTERP_RE = re.compile(
    r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose-style interpolation using defaults (and `env`), then unescape $$."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return default
        return ""

    return INTERP_RE.sub(sub, text).replace("$$", "$")


def _parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def _as_list(cmd) -> list[str]:
    if cmd is None:
        return []
    return [cmd] if isinstance(cmd, str) else [str(c) for c in cmd]


def _lgt_commands(text: str) -> set[str]:
    return {f"{a} {b}" for a, b in LGT_CMD_RE.findall(text)}


@pytest.fixture(scope="module")
def compose_raw() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def compose(compose_raw) -> dict:
    return yaml.safe_load(compose_raw)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _parse_env_file(DEPLOY / "env.example")


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------
# Dockerfile / .dockerignore
# ------------------------------------------------------------------------------------------
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def _copy_pairs() -> list[tuple[list[str], str]]:
    pairs = []
    for op, rest in _dockerfile_instructions():
        if op != "COPY":
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        pairs.append((args[:-1], args[-1]))
    return pairs


def test_dockerfile_base_image_and_install():
    ins = _dockerfile_instructions()
    froms = [rest for op, rest in ins if op == "FROM"]
    assert froms == [AIRFLOW_IMAGE], froms
    user = "airflow"  # the official image's default user
    pip_runs = []
    for op, rest in ins:
        if op == "USER":
            user = rest
        if op == "RUN" and "pip install" in rest:
            pip_runs.append((user, rest))
    assert len(pip_runs) == 1, pip_runs
    user, cmd = pip_runs[0]
    assert user == "airflow", "pip must run as the airflow user (official image rules)"
    for needle in ("--no-cache-dir", "--constraint constraints/py311.txt", '".[openlineage]"'):
        assert needle in cmd, needle
    # Airflow pinned to the base image's own version in the same install, with the postgres
    # extra (asyncpg/psycopg for the metadata DB) and the celery extra (the workers' executor
    # at the versions the Celery test ran).
    assert '"apache-airflow[postgres,celery]==${AIRFLOW_VERSION}"' in cmd
    # The installed package (not the source tree) must find its prompts and migrations.
    assert "cd / && python -c" in cmd and "discover('postgresql')" in cmd
    constraints = (ROOT / "constraints" / "py311.txt").read_text()
    assert re.search(r"^apache-airflow==3\.3\.2$", constraints, re.M), "constraints pin != image"


def test_dockerfile_copy_destinations():
    dests = {tuple(src): dst for src, dst in _copy_pairs()}
    assert dests[("dags/",)] == DAGS_FOLDER + "/"
    assert dests[("plugins/",)] == PLUGINS_FOLDER + "/"
    # sql/ is built into the package (setup.py): it sits beside lgt_ops/ in the build folder.
    assert dests[("sql/",)] == "sql/"
    srcs = {s for src, _ in _copy_pairs() for s in src}
    for needed in ("pyproject.toml", "setup.py", "README.md", "constraints/py311.txt", "lgt_ops/"):
        assert needed in srcs, needed
    # The package is copied before it is installed, the DAGs after (layer caching).
    order = [op + " " + rest for op, rest in _dockerfile_instructions()]
    i_pip = next(i for i, s in enumerate(order) if "pip install" in s)
    i_ops = next(i for i, s in enumerate(order) if s.startswith("COPY") and "lgt_ops/" in s)
    i_sql = next(i for i, s in enumerate(order) if s.startswith("COPY") and " sql/" in s)
    i_dags = next(i for i, s in enumerate(order) if s.startswith("COPY") and "dags/" in s)
    assert i_ops < i_pip < i_dags and i_sql < i_pip


def test_dockerfile_copy_sources_exist():
    """dags/, plugins/, sql/ and README.md are the code side's: this fails until they exist."""
    missing = [s for src, _ in _copy_pairs() for s in src if not (ROOT / s).exists()]
    assert not missing, f"Dockerfile COPY sources missing from the repo: {missing}"
    # git keeps no empty folder: a fresh clone (CI, docker build) would lack it.
    empty = [
        s
        for src, _ in _copy_pairs()
        for s in src
        if (ROOT / s).is_dir() and not any(p.is_file() for p in (ROOT / s).rglob("*"))
    ]
    assert not empty, f"COPY source folders with no file (add e.g. a .gitkeep): {empty}"


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.strip("/")
        hit = False
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pat) and (
                pat.count("/") == cand.count("/") or "**" in pat
            ):
                hit = True
            if pat.startswith("**/") and fnmatch.fnmatchcase(cand.split("/")[-1], pat[3:]):
                hit = True
        if hit:
            excluded = not neg
    return excluded


def test_dockerignore_keeps_copy_sources_and_drops_the_rest():
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for src, _ in _copy_pairs():
        for s in src:
            assert not _dockerignore_excludes(s, patterns), (
                f".dockerignore excludes COPY source {s}"
            )
            assert not _dockerignore_excludes(s.rstrip("/") + "/x.py", patterns), s
    for junk in (
        ".venv",
        ".git",
        "tests",
        "bench",
        "lgt_etl.egg-info",
        "lgt_ops/__pycache__/x.pyc",
        ".env",
    ):
        assert _dockerignore_excludes(junk, patterns), f".dockerignore lets {junk} into the context"


def test_pyproject_provides_lgt_and_openlineage_extra():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^lgt\s*=\s*"lgt_ops\.cli:main"', text, re.M)
    assert re.search(r"^openlineage\s*=", text, re.M)


# ------------------------------------------------------------------------------------------
# docker-compose.yml
# ------------------------------------------------------------------------------------------
def test_compose_depends_on_targets_and_conditions(services):
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long depends_on form with conditions"
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") in DEPENDS_CONDITIONS, f"{name}->{target}: {spec}"
            if target in ONE_SHOT_SERVICES:
                assert spec["condition"] == "service_completed_successfully", (name, target)
            elif spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for healthy {target}"


def test_compose_named_volumes_declared(services, compose):
    declared = set((compose.get("volumes") or {}).keys())
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = _interpolate(vol if isinstance(vol, str) else vol.get("source", "")).split(":")[0]
            if not src or src.startswith((".", "/", "~")):
                continue
            assert src in declared, f"{name}: volume {src} not declared"
            used.add(src)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_compose_healthchecks_and_one_shots(services):
    one_shots = {n for n, s in services.items() if str(s.get("restart", "")).strip() == "no"}
    assert one_shots == ONE_SHOT_SERVICES
    for name, svc in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), (name, test)


def test_compose_interpolations_are_documented(compose_raw, env_example):
    text = "\n".join(ln for ln in compose_raw.splitlines() if not ln.lstrip().startswith("#"))
    found = {}
    for m in INTERP_RE.finditer(text):
        name = m.group(1) or m.group(4)
        found.setdefault(name, set()).add(m.group(2))
    assert found, "no interpolation found?"
    without_default = {n for n, ops in found.items() if ops & {None, ":?", "?"}}
    assert not (without_default - set(env_example)), (
        f"undocumented required vars: {without_default}"
    )
    undocumented = set(found) - set(env_example)
    assert not undocumented, f"variables missing from deploy/env.example: {sorted(undocumented)}"
    unused = set(env_example) - set(found)
    assert not unused, f"deploy/env.example documents unused variables: {sorted(unused)}"
    gpu = _parse_env_file(DEPLOY / "env.gpu.example")
    assert not (set(gpu) - set(found)), (
        f"env.gpu.example sets unknown vars: {set(gpu) - set(found)}"
    )
    celery = set(_parse_env_file(DEPLOY / "env.celery.example")) - {"COMPOSE_PROFILES"}
    assert not (celery - set(found)), f"env.celery.example sets unknown vars: {celery - set(found)}"


def test_compose_gpu_services_only_in_gpu_profile(services):
    gpu_services = set()
    for name, svc in services.items():
        devices = (
            ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
        ).get("devices")
        is_gpu = bool(devices) or "vllm" in str(svc.get("image", ""))
        if is_gpu:
            gpu_services.add(name)
            assert svc.get("profiles") == ["gpu"], f"{name} must be in profile gpu only"
            assert (
                devices
                and devices[0].get("driver") == "nvidia"
                and "gpu" in devices[0]["capabilities"]
            )
            assert svc.get("ipc") == "host" or svc.get("shm_size"), name
        elif name in CELERY_SERVICES:
            assert svc.get("profiles") == ["celery"], f"{name} must be in profile celery only"
        else:
            assert "profiles" not in svc, f"{name} must run in the default profile"
    assert gpu_services == {"vllm-vlm", "vllm-reasoner"}
    for name, svc in services.items():
        profiles = set(svc.get("profiles") or [])
        deps = svc.get("depends_on") or {}
        for target in deps:
            if set(services[target].get("profiles") or []) - profiles:
                # Without its profile the target does not exist: only a soft dependency
                # (required: false, Compose >= 2.20) keeps `docker compose up` valid.
                assert deps[target].get("required") is False, f"{name} -> {target}"


def test_compose_task_runners_wait_for_healthy_vllm(services):
    """With --profile gpu, the scheduler (LocalExecutor: it runs the tasks) starts only once
    both vLLM servers answer /health."""
    deps = services["airflow-scheduler"]["depends_on"]
    for target in ("vllm-vlm", "vllm-reasoner"):
        assert deps[target] == {"condition": "service_healthy", "required": False}, target
        assert "localhost:8000/health" in " ".join(services[target]["healthcheck"]["test"])
    executor = services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"]
    assert _interpolate(executor) == "LocalExecutor"
    # Under CeleryExecutor the workers run the tasks: they wait for the same servers.
    deps = services["airflow-worker"]["depends_on"]
    for target in ("vllm-vlm", "vllm-reasoner"):
        assert deps[target] == {"condition": "service_healthy", "required": False}, target
    for target in ("lgt-sim", "airflow-apiserver"):
        assert deps[target]["condition"] == "service_healthy", target


def test_compose_celery_profile(compose, services, env_example):
    """`--profile celery` with deploy/env.celery.example: Redis, worker replicas, and the same
    executor for every Airflow component; the default profile keeps LocalExecutor."""
    from lgt_ops.params import TASK_TIMEOUT_MINUTES

    celery_env = _parse_env_file(DEPLOY / "env.celery.example")
    assert celery_env["COMPOSE_PROFILES"] == "celery"
    assert celery_env["AIRFLOW_EXECUTOR"] == "CeleryExecutor"
    assert env_example["AIRFLOW_EXECUTOR"] == "LocalExecutor"
    common = compose["x-airflow-common"]["environment"]
    assert _interpolate(common["AIRFLOW__CORE__EXECUTOR"], celery_env) == "CeleryExecutor"
    for name in AIRFLOW_SERVICES:  # one executor setting, shared through the anchor
        assert (
            services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"]
            == (common["AIRFLOW__CORE__EXECUTOR"])
        )
    assert common["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
    backend = _interpolate(common["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert backend.startswith("db+postgresql://") and "@postgres:5432/airflow" in backend
    # A message unacknowledged for this long goes to another worker: it must outlast the
    # longest task, or a healthy task would run twice.
    visibility = int(common["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"])
    assert visibility > 60 * max(TASK_TIMEOUT_MINUTES.values())
    assert "AIRFLOW_CELERY_WORKER_CONCURRENCY" in common["AIRFLOW__CELERY__WORKER_CONCURRENCY"]
    assert "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT" in common

    redis = services["redis"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    worker = services["airflow-worker"]
    assert _as_list(worker["command"]) == ["celery", "worker"]
    assert _interpolate(str(worker["deploy"]["replicas"]), celery_env) == "2"
    assert "celery@$${HOSTNAME}" in " ".join(worker["healthcheck"]["test"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["airflow-scheduler"]["depends_on"]["redis"] == {
        "condition": "service_healthy",
        "required": False,
    }


def test_compose_vllm_args(services):
    for name, role in (("vllm-vlm", "VLM"), ("vllm-reasoner", "REASONER")):
        svc = services[name]
        assert _as_list(svc["entrypoint"]) == ["vllm", "serve"]
        cmd = [_interpolate(c) for c in _as_list(svc["command"])]
        model = DEFAULT_MODELS[role.lower()]
        assert cmd[0] == model and cmd[cmd.index("--served-model-name") + 1] == model
        assert "--max-model-len" in cmd and "--enable-prefix-caching" in cmd
        assert f"LGT_{role}_MODEL" in " ".join(_as_list(svc["command"]))
        assert any("/root/.cache/huggingface" in v for v in svc["volumes"])
        assert "localhost:8000/health" in " ".join(svc["healthcheck"]["test"])
    assert any(
        c.startswith("--limit-mm-per-prompt") for c in _as_list(services["vllm-vlm"]["command"])
    )
    assert "--reasoning-parser" in _as_list(services["vllm-reasoner"]["command"])


def test_compose_reasoner_tensor_parallel(services, env_example):
    """The 32B reasoner needs tensor parallelism: the TP size is a setting (default 1, the 7B
    default model) and the reasoner's GPU list is a setting too, documented together."""
    raw = _as_list(services["vllm-reasoner"]["command"])
    tp = raw[raw.index("--tensor-parallel-size") + 1]
    assert tp == "${VLLM_REASONER_TENSOR_PARALLEL_SIZE:-1}", tp
    assert env_example["VLLM_REASONER_TENSOR_PARALLEL_SIZE"] == "1"
    devices = services["vllm-reasoner"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["${VLLM_REASONER_GPU:-1}"]
    gpu_text = (DEPLOY / "env.gpu.example").read_text()
    assert "# VLLM_REASONER_TENSOR_PARALLEL_SIZE=2" in gpu_text
    assert "# VLLM_REASONER_GPU=1,2" in gpu_text


def test_compose_airflow_services_share_the_anchor(compose, compose_raw, services):
    common = compose["x-airflow-common"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        for key, value in common.items():
            assert env.get(key) == value, f"{name}: {key} differs from x-airflow-common"
        block = compose_raw.split(f"\n  {name}:\n", 1)[1].split("\n  ", 1)[0]
        assert "<<: *airflow-common" in block, f"{name} does not merge *airflow-common"
    assert (
        common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
        == "http://airflow-apiserver:8080/execution/"
    )
    assert common["AIRFLOW__API_AUTH__JWT_SECRET"], "components must share a JWT secret"
    assert not (LGT_ENV - set(common)), f"missing LGT env: {LGT_ENV - set(common)}"
    assert _as_list(services["airflow-apiserver"]["command"]) == ["api-server"]
    assert _as_list(services["airflow-scheduler"]["command"]) == ["scheduler"]
    assert _as_list(services["airflow-dag-processor"]["command"]) == ["dag-processor"]
    assert _as_list(services["airflow-triggerer"]["command"]) == ["triggerer"]
    deps = services["airflow-init"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["condition"] == "service_completed_successfully"
    for name in AIRFLOW_SERVICES[1:]:
        assert (
            services[name]["depends_on"]["airflow-init"]["condition"]
            == "service_completed_successfully"
        )


def test_compose_connections_are_valid_json(compose):
    common = compose["x-airflow-common"]["environment"]
    conns = {}
    for cid in CONNECTION_IDS:
        raw = common.get(f"AIRFLOW_CONN_{cid}")
        assert raw, f"AIRFLOW_CONN_{cid} not defined"
        conns[cid] = json.loads(_interpolate(raw))
    s3 = conns["LGT_S3"]
    assert s3["conn_type"] == "aws" and s3["login"] and s3["password"]
    assert s3["extra"] == {
        "endpoint_url": "http://minio:9000",
        "region_name": "us-east-1",
        "bucket": "lgt",
    }
    pg = conns["LGT_POSTGRES"]
    assert pg["conn_type"] == "postgres" and pg["host"] == "postgres" and pg["port"] == 5432
    assert pg["schema"] == "lgt" and pg["login"] and pg["password"]
    for role in ROLES:
        c = conns[f"LGT_{role.upper()}"]
        assert c["conn_type"] == "openai" and c["host"] == "http://lgt-sim:8000/v1"
        assert c["extra"]["model"] == DEFAULT_MODELS[role]
        assert isinstance(c["extra"]["max_inflight"], int) and c["extra"]["max_inflight"] > 0
    # The GPU env file switches endpoints to the vLLM services of the gpu profile.
    gpu = _parse_env_file(DEPLOY / "env.gpu.example")
    for role in ROLES:
        c = json.loads(_interpolate(common[f"AIRFLOW_CONN_LGT_{role.upper()}"], gpu))
        assert c["host"].startswith("http://vllm-"), (role, c["host"])
    assert gpu["LGT_LLM_MODEL"] == gpu["LGT_VLM_MODEL"], "LLM role shares vllm-vlm: same model id"


def test_compose_lgt_commands_are_real(services, compose_raw):
    used = set()
    for svc in services.values():
        text = " ".join(_as_list(svc.get("entrypoint")) + _as_list(svc.get("command")))
        used |= _lgt_commands(text)
    assert used <= KNOWN_LGT_COMMANDS, used - KNOWN_LGT_COMMANDS
    assert used >= {"db upgrade", "sim serve", "store init"}, "the contract's commands must be used"
    assert _lgt_commands(compose_raw) <= KNOWN_LGT_COMMANDS
    sim = services["lgt-sim"]
    assert _as_list(sim["command"])[:3] == ["lgt", "sim", "serve"]
    assert "localhost:8000/health" in " ".join(sim["healthcheck"]["test"])
    init = " ".join(_as_list(services["airflow-init"]["command"]))
    assert init.index("airflow db migrate") < init.index("lgt db upgrade")
    assert sorted(re.findall(r"airflow pools set (\w+)", init)) == sorted(POOLS)


def test_compose_dags_folder_lines_up(compose, services):
    common = compose["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__DAGS_FOLDER"] == DAGS_FOLDER
    assert common["AIRFLOW__CORE__PLUGINS_FOLDER"] == PLUGINS_FOLDER
    for name in AIRFLOW_SERVICES:
        targets = {_interpolate(v).split(":")[1] for v in services[name]["volumes"]}
        assert DAGS_FOLDER in targets and PLUGINS_FOLDER in targets, name
        srcs = {_interpolate(v).split(":")[0] for v in services[name]["volumes"]}
        assert "./dags" in srcs and "./plugins" in srcs


def test_compose_postgres_init_creates_lineage_db(services):
    pg = services["postgres"]
    assert pg["environment"]["POSTGRES_DB"] == "airflow"
    mounts = {_interpolate(v).split(":")[1]: _interpolate(v).split(":")[0] for v in pg["volumes"]}
    init_dir = ROOT / mounts["/docker-entrypoint-initdb.d"]
    sql = "\n".join(p.read_text() for p in sorted(init_dir.glob("*.sql")))
    assert re.search(r"CREATE DATABASE lgt\b", sql)
    assert "PASSWORD" not in sql.upper(), "no credentials in init SQL"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "mc mb" in " ".join(_as_list(services["minio-init"]["command"]))


# ------------------------------------------------------------------------------------------
# Helm chart
# ------------------------------------------------------------------------------------------
SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$")


def test_chart_yaml_and_airflow_dependency():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "lgt-etl"
    assert SEMVER.match(str(chart["version"])) and chart.get("appVersion")
    deps = {d["name"]: d for d in chart["dependencies"]}
    af = deps["airflow"]
    assert af["repository"] == "https://airflow.apache.org"
    assert af["condition"] == "airflow.enabled"
    major, minor, _ = (int(x) for x in str(af["version"]).split("."))
    assert (major, minor) >= (1, 18), "needs an official chart release that supports Airflow 3"
    assert not (CHART / "charts").exists() and not (CHART / "Chart.lock").exists(), (
        "no vendored deps"
    )


def test_values_validate_against_schema(values, schema):
    jsonschema.Draft7Validator.check_schema(schema)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
    assert not errors, [e.message for e in errors]


def _helm_merge(base, override):
    """Helm's coalescing for a -f file: maps merge, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _helm_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.mark.parametrize("example", sorted(p.name for p in (CHART / "examples").glob("*.yaml")))
def test_example_overrides_validate(values, schema, example):
    override = yaml.safe_load((CHART / "examples" / example).read_text())
    merged = _helm_merge(values, override)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(merged))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def _break(values, path, value):
    broken = copy.deepcopy(values)
    node = broken
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return broken


@pytest.mark.parametrize(
    "path,value",
    [
        (("vllm", "models", 0, "role"), "foo"),
        (("vllm", "models", 0, "gpus"), "1"),
        (("vllm", "models", 1, "replicas"), "2"),
        (("vllm", "models", 0, "name"), "Not_DNS"),
        (("vllm", "enabled"), "yes"),
        (("connections", "endpoints", "llm", "maxInflight"), 0),
        (("connections", "endpoints", "reasoner"), KeyError),
        (("connections", "endpoints", "vlm", "baseUrl"), "vllm:8000"),
        (("lineageDatabase", "port"), "5432"),
        (("lineageDatabase", "embedded", "enabled"), False),  # external without a host
        (("objectStore", "bucket"), "Bad_Bucket"),
        (("objectStore", "minio", "rootPassword"), "short"),
        (("pools", "items", 0, "slots"), "4"),
        (("simulator", "enabled"), "true"),
        (("image", "tag"), KeyError),
        (("unknownTopLevelKey",), 1),
    ],
)
def test_schema_rejects_broken_values(values, schema, path, value):
    broken = _break(values, path, value)
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), (
        f"schema accepted {path}={value!r}"
    )


def test_values_consistency(values):
    assert values["airflow"]["images"]["airflow"] == values["image"], "one project image"
    assert (
        values["airflow"]["airflowVersion"] == "3.3.2" == AIRFLOW_IMAGE.split(":")[1].split("-")[0]
    )
    assert "{{ .Release.Name }}-lgt-connections" in values["airflow"]["extraEnvFrom"]
    assert values["airflow"]["dags"]["gitSync"]["enabled"] is False
    assert values["airflow"]["dags"]["persistence"]["enabled"] is False
    eps = values["connections"]["endpoints"]
    assert {r: eps[r]["model"] for r in ROLES} == DEFAULT_MODELS
    models = {m["role"]: m for m in values["vllm"]["models"]}
    assert {r: models[r]["model"] for r in ROLES} == DEFAULT_MODELS
    assert "--reasoning-parser" in models["reasoner"]["args"]
    assert any(a.startswith("--limit-mm-per-prompt") for a in models["vlm"]["args"])
    # Pools: the same names and default slots in values, deploy/pools.json and compose.
    pools_json = json.loads((DEPLOY / "pools.json").read_text())
    assert set(pools_json) == POOLS == {p["name"] for p in values["pools"]["items"]}
    assert {p["name"]: p["slots"] for p in values["pools"]["items"]} == {
        k: v["slots"] for k, v in pools_json.items()
    }


def test_helper_connection_secret_name_matches_airflow_extra_env_from(values, templates):
    helpers = templates["_helpers.tpl"]
    assert 'printf "%s-lgt-connections" .Release.Name' in helpers
    assert values["airflow"]["extraEnvFrom"].count("secretRef") == 1


def _strip_comments(text: str) -> str:
    return re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)


def _actions(text: str) -> list[str]:
    return [
        a.strip().strip("-").strip()
        for a in re.findall(r"\{\{(.*?)\}\}", _strip_comments(text), re.S)
    ]


def test_template_blocks_balanced(templates):
    for name, text in templates.items():
        depth = 0
        for act in _actions(text):
            word = act.split()[0] if act.split() else ""
            if word in ("if", "range", "with", "define", "block"):
                depth += 1
            elif word == "end":
                depth -= 1
            assert depth >= 0, f"{name}: unexpected end"
        assert depth == 0, f"{name}: {depth} unclosed block(s)"


def test_includes_refer_to_defines(templates):
    defined = set(re.findall(r'define\s+"([^"]+)"', templates["_helpers.tpl"]))
    assert {"lgt-etl.fullname", "lgt-etl.labels", "lgt-etl.selectorLabels"} <= defined
    for name, text in templates.items():
        for ref in re.findall(r'(?:include|template)\s+"([^"]+)"', _strip_comments(text)):
            assert ref in defined, f"{name}: include/template {ref!r} has no define in _helpers.tpl"


# --- .Values path resolution ---------------------------------------------------------------
_PATH_TOKEN = re.compile(r"(\$[A-Za-z_]\w*|\$|\.)((?:\.?[A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*)?")


def _lookup(nodes: list, keys: list[str], where: str) -> list:
    """Walk `keys` from candidate `nodes`. "[]" = every list item, "*" = every map value."""
    for key in keys:
        nxt = []
        for node in nodes:
            if key == "[]":
                assert isinstance(node, list), f"{where}: ranging over a non-list"
                nxt.extend(node)
            elif key == "*":
                assert isinstance(node, dict), f"{where}: index into a non-map"
                nxt.extend(node.values())
            else:
                assert isinstance(node, dict) and key in node, (
                    f"{where}: key {key!r} not in values.yaml"
                )
                nxt.append(node[key])
        nodes = nxt
    return nodes


def _resolve_expr(expr: str, dot, variables: dict):
    """Values path (list of keys) an expression's first operand points to, or None."""
    expr = expr.strip()
    m = re.match(r"index\s+(\S+)\s+\S+", expr)
    if m:
        base = _resolve_expr(m.group(1), dot, variables)
        return None if base is None else base + ["*"]
    expr = expr.lstrip("(")
    m = re.match(r"(\$[A-Za-z_]\w*|\$)?((?:\.[A-Za-z_]\w*)*)(\.?)", expr)
    head, tail = m.group(1), [k for k in m.group(2).split(".") if k]
    if head is None:
        if not expr.startswith("."):
            return None  # a function call, a literal, ...
        if tail[:1] == ["Values"]:
            return tail[1:]
        if tail[:2] == ["root", "Values"]:
            return tail[2:]
        return None if dot is None else dot + tail
    if head == "$":
        return tail[1:] if tail[:1] == ["Values"] else None
    base = variables.get(head)
    if base is None:
        return None
    if base == ["<root>"]:
        return tail[1:] if tail[:1] == ["Values"] else None
    return base + tail


def test_values_paths_exist(values, templates):
    for name, text in templates.items():
        text = _strip_comments(text)
        # 1. Every absolute reference (.Values.x, $.Values.x, $root.Values.x, .root.Values.x).
        for path in re.findall(r"\bValues((?:\.[A-Za-z_]\w*)+)", text):
            _lookup([values], path.strip(".").split("."), f"{name}: .Values{path}")
        if name == "_helpers.tpl":
            continue  # helpers take arbitrary arguments: relative references are not resolvable
        # 2. Relative references inside with/range blocks and $variables bound to values paths.
        stack: list = [{"dot": [], "vars": {"$": ["<root>"]}}]
        for act in _actions(text):
            words = act.split()
            if not words:
                continue
            frame = stack[-1]
            variables = {k: v for f in stack for k, v in f["vars"].items()}
            word = words[0]
            if word == "end":
                stack.pop()
                continue
            if word in ("if", "define", "block"):
                stack.append({"dot": frame["dot"], "vars": {}})
                body = act[len(word) :]
            elif word == "with":
                target = _resolve_expr(act[4:].split("|")[0], frame["dot"], variables)
                stack.append({"dot": target, "vars": {}})
                body = act[4:]
            elif word == "range":
                m = re.match(r"range\s+(?:(\$\w+)\s*,\s*)?(?:(\$\w+)\s*:=\s*)?(.*)", act, re.S)
                target = _resolve_expr(m.group(3).split("|")[0], frame["dot"], variables)
                elem = None if target is None else target + ["[]"]
                new_vars = {m.group(2): elem} if m.group(2) else {}
                stack.append({"dot": elem, "vars": new_vars})
                body = m.group(3)
            else:
                body = act
                m = re.match(r"(\$\w+)\s*:?=\s*(.*)", act, re.S)
                if m:
                    frame["vars"][m.group(1)] = _resolve_expr(
                        m.group(2).split("|")[0], frame["dot"], variables
                    )
            # The action's own expressions are evaluated in the enclosing scope.
            dot = frame["dot"]
            for ref in re.findall(r"(?<![\w)\]])((?:\$\w+)?(?:\.[A-Za-z_]\w*)+)", body):
                if "Values" in ref or ref.startswith(".Release") or ref.startswith(".Chart"):
                    continue
                path = _resolve_expr(ref, dot, variables)
                if path is not None:
                    _lookup([values], path, f"{name}: {ref}")


def _yaml_skeleton(text: str) -> list[dict]:
    """Drop template-only lines, replace inline actions with a placeholder, parse the docs."""
    lines = []
    for line in _strip_comments(text).splitlines():
        if re.fullmatch(r"\s*(\{\{.*?\}\}\s*)+", line):
            continue
        lines.append(re.sub(r"\{\{.*?\}\}", "X", line))
    docs = []
    for chunk in re.split(r"^---\s*$", "\n".join(lines), flags=re.M):
        doc = yaml.safe_load(chunk)
        if doc:
            docs.append(doc)
    return docs


EXPECTED_KINDS = {
    "connections-secret.yaml": ["Secret"],
    "simulator.yaml": ["Deployment", "Service"],
    "vllm.yaml": ["StatefulSet", "Service", "Service"],
    "minio.yaml": ["Secret", "PersistentVolumeClaim", "Deployment", "Service"],
    "minio-bucket-job.yaml": ["Job"],
    "lineage-db.yaml": ["Secret", "PersistentVolumeClaim", "Deployment", "Service"],
    "db-upgrade-job.yaml": ["Job"],
    "pools-job.yaml": ["Job"],
}


def test_template_kinds(templates):
    manifests = {n for n in templates if n.endswith(".yaml")}
    assert manifests == set(EXPECTED_KINDS), manifests ^ set(EXPECTED_KINDS)
    assert "NOTES.txt" in templates and "_helpers.tpl" in templates
    for name, kinds in EXPECTED_KINDS.items():
        docs = _yaml_skeleton(templates[name])
        assert [d["kind"] for d in docs] == kinds, name
        for d in docs:
            assert d["apiVersion"] in ("v1", "apps/v1", "batch/v1"), (name, d["apiVersion"])
            assert d["metadata"]["name"], name


def test_hook_jobs(templates):
    weights = {}
    for name in ("minio-bucket-job.yaml", "db-upgrade-job.yaml", "pools-job.yaml"):
        (job,) = _yaml_skeleton(templates[name])
        ann = job["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "post-install,post-upgrade", name
        assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"], name
        weights[name] = int(ann["helm.sh/hook-weight"])
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    # The Airflow chart's migration job has weight 1: pools must come after it.
    assert weights["pools-job.yaml"] > 1
    (db,) = _yaml_skeleton(templates["db-upgrade-job.yaml"])
    assert db["spec"]["template"]["spec"]["containers"][0]["command"] == ["lgt", "db", "upgrade"]


def test_helm_lgt_commands_are_real(templates):
    used = set()
    for text in templates.values():
        used |= _lgt_commands(_strip_comments(text))
    assert {"db upgrade", "sim serve"} <= used <= KNOWN_LGT_COMMANDS, used


def test_vllm_and_simulator_templates(templates):
    docs = {d["kind"]: d for d in _yaml_skeleton(templates["vllm.yaml"])}
    spec = docs["StatefulSet"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["vllm", "serve"]
    assert "--served-model-name" in c["args"] and "--tensor-parallel-size" in c["args"]
    assert (
        "nvidia.com/gpu" in c["resources"]["limits"]
        and "nvidia.com/gpu" in c["resources"]["requests"]
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/root/.cache/huggingface", "/dev/shm"} <= mounts
    sts = docs["StatefulSet"]["spec"]
    # Replicas load weights in parallel; a rolling update frees a pod's GPUs before its
    # successor starts (no Recreate for StatefulSets, and none needed).
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["updateStrategy"]["type"] == "RollingUpdate"
    sim = {d["kind"]: d for d in _yaml_skeleton(templates["simulator.yaml"])}
    (sc,) = sim["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert sc["command"] == ["lgt", "sim", "serve"]
    assert sc["readinessProbe"]["httpGet"]["path"] == "/health"
    minio = [d for d in _yaml_skeleton(templates["minio.yaml"]) if d["kind"] == "Deployment"][0]
    (mc,) = minio["spec"]["template"]["spec"]["containers"]
    assert mc["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert mc["args"][:2] == ["server", "/data"] and "--console-address" in mc["args"]
    assert "mc mb --ignore-existing" in templates["minio-bucket-job.yaml"]


def test_connections_secret_keys(templates):
    (secret,) = _yaml_skeleton(templates["connections-secret.yaml"])
    keys = set(secret["stringData"])
    assert {"AIRFLOW_CONN_LGT_S3", "AIRFLOW_CONN_LGT_POSTGRES"} <= keys
    assert "AIRFLOW_CONN_LGT_X" in keys, "per-role AIRFLOW_CONN_LGT_<ROLE> generated in a range"
    text = templates["connections-secret.yaml"]
    assert 'range $role := list "vlm" "llm" "reasoner"' in text
    for key in LGT_ENV:
        generic = re.sub(r"^LGT_(VLM|LLM|REASONER)_", "LGT_{{ upper $role }}_", key)
        assert f"{generic}:" in text, key
    text += templates["_helpers.tpl"]  # the endpoint connections are built by a helper
    for field in (
        '"conn_type" "aws"',
        '"conn_type" "postgres"',
        '"conn_type" "openai"',
        '"max_inflight"',
        '"endpoint_url"',
        '"region_name"',
        '"bucket"',
        '"schema"',
        '"model"',
    ):
        assert field in text, field


# ------------------------------------------------------------------------------------------
# cross-checks with the code (static: nothing is imported here)
# ------------------------------------------------------------------------------------------
def test_code_uses_the_deployed_pools_dag_and_commands():
    # a stage's pool is lgt_<role>, the role a class attribute in the stage registry
    registry = ast.parse((ROOT / "lgt_ops" / "registry.py").read_text())
    roles = {
        ast.literal_eval(node.value)
        for node in ast.walk(registry)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "role" for t in node.targets)
    }
    stage_pools = {f"lgt_{role}" for role in roles if role}
    assert stage_pools == POOLS, stage_pools
    dag_files = "\n".join(p.read_text() for p in (ROOT / "dags").glob("*.py"))
    assert re.search(r"""dag_id\s*=\s*["']lgt_synthesis["']""", dag_files)
    cli = (ROOT / "lgt_ops" / "cli.py").read_text()
    for command in KNOWN_LGT_COMMANDS:
        for word in command.split():
            assert f'add_parser("{word}"' in cli, f"`lgt {command}`: no {word!r} subparser"


# ------------------------------------------------------------------------------------------
# docs
# ------------------------------------------------------------------------------------------
def test_deploy_docs_cover_the_procedures():
    text = DOCS.read_text()
    for needle in (
        "docker compose up",
        "docker compose --profile gpu --env-file deploy/env.gpu.example up",
        "docker compose --profile celery --env-file deploy/env.celery.example up",
        "worker_concurrency",
        "LGT_SHARD_SIZE",
        "helm dependency update helm/lgt-etl",
        "helm upgrade --install",
        "connections.existingSecret",
        "airflow pools",
        "baseUrl",
        "AIRFLOW_CONN_LGT_",
    ):
        assert needle in text, needle


# ------------------------------------------------------------------------------------------
# Helm: restarts on Secret changes, security contexts, paused DAG, per-replica caches
# ------------------------------------------------------------------------------------------
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def _workloads(templates) -> list[tuple[str, dict]]:
    return [
        (name, d)
        for name, text in templates.items()
        if name.endswith(".yaml")
        for d in _yaml_skeleton(text)
        if d["kind"] in WORKLOAD_KINDS
    ]


def test_pods_restart_when_their_secret_changes(templates, values):
    helpers = templates["_helpers.tpl"]
    body = helpers.split('define "lgt-etl.connectionsChecksum"', 1)[1].split("{{- end }}\n\n", 1)[0]
    # The chart's own Secret as rendered, and a Secret you manage as read from the cluster.
    assert 'print .Template.BasePath "/connections-secret.yaml"' in body
    assert 'lookup "v1" "Secret" .Release.Namespace .Values.connections.existingSecret' in body
    assert "sha256sum" in body
    for name, doc in _workloads(templates):
        if doc["kind"] == "Job":
            continue  # hook Jobs are re-created on every upgrade
        text = _strip_comments(templates[name])
        ann = doc["spec"]["template"]["metadata"].get("annotations") or {}
        if "lgt-etl.connectionsSecretName" in text:
            assert "checksum/connections" in ann, f"{name}: no checksum of the connections Secret"
            # vLLM pods hash the one key they read (their role's API key; see the rendered
            # test below), every other pod the whole Secret.
            helper = "vllmKeyChecksum" if name == "vllm.yaml" else "connectionsChecksum"
            assert f'checksum/connections: {{{{ include "lgt-etl.{helper}"' in text
    minio = next(d for n, d in _workloads(templates) if n == "minio.yaml")
    assert "checksum/secret" in minio["spec"]["template"]["metadata"]["annotations"]
    for field in ("$mc.rootUser", "$mc.rootPassword"):
        assert field in templates["minio.yaml"], field
    # Airflow pods: the Airflow chart does not hash extraEnvFrom; its airflowPodAnnotations
    # (applied to every Airflow pod) carry the digest, documented and reminded by NOTES.
    assert values["airflow"]["airflowPodAnnotations"] == {}
    assert "airflow.airflowPodAnnotations.checksum/lgt-connections" in templates["NOTES.txt"]
    assert "airflow.airflowPodAnnotations.checksum/lgt-connections" in DOCS.read_text()


def test_chart_pods_have_security_contexts(templates, values):
    for name, doc in _workloads(templates):
        pod = doc["spec"]["template"]["spec"]
        assert "securityContext" in pod, f"{name}: pod securityContext"
        for c in pod["containers"]:
            assert "securityContext" in c, f"{name}: container {c['name']} securityContext"
    # What those contexts are, per image.
    for ctx in (
        values["securityContext"],
        values["objectStore"]["minio"]["securityContext"],
        values["lineageDatabase"]["embedded"]["securityContext"],
    ):
        assert ctx["pod"]["runAsNonRoot"] is True and ctx["pod"]["runAsUser"] > 0
        assert ctx["pod"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert ctx["container"]["allowPrivilegeEscalation"] is False
        assert ctx["container"]["capabilities"]["drop"] == ["ALL"]
    assert values["securityContext"]["pod"]["runAsUser"] == 50000, "the Airflow image's user"
    assert values["lineageDatabase"]["embedded"]["securityContext"]["pod"]["runAsUser"] == 999
    # vLLM: documented exception (root in the image), but no privilege escalation.
    vctx = values["vllm"]["securityContext"]
    assert vctx["container"]["allowPrivilegeEscalation"] is False
    assert vctx["pod"]["seccompProfile"] == {"type": "RuntimeDefault"}
    raw_values = (CHART / "values.yaml").read_text()
    assert "Documented exception" in raw_values and "runs as root" in raw_values
    # Which context each template uses.
    uses = {
        "simulator.yaml": ".Values.securityContext.pod",
        "db-upgrade-job.yaml": ".Values.securityContext.pod",
        "pools-job.yaml": ".Values.securityContext.pod",
        "minio.yaml": "$mc.securityContext.pod",
        "minio-bucket-job.yaml": "$mc.securityContext.pod",
        "lineage-db.yaml": "$db.embedded.securityContext.pod",
        "vllm.yaml": "$.Values.vllm.securityContext.pod",
    }
    for name, ref in uses.items():
        assert ref in templates[name], (name, ref)
        assert ref.replace(".pod", ".container") in templates[name], name


def test_dag_starts_paused_and_notes_say_how_to_unpause(values, templates):
    env = {e["name"]: e["value"] for e in values["airflow"]["env"]}
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "True"
    notes = templates["NOTES.txt"]
    assert "starts PAUSED" in notes
    assert "airflow dags unpause lgt_synthesis" in notes
    assert "component=scheduler,release={{ .Release.Name }}" in notes


def _hf_cache_problem(model: dict) -> str | None:
    """The chart's rule (vllm.yaml `fail`): replicas may share a cache only if it is RWX."""
    hf = model.get("hfCache") or {}
    replicas = model.get("replicas", 1)
    shared = hf.get("enabled") and hf.get("existingClaim") and replicas > 1
    if shared and hf.get("accessMode", "ReadWriteOnce") != "ReadWriteMany":
        return f"{model['name']}: {replicas} replicas share a non-RWX claim"
    return None


def test_vllm_replicas_never_share_a_read_write_once_cache(templates, values):
    (sts,) = [d for d in _yaml_skeleton(templates["vllm.yaml"]) if d["kind"] == "StatefulSet"]
    spec = sts["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "hf-cache"
    assert "storage" in claim["spec"]["resources"]["requests"]
    mounts = {m["name"] for m in spec["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "hf-cache" in mounts
    # Pod-level hf-cache volumes exist only for the shared claim and the emptyDir cases.
    text = templates["vllm.yaml"]
    assert "{{- if and $hf.enabled $hf.existingClaim }}" in text
    assert "{{- if and $hf.enabled (not $hf.existingClaim) }}" in text
    assert "{{- fail" in text and "ReadWriteMany" in text
    assert "kind: PersistentVolumeClaim" not in text, "one PVC for all replicas is the bug"
    # The defaults and every example obey the rule the template enforces.
    for name in ["values.yaml"] + sorted(p.name for p in (CHART / "examples").glob("*.yaml")):
        override = yaml.safe_load(
            (CHART / name if name == "values.yaml" else CHART / "examples" / name).read_text()
        )
        merged = _helm_merge(values, override)
        for m in merged["vllm"]["models"]:
            assert _hf_cache_problem(m) is None, (name, _hf_cache_problem(m))
    broken = {"name": "x", "replicas": 2, "hfCache": {"enabled": True, "existingClaim": "c"}}
    assert _hf_cache_problem(broken)


def test_deploy_docs_cover_the_changes():
    text = DOCS.read_text()
    for needle in (
        "VLLM_REASONER_TENSOR_PARALLEL_SIZE",
        "required: false",
        "volumeClaimTemplates",
        "ReadWriteMany",
        "securityContext",
        "airflow dags unpause lgt_synthesis",
        "checksum/connections",
        "lgt_ops/sql",
        "apache-airflow[postgres]",
    ):
        assert needle in text, needle


# ------------------------------------------------------------------------------------------
# Helm, rendered: one headless Service per vLLM role, one base URL per replica
# ------------------------------------------------------------------------------------------
RELEASE, NAMESPACE = "lgt", "ml-data"


@pytest.fixture(scope="module")
def chart() -> Chart:
    return Chart(CHART, release=RELEASE, namespace=NAMESPACE)


def _render(chart: Chart, template: str, values: dict) -> list[dict]:
    return [d for d in yaml.safe_load_all(chart.render(template, values)) if d]


def _vllm_values(values: dict, replicas: dict[str, int], **endpoints: str) -> dict:
    """In-chart vLLM for every role, with these replica counts and explicit baseUrls."""
    out = copy.deepcopy(values)
    out["vllm"]["enabled"] = True
    for m in out["vllm"]["models"]:
        m["replicas"] = replicas.get(m["role"], 1)
    for role, url in endpoints.items():
        out["connections"]["endpoints"][role]["baseUrl"] = url
    return out


def _secret_data(chart: Chart, values: dict) -> dict[str, str]:
    (secret,) = _render(chart, "connections-secret.yaml", values)
    return secret["stringData"]


def test_renderer_follows_go_templates():
    """The interpreter's Go semantics that the chart's correctness depends on."""
    src = (
        '{{- define "t" -}}{{ $n := 0 }}{{ range $i, $v := .xs }}{{ if eq $v "b" }}B'
        '{{ else if eq $v "c" }}C{{ else }}{{ $i }}{{ end }}{{ $n = len $.xs }}{{ end }}|{{ $n }}'
        '|{{ printf "%d" .f }}|{{ .f | int | printf "%d" }}|{{ and .no .no.deeper }}'
        '|{{ toJson (dict "k" .f) }}{{- end }}'
    )
    chart = Chart(CHART)
    chart.defines.update(parse(src)[1])
    out = chart.include("t", {"xs": ["a", "b", "c"], "f": 8000.0, "no": None})
    assert out == '0BC|3|%!d(float64=8000)|8000||{"k":8000}'
    with pytest.raises(TemplateError, match="nil pointer"):
        chart.include("lgt-etl.fullname", {"Values": None})


@pytest.mark.parametrize(
    "example", [None, *sorted(p.name for p in (CHART / "examples").glob("*.yaml"))]
)
def test_every_template_renders(chart, values, example):
    merged = values
    if example:
        merged = _helm_merge(values, yaml.safe_load((CHART / "examples" / example).read_text()))
    for name in sorted(n for n in (p.name for p in TEMPLATES.iterdir()) if n.endswith(".yaml")):
        for doc in _render(chart, name, merged):
            assert doc["kind"] and doc["metadata"]["name"], (example, name)
    assert "Model endpoints" in chart.render("NOTES.txt", merged)


def test_vllm_headless_service_per_role_selects_its_pods(chart, values):
    docs = _render(chart, "vllm.yaml", _vllm_values(values, {"vlm": 2, "llm": 1, "reasoner": 3}))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    sets = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sorted(s["metadata"]["labels"]["lgt-etl/role"] for s in sets) == sorted(ROLES)
    selectors = []
    for sts in sets:
        spec, name = sts["spec"], sts["metadata"]["name"]
        headless = services[spec["serviceName"]]  # the StatefulSet's serviceName exists
        assert headless["metadata"]["name"] == f"{name}-headless"
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is False
        # It selects exactly this StatefulSet's pods: its selector is the StatefulSet's, and
        # the pod template carries those labels.
        selector = headless["spec"]["selector"]
        assert selector == spec["selector"]["matchLabels"]
        assert selector.items() <= spec["template"]["metadata"]["labels"].items()
        selectors.append(tuple(sorted(selector.items())))
        (port,) = headless["spec"]["ports"]
        assert port["targetPort"] == "http" and port["port"] == 8000
        # The ClusterIP Service stays (one address for other clients), same pods.
        assert services[name]["spec"]["selector"] == selector
        assert services[name]["spec"].get("clusterIP") != "None"
        # Per-replica caches: a claim template, never one shared RWO volume.
        assert [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]] == ["hf-cache"]
    assert len(set(selectors)) == len(ROLES), "each role's headless Service selects only its pods"


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_base_urls_one_per_replica_in_the_connections_secret(chart, values, replicas):
    merged = _vllm_values(values, {"reasoner": replicas, "vlm": 2})
    data = _secret_data(chart, merged)
    docs = _render(chart, "vllm.yaml", merged)
    for role, count in (("reasoner", replicas), ("vlm", 2), ("llm", 1)):
        (sts,) = [
            d
            for d in docs
            if d["kind"] == "StatefulSet" and d["metadata"]["labels"]["lgt-etl/role"] == role
        ]
        assert sts["spec"]["replicas"] == count
        name, svc = sts["metadata"]["name"], sts["spec"]["serviceName"]
        expected = tuple(
            f"http://{name}-{i}.{svc}.{NAMESPACE}.svc.cluster.local:8000/v1" for i in range(count)
        )
        # LGT_<ROLE>_BASE_URL: comma-separated, as lgt_ops.config parses it.
        env_urls = endpoint_from_env(role, data).urls
        assert env_urls == expected, role
        # AIRFLOW_CONN_LGT_<ROLE>: one URL as host, several as the extra's base_urls list
        # (the form lgt_ops.airflow_adapter reads; tests/test_replicas.py feeds it through).
        conn = json.loads(data[f"AIRFLOW_CONN_LGT_{role.upper()}"])
        if count == 1:
            assert conn["host"] == expected[0] and "base_urls" not in conn["extra"]
        else:
            assert conn["extra"]["base_urls"] == list(expected) and "host" not in conn
        assert conn["extra"]["model"] == DEFAULT_MODELS[role]
    # Another cluster domain reaches the URLs too.
    merged["vllm"]["clusterDomain"] = "k8s.example"
    assert ".svc.k8s.example:8000/v1" in _secret_data(chart, merged)["LGT_LLM_BASE_URL"]


def test_an_explicit_base_url_wins_over_the_in_chart_replicas(chart, values):
    two = "http://gpu-a.internal:8000/v1, http://gpu-b.internal:8000/v1"
    merged = _vllm_values(values, {"reasoner": 3}, reasoner=two, llm="http://shared:8000/v1")
    data = _secret_data(chart, merged)
    assert (
        data["LGT_REASONER_BASE_URL"]
        == "http://gpu-a.internal:8000/v1,http://gpu-b.internal:8000/v1"
    )
    conn = json.loads(data["AIRFLOW_CONN_LGT_REASONER"])
    assert conn["extra"]["base_urls"] == [
        "http://gpu-a.internal:8000/v1",
        "http://gpu-b.internal:8000/v1",
    ]
    assert json.loads(data["AIRFLOW_CONN_LGT_LLM"])["host"] == "http://shared:8000/v1"
    assert "-headless." in data["LGT_VLM_BASE_URL"]
    # The schema takes a comma-separated list of http(s) URLs, and nothing else.
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors(merged))
    merged["connections"]["endpoints"]["llm"]["baseUrl"] = "http://a:8000/v1,gpu-b:8000/v1"
    assert list(validator.iter_errors(merged))


def test_zero_replicas_render_no_url_and_the_rule_on_shared_caches_holds(chart, values):
    data = _secret_data(chart, _vllm_values(values, {"reasoner": 0}))
    assert data["LGT_REASONER_BASE_URL"] == ""  # the run fails naming the role, not a sim
    conn = json.loads(data["AIRFLOW_CONN_LGT_REASONER"])
    assert "host" not in conn and "base_urls" not in conn["extra"]
    shared = _vllm_values(values, {"vlm": 2})
    shared["vllm"]["models"][0]["hfCache"]["existingClaim"] = "weights"
    with pytest.raises(TemplateError, match="ReadWriteMany"):
        chart.render("vllm.yaml", shared)


def test_checksums_cover_the_base_urls_without_restarting_other_roles(chart, values):
    def sums(merged: dict) -> tuple[str, dict[str, str]]:
        whole = chart.include("lgt-etl.connectionsChecksum", chart.context(merged))
        pods = {
            d["metadata"]["labels"]["lgt-etl/role"]: d["spec"]["template"]["metadata"][
                "annotations"
            ]["checksum/connections"]
            for d in _render(chart, "vllm.yaml", merged)
            if d["kind"] == "StatefulSet"
        }
        return whole, pods

    base_whole, base_pods = sums(_vllm_values(values, {"reasoner": 2}))
    scaled_whole, scaled_pods = sums(_vllm_values(values, {"reasoner": 3}))
    # The digest of the Secret (the Airflow pods' checksum/lgt-connections) follows the list.
    assert scaled_whole != base_whole
    # No vLLM pod restarts because a role was scaled: they read only their API key.
    assert scaled_pods == base_pods and len(set(base_pods.values())) == len(ROLES)
    keyed = _vllm_values(values, {"reasoner": 2})
    keyed["connections"]["endpoints"]["reasoner"]["apiKey"] = "rotated-key"
    _, keyed_pods = sums(keyed)
    assert keyed_pods["reasoner"] != base_pods["reasoner"]
    assert keyed_pods["vlm"] == base_pods["vlm"]


def test_deploy_docs_cover_the_headless_services():
    text = DOCS.read_text()
    for needle in (
        "clusterIP: None",
        "publishNotReadyAddresses: false",
        "-headless",
        "base_urls",
        "vllm.clusterDomain",
        "--cascade",
    ):
        assert needle in text, needle
    assert "list their\n  addresses in `baseUrl`" not in text
