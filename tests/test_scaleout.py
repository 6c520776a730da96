"""Scale-out: docker-compose.yml, the Dockerfile, .env.example and studies/slurm_workers.sh.

There is no Docker engine here, so the compose file is checked by parsing it (every command must be one its program
accepts, every variable defined in .env.example, every port bound to 127.0.0.1) and by running its services natively:
the same commands, with the container addresses swapped for a local PostgreSQL, free ports and temporary directories.
The SLURM script runs for real too, with SLURM's environment faked and `scontrol` replaced by a recorder.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import optuna
import psycopg
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from optstudy.cli import parser as cli_parser
from optstudy.study import spec as specs
from optstudy.study.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
SLURM = ROOT / "studies" / "slurm_workers.sh"
INIT_DIR = ROOT / "docker" / "postgres"
BIN = Path(sys.executable).parent  # the console scripts of the environment running the tests
IMAGE_SERVICES = ("mlflow", "optuna-schema", "optuna-dashboard", "dashboard", "worker", "worker-gpu")
CORE_SERVICES = ("postgres", "mlflow", "optuna-dashboard", "dashboard", "worker")
MLFLOW_DB_ENV = "OPTSTUDY_TEST_POSTGRES_MLFLOW_URL"  # set by .ci/run: the `mlflow` database of its server


# --- compose-style variables --------------------------------------------------------------------------------------
VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                      r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op") or "", m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = not value if op.startswith(":") else value is None
        if op.endswith("-"):
            return arg if unset_or_empty else value
        if op.endswith("?"):
            if unset_or_empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value
        return value or ""
    return VARIABLE.sub(one, text)


def variables(text: str) -> set[str]:
    return {m.group("braced") or m.group("plain") for m in VARIABLE.finditer(text) if m.group(0) != "$$"}


def strings(node) -> list[str]:
    """Every string of a parsed YAML document, keys included (what compose interpolates; comments are not)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*strings(k), *strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def example_env() -> dict[str, str]:
    return dotenv(ENV_EXAMPLE)


def argv(service: str, env: dict[str, str] | None = None) -> list[str]:
    """A service's command as the container gets it: interpolated, then split (compose splits a string with
    shell-like quoting; a list is taken as it is)."""
    env = example_env() if env is None else env
    command = compose()["services"][service]["command"]
    if isinstance(command, str):
        return shlex.split(interpolate(command, env))
    return [interpolate(str(a), env) for a in command]


def pg_urls(args: list[str]) -> list[tuple[int, str]]:
    return [(i, a) for i, a in enumerate(args) if a.startswith("postgresql")]


def console_scripts() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}


# --- the compose file ---------------------------------------------------------------------------------------------
def test_services_healthchecks_and_images():
    services = compose()["services"]
    assert set(CORE_SERVICES) <= set(services)
    for name in ("postgres", "mlflow", "optuna-dashboard", "dashboard"):
        check = services[name].get("healthcheck")
        assert check and check["test"] and not check.get("disable"), f"{name} has no health check"
    assert re.fullmatch(r"postgres:1[56](\.\d+)?([.-].*)?", services["postgres"]["image"])
    # the project's image for everything else, so that server and clients run the same MLflow and Optuna
    for name in IMAGE_SERVICES:
        assert services[name]["build"]["context"] == ".", name
    assert services["mlflow"]["image"] == services["worker"]["image"] == services["optuna-dashboard"]["image"]
    assert services["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the mlflow health check asks the path MLflow serves for it
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_named_volumes_are_declared_and_used():
    doc = compose()
    declared = set(doc.get("volumes") or {})
    assert {"pgdata", "mlartifacts"} <= declared
    used = {}
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts the undeclared volume {source}"
                used[source] = volume
    assert declared == set(used), f"declared but unused: {declared - set(used)}"
    assert used["pgdata"].split(":")[1] == "/var/lib/postgresql/data"
    # the MLflow server's artifacts live in the volume: --artifacts-destination is where it is mounted
    args = argv("mlflow")
    assert used["mlartifacts"].split(":")[1] == args[args.index("--artifacts-destination") + 1]


@pytest.mark.parametrize("env", ["example", "defaults"])
def test_published_ports_bind_to_localhost(env):
    values = example_env() if env == "example" else {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p"}
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short syntax HOST_IP:HOST_PORT:CONTAINER_PORT"
            parts = interpolate(port, values).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name} publishes {port} beyond this machine"
            published += 1
    assert published == 4  # postgres, mlflow, optuna-dashboard, optstudy's dashboard


def test_worker_scales():
    services = compose()["services"]
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert "container_name" not in worker and "ports" not in worker, f"{name} would clash when scaled"
        assert worker["restart"] == "on-failure"
        assert worker["depends_on"]["optuna-schema"]["condition"] == "service_completed_successfully"
    assert services["optuna-schema"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_gpu_profile_reserves_nvidia_devices():
    gpu = compose()["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in compose()["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    count = interpolate(str(devices[0]["count"]), example_env())
    assert count == "all" or int(count) >= 1


@pytest.mark.parametrize("service, extra_env", [
    ("worker", {}),
    ("worker", {"STUDY": "bounds", "STUDY_OVERRIDES": "trainer.max_epochs=1 seed=3"}),
    ("worker-gpu", {}),
    ("worker-gpu", {"GPUS_PER_WORKER": "4", "GPU_OVERRIDES": "trainer=ddp trainer.devices=4"}),
])
def test_worker_command_is_a_real_cli_invocation(service, extra_env):
    from optstudy.study.worker import compose as hydra_compose

    args = argv(service, {**example_env(), **extra_env})
    assert args[:3] == ["optstudy", "study", "run"]
    # what optstudy.cli.main does: argparse, then overrides that follow the options
    parsed, rest = cli_parser().parse_known_args(args[1:])
    assert not any(r.startswith("-") for r in rest), f"argparse rejects {rest}"
    overrides = [*parsed.overrides, *rest]
    assert (parsed.group, parsed.command) == ("study", "run")
    study = specs.load(ROOT / parsed.file)  # the study file the image holds (/app is the repository root)
    url = make_url(parsed.storage)
    assert (url.drivername, url.host, url.port, url.database, url.password) == (
        "postgresql+psycopg", "postgres", 5432, "optuna", None)  # the password comes from PGPASSWORD
    # the overrides compose with the study's, as the worker does first thing
    cfg = hydra_compose([*study.overrides, *overrides])
    if service == "worker-gpu":
        assert cfg.trainer.accelerator in ("gpu", "auto")
        if "ddp" in extra_env.get("GPU_OVERRIDES", ""):
            assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4  # the worker runs train.py for these


def test_schema_and_dashboard_commands_use_the_optuna_database():
    schema = argv("optuna-schema")
    assert schema[0] == "python" and schema[1] == "-c"
    compile(schema[2], "optuna-schema", "exec")
    dashboard = argv("optuna-dashboard")
    assert dashboard[0] == "optuna-dashboard"
    for args in (schema, dashboard):
        (_, url), = pg_urls(args)
        assert make_url(url).database == "optuna" and make_url(url).host == "postgres"
    help_text = subprocess.run([BIN / "optuna-dashboard", "--help"], capture_output=True, text=True).stdout
    for flag in (a for a in dashboard if a.startswith("--")):
        assert flag in help_text, f"optuna-dashboard has no {flag}"
    assert dashboard[dashboard.index("--port") + 1] == "8080" and dashboard[dashboard.index("--host") + 1] == "0.0.0.0"


def test_optstudy_dashboard_command_is_a_real_cli_invocation():
    """The `dashboard` service: `optstudy dashboard` as argparse reads it, on the optuna database and the MLflow
    server, listening where its published port and health check look, linking to the UIs' published ports."""
    services = compose()["services"]
    args = argv("dashboard")
    assert args[:2] == ["optstudy", "dashboard"]
    parsed = cli_parser().parse_args(args[1:])  # no unknown flag: argparse exits otherwise
    url = make_url(parsed.storage)
    assert (url.drivername, url.host, url.database, url.password) == ("postgresql+psycopg", "postgres", "optuna", None)
    assert parsed.tracking_uri == services["worker"]["environment"]["MLFLOW_TRACKING_URI"]
    assert parsed.host == "0.0.0.0" and parsed.port == 8050
    assert services["dashboard"]["ports"][0].endswith(f":{parsed.port}")
    assert f"127.0.0.1:{parsed.port}/api/studies" in " ".join(services["dashboard"]["healthcheck"]["test"])
    assert parsed.mlflow_url == "http://127.0.0.1:5000" and parsed.optuna_dashboard_url == "http://127.0.0.1:8080"
    assert services["dashboard"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_mlflow_command_is_accepted_by_mlflow_server():
    args = argv("mlflow")
    assert args[:2] == ["mlflow", "server"]
    help_text = subprocess.run([BIN / "mlflow", "server", "--help"], capture_output=True, text=True).stdout
    flags = [a for a in args if a.startswith("--")]
    for flag in flags:
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}\b", help_text), f"mlflow server has no {flag}"
    # and click parses the whole command with its values (a wrong value type fails here)
    from mlflow.cli import server

    ctx = server.make_context("server", args[2:])
    assert ctx.params["serve_artifacts"] is True and ctx.params["port"] == 5000 and ctx.params["host"] == "0.0.0.0"
    uri = make_url(ctx.params["backend_store_uri"])
    assert (uri.drivername, uri.host, uri.database, uri.password) == ("postgresql+psycopg", "postgres", "mlflow", None)
    allowed = ctx.params["allowed_hosts"].split(",")
    assert {"mlflow", "mlflow:5000"} <= set(allowed)  # how the workers reach it: Host: mlflow:5000


def test_env_example_defines_every_variable():
    env = example_env()
    text = "\n".join(strings(compose()))
    used = variables(text)
    assert used <= set(env), f"not in .env.example: {used - set(env)}"
    assert len(used) >= 15
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert re.search(rf"\$\{{{name}:\?[^}}]+\}}", text), f"{name} must be required (${{{name}:?...}})"
        with pytest.raises(MissingVariable, match=name):  # no .env: compose refuses with a message
            interpolate(text, {k: v for k, v in env.items() if k != name})
    assert "change-me" in env["POSTGRES_PASSWORD"]  # a placeholder, never a real secret
    # every command interpolates with the example's values alone
    for name in compose()["services"]:
        if "command" in compose()["services"][name]:
            assert argv(name, env)


def test_commands_are_installed_console_scripts():
    installed = console_scripts()
    assert {"optstudy", "mlflow", "optuna-dashboard"} <= installed
    services = compose()["services"]
    for name in IMAGE_SERVICES:
        program = argv(name)[0]
        assert program in installed or program == "python", f"{name} runs {program}, which nothing installs"
    for name in IMAGE_SERVICES:
        check = services[name].get("healthcheck", {}).get("test", [])
        if check:  # the slim image has no curl: health checks run python
            assert check[0] == "CMD" and (check[1] in installed or check[1] == "python"), f"{name}: {check}"
    # the Dockerfile's CMD
    cmd = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD")]
    assert len(cmd) == 1
    program = json.loads(cmd[0][len("CMD"):])
    assert program[0] in installed and program[:3] == ["optstudy", "study", "run"]
    assert specs.load(ROOT / program[3])


def test_init_script_creates_both_databases():
    doc = compose()
    mounts = doc["services"]["postgres"]["volumes"]
    assert "./docker/postgres:/docker-entrypoint-initdb.d:ro" in mounts
    scripts = sorted(p for p in INIT_DIR.iterdir() if p.suffix in (".sql", ".sh"))
    assert scripts, "no init script in docker/postgres"
    text = "\n".join(p.read_text() for p in scripts)
    for db in ("optuna", "mlflow"):
        assert re.search(rf"CREATE DATABASE {db}\b", text), f"no CREATE DATABASE {db}"


def psql_binary() -> str | None:
    candidates = [shutil.which("psql"), os.path.join(os.environ.get("PG_BIN", ""), "psql")]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"), reverse=True)
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def test_init_script_runs_in_psql(postgres_url):
    """The init script as the postgres image runs it (psql, ON_ERROR_STOP), twice, with the databases renamed so as
    not to touch the server's own optuna and mlflow."""
    psql = psql_binary()
    if psql is None:
        pytest.skip("no psql")
    url = make_url(postgres_url)
    suffix = uuid.uuid4().hex[:8]
    names = {"optuna": f"optuna_{suffix}", "mlflow": f"mlflow_{suffix}"}
    sql = (INIT_DIR / "10-create-databases.sql").read_text()
    renamed = re.sub(r"'(?:CREATE DATABASE )?(optuna|mlflow)'", lambda m: m.group(0).replace(
        m.group(1), names[m.group(1)]), sql)
    assert renamed.count(suffix) == 4
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    conn = dict(host=url.host, port=url.port, user=url.username, dbname="postgres", password=url.password)
    try:
        for _ in range(2):  # idempotent: the second run finds both
            r = subprocess.run([psql, "-v", "ON_ERROR_STOP=1", "-h", url.host, "-p", str(url.port), "-U", url.username,
                                "-d", "postgres", "-q"], input=renamed, capture_output=True, text=True, env=env)
            assert r.returncode == 0, r.stderr
        with psycopg.connect(**conn) as c:
            found = {row[0] for row in c.execute("SELECT datname FROM pg_database")}
        assert set(names.values()) <= found
    finally:
        with psycopg.connect(**conn, autocommit=True) as c:
            for name in names.values():
                c.execute(f'DROP DATABASE IF EXISTS "{name}"')


# --- the Dockerfile -------------------------------------------------------------------------------------------------
def test_dockerfile_installs_the_project_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "WORKDIR /app" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root user"
    assert re.search(r"pip install (--no-deps )?-e \.", text), "install the project editable, as the README does"
    assert re.search(r"^ARG TORCH_INDEX_URL", text, re.M) and "--index-url" in text
    assert "torch==${TORCH_VERSION}" in text
    setup_pin = re.search(r'torch==([0-9.]+)', (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(setup_pin)}$", text, re.M), "the torch of scripts/setup.sh"
    assert "/mlartifacts" in text  # owned by the user before the volume is mounted there


def test_dockerignore_keeps_secrets_out_and_the_project_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for excluded in (".env", ".venv", ".git"):
        assert excluded in patterns
    assert "!.env.example" in patterns
    for needed in ("src", "conf", "train.py", "pyproject.toml", "README.md", "studies", "docker"):
        assert needed not in patterns and (ROOT / needed).exists(), needed


# --- the SLURM script ---------------------------------------------------------------------------------------------
def test_slurm_script_is_valid_bash_with_the_array_directives():
    r = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SLURM.read_text()
    assert os.stat(SLURM).st_mode & stat.S_IXUSR
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert any(re.fullmatch(r"--array=\d+-\d+(%\d+)?", d) for d in directives)
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    # directives count only before the first command
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert "optstudy study run" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert re.search(r"^trap .*USR1", text, re.M)
    # the header's sbatch commands name this script and a shipped study
    commands = re.findall(r"^#\s{2,}sbatch .*", text, re.M)
    assert len(commands) >= 3
    for line in commands:
        assert "studies/slurm_workers.sh studies/" in line
        assert (ROOT / re.search(r"slurm_workers\.sh (studies/\S+\.yaml)", line).group(1)).is_file()


@pytest.mark.parametrize("env, message", [
    ({}, "export OPTSTUDY_STORAGE"),
    ({"OPTSTUDY_STORAGE": "optuna.journal"}, "MLFLOW_TRACKING_URI"),
    ({"OPTSTUDY_STORAGE": "optuna.journal", "MLFLOW_TRACKING_URI": "http://h:5000"}, "must be a PostgreSQL URL"),
])
def test_slurm_script_refuses_a_missing_or_local_storage(env, message, tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("OPTSTUDY_STORAGE", "MLFLOW_TRACKING_URI")}
    r = subprocess.run(["bash", str(SLURM), "studies/bounds.yaml"], env={**base, **env}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and message in r.stderr


# --- the stack, natively ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


def swap_database(args: list[str], expected_db: str, url: str) -> list[str]:
    (i, compose_url), = pg_urls(args)
    assert make_url(compose_url).database == expected_db
    return [*args[:i], url, *args[i + 1:]]


def service_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    return {k: interpolate(str(v), example_env()) for k, v in env.items() if k != "PGPASSWORD"}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"{url} did not answer (exit {proc.poll()}):\n{tail}")
        time.sleep(0.5)


def status_with_host(port: int, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """TERM the process group, KILL what is left after grace (MLflow's job consumers ignore TERM)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_the_stack_runs_natively(tmp_path, postgres_url, postgres_db_url):
    """PostgreSQL, `mlflow server`, optuna-dashboard and workers, from the compose file's own commands. A SLURM array
    task starts the study and is told its time is up mid-trial (USR1): it requeues itself and kills its worker. Then
    the requeued task and a plain worker finish the study together; the killed trial is failed by heartbeats and run
    again. MLflow has every trial as a child run of the study's run, with artifacts through the server; the dashboard
    lists the study."""
    name = f"scaleout_{uuid.uuid4().hex[:8]}"  # the mlflow database may hold earlier tests' experiments
    n_trials = 4
    study_file = tmp_path / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": name, "n_trials": n_trials, "seeds": [0], "sampler": {"name": "random", "seed": 0},
        # 30 epochs (~2 s a trial): long enough for the task to be signalled mid-trial; every worker, requeued or
        # joining from compose, has the same settings (a study refuses workers with others)
        "pruner": {"name": "none"}, "overrides": ["trainer.max_epochs=30"],
        "optimizers": {"adam": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}}))
    storage = postgres_db_url  # a fresh database: the schema step below creates Optuna's tables
    mlflow_db = os.environ.get(MLFLOW_DB_ENV) or make_url(postgres_url).set(database="mlflow").render_as_string(
        hide_password=False)
    base_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTSTUDY_STORAGE")}
    procs: list[subprocess.Popen] = []

    def start(args, log_name, env=None, cwd=tmp_path):
        log = tmp_path / f"{log_name}.log"
        proc = subprocess.Popen(args, env={**base_env, **(env or {})}, cwd=cwd, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        # optuna-schema
        schema = swap_database(argv("optuna-schema"), "optuna", storage)
        r = subprocess.run([sys.executable, *schema[1:]], env=base_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

        # mlflow and optuna-dashboard, side by side
        mlflow_port, dash_port = free_port(), free_port()
        mlflow_args = swap_database(argv("mlflow"), "mlflow", mlflow_db)
        mlflow_args = swap(mlflow_args, "--artifacts-destination", str(tmp_path / "mlartifacts"))
        mlflow_args = swap(swap(mlflow_args, "--host", "127.0.0.1"), "--port", str(mlflow_port))
        mlflow_args = swap(mlflow_args, "--workers", "1")  # two cores here
        mlflow_proc, mlflow_log = start([str(BIN / "mlflow"), *mlflow_args[1:]], "mlflow", service_env("mlflow"))
        dash_args = swap_database(argv("optuna-dashboard"), "optuna", storage)
        dash_args = swap(swap(dash_args, "--host", "127.0.0.1"), "--port", str(dash_port))
        dash_proc, dash_log = start([str(BIN / "optuna-dashboard"), *dash_args[1:]], "dashboard")
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow_proc, mlflow_log)
        tracking = f"http://127.0.0.1:{mlflow_port}"
        # --allowed-hosts: the name the workers in compose use is answered, another name is refused
        assert status_with_host(mlflow_port, "/api/2.0/mlflow/experiments/search?max_results=1", "mlflow:5000") == 200
        assert status_with_host(mlflow_port, "/api/2.0/mlflow/experiments/search?max_results=1",
                                f"127.0.0.1:{mlflow_port}") == 200
        assert status_with_host(mlflow_port, "/api/2.0/mlflow/experiments/search?max_results=1",
                                "attacker.example") == 403

        # a SLURM array task: its own "repository" (a .venv that is this environment), a recording scontrol
        root, fake_bin = tmp_path / "root", tmp_path / "bin"
        (root / ".venv" / "bin").mkdir(parents=True)
        fake_bin.mkdir()
        (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
        (root / ".venv" / "bin" / "activate").write_text(f'PATH={shlex.quote(str(BIN))}:"$PATH"; export PATH\n')
        requeues = tmp_path / "scontrol.log"
        (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(requeues))}\n')
        (fake_bin / "scontrol").chmod(0o755)
        slurm_env = {"OPTSTUDY_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking, "SLURM_SUBMIT_DIR": str(root),
                     "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
                     "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NAME": "optstudy-worker",
                     "PATH": f"{fake_bin}:{os.environ['PATH']}"}
        # heartbeats every second (grace 2 s) instead of 30 s, so that a dead trial is noticed within the test
        task, task_log = start(["bash", str(SLURM), str(study_file), "--heartbeat", "1"],
                               "slurm-4240_2", slurm_env)
        running = None
        deadline = time.monotonic() + 180
        while running is None:
            assert task.poll() is None, task_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the SLURM task never ran a trial:\n" + task_log.read_text()[-3000:]
            try:
                study = optuna.load_study(study_name=name, storage=open_storage(storage)[0])
                # a trial is RUNNING from Optuna's ask, a moment before the worker records itself on it and suggests
                # its params: wait for both, so that the kill lands mid-trial, after its suggestions
                running = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                if "worker" in t.user_attrs and set(t.params) == {"optimizer", "lr"}), None)
            except KeyError:
                pass
            time.sleep(0.2)
        worker_pid = running.user_attrs["worker"]["pid"]
        os.kill(task.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
        assert task.wait(30) == 0, task_log.read_text()[-3000:]
        assert requeues.read_text().split() == ["requeue", "4242"]
        deadline = time.monotonic() + 10
        while alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker_pid), "the worker outlived its task"
        assert optuna.load_study(study_name=name, storage=open_storage(storage)[0]).trials[
            running.number].state == TrialState.RUNNING  # killed, not failed: heartbeats will retry it
        time.sleep(2.5)  # past the grace period

        # the requeued task and a worker as compose starts it, together
        requeued, requeued_log = start(["bash", str(SLURM), str(study_file), "--heartbeat", "1"], "slurm-4240_2-again",
                                       {**slurm_env, "SLURM_RESTART_COUNT": "1"})
        worker_args = swap_database(argv("worker"), "optuna", storage)
        worker_args = [str(BIN / "optstudy"), *worker_args[1:3], str(study_file), *worker_args[4:], "--heartbeat", "1"]
        (tmp_path / "w").mkdir()
        plain, plain_log = start(worker_args, "worker", {"MLFLOW_TRACKING_URI": tracking}, cwd=tmp_path / "w")
        for proc, log in ((requeued, requeued_log), (plain, plain_log)):
            try:
                assert proc.wait(240) == 0, log.read_text()[-3000:]
            except subprocess.TimeoutExpired:
                pytest.fail("a worker did not finish:\n" + log.read_text()[-3000:])
        assert "start 2" in requeued_log.read_text() and "worker done" in plain_log.read_text()

        # the study: the budget complete, the killed trial failed and run again
        study = optuna.load_study(study_name=name, storage=open_storage(storage)[0])
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == n_trials, [(t.number, t.state.name) for t in trials]
        killed = study.trials[running.number]
        assert killed.state == TrialState.FAIL and set(killed.params) == {"optimizer", "lr"}
        # retried by Optuna's heartbeats (failed_trial) or, this host seeing the pid gone first, by the worker (retry_of)
        retry = [t for t in trials if running.number in (t.system_attrs.get("failed_trial"), t.user_attrs.get("retry_of"))]
        # compared with the killed trial as stored, not as first seen: that read may fall between its two suggestions
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed.params
        assert {t.user_attrs["worker"]["pid"] for t in complete} - {worker_pid}, "the new workers ran nothing"

        # MLflow, through the server: the study's experiment, its parent run, a child run per trial, artifacts
        from mlflow import MlflowClient

        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None and study.user_attrs["tracking_uri"] == tracking
        parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
        assert parent.info.experiment_id == experiment.experiment_id
        assert parent.data.tags["optstudy.role"] == "study"
        children = {r.info.run_id: r for r in client.search_runs(
            [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)}
        for t in complete:
            run = children[t.user_attrs["mlflow_run_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["optuna.trial"] == str(t.number)
            assert run.data.metrics["val_loss"] == pytest.approx(t.value)
        run_id = complete[0].user_attrs["mlflow_run_id"]
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server
        config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "download")))
        assert yaml.safe_load(config.read_text())["optimizer"]["name"] == complete[0].params["optimizer"]
        assert list((tmp_path / "mlartifacts").rglob(f"{run_id}/artifacts/config.yaml"))  # in its destination

        # optuna-dashboard: the study, its trials
        studies = json.loads(wait_http(f"http://127.0.0.1:{dash_port}/api/studies", dash_proc, dash_log))
        summary = next(s for s in studies["study_summaries"] if s["study_name"] == name)
        detail = json.loads(wait_http(f"http://127.0.0.1:{dash_port}/api/studies/{summary['study_id']}", dash_proc,
                                      dash_log))
        assert len(detail["trials"]) == len(trials)
        assert urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/", timeout=10).status == 200  # the UI

        # optstudy's dashboard, from the compose command: the study with its trials, its views read through MLflow
        live_port = free_port()
        live_args = swap_database(argv("dashboard"), "optuna", storage)
        live_args = swap(swap(swap(live_args, "--host", "127.0.0.1"), "--port", str(live_port)), "--tracking-uri",
                         tracking)
        live_proc, live_log = start([str(BIN / "optstudy"), *live_args[1:]], "optstudy-dashboard")
        listed = json.loads(wait_http(f"http://127.0.0.1:{live_port}/api/studies", live_proc, live_log, 180))
        mine = next(s for s in listed["studies"] if s["name"] == name)
        assert mine["states"]["COMPLETE"] == n_trials and mine["trials"] == len(trials)
        state = json.loads(wait_http(f"http://127.0.0.1:{live_port}/api/study/{name}", live_proc, live_log))
        curves = next(v for v in state["views"] if v["id"] == "curves")
        png = wait_http(f"http://127.0.0.1:{live_port}{curves['url']}", live_proc, live_log)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # drawn from the server's metrics
    finally:
        for proc in reversed(procs):
            stop(proc)
