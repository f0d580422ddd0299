"""The Dockerfile, read statically (no Docker engine here), and the wheel it installs."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from .rendering import CHART_DIR, REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|build-base|musl-dev|libc6?-dev|python3?-dev)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert match, line
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], match[1])
            stages.append(Stage(base=base, name=match[2]))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"{args} should be exec form (a JSON array)"
    return [str(part) for part in parsed]


def test_image_is_multi_stage_with_a_wheel_build_stage(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    build = stages[0]
    assert any(re.search(r"pip wheel|-m build", run) for run in build.all("RUN"))
    copies_from_build = [c for c in final.all("COPY") if c.startswith(f"--from={build.name}")]
    assert copies_from_build, "the final stage must take the wheel from the build stage"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base)


def test_final_stage_runs_as_a_fixed_non_root_uid(final: Stage) -> None:
    user = final.last("USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), "USER must be numeric for runAsNonRoot checks"
    assert int(user.split(":")[0]) != 0


def test_chart_runs_the_image_with_its_own_uid(final: Stage) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    uid = int(final.last("USER").split(":")[0])
    assert values["securityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsUser"] == uid


def test_final_stage_installs_no_compiler(final: Stage) -> None:
    for run in final.all("RUN"):
        for install in re.findall(r"(?:apt-get|apt|apk|yum|dnf)\s+(?:install|add)\b[^&;|]*", run):
            assert not COMPILERS.search(install), install
    pip_installs = [run for run in final.all("RUN") if "pip install" in run]
    assert pip_installs
    assert all("--only-binary" in run for run in pip_installs), "never build from source here"


def test_exposes_the_proxy_and_admin_ports(final: Stage) -> None:
    ports = {p.split("/")[0] for args in final.all("EXPOSE") for p in args.split()}
    assert {"8080", "9090"} <= ports


def test_healthcheck_calls_healthz_with_the_interpreter_only(final: Stage) -> None:
    check = final.last("HEALTHCHECK")
    command = exec_form(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9090/healthz" in command[2]
    compile(command[2], "<healthcheck>", "exec")


def test_entrypoint_is_idlegate_serve_with_the_chart_config_path(final: Stage) -> None:
    command = exec_form(final.last("ENTRYPOINT")) + exec_form(final.last("CMD"))
    assert command[:2] == ["idlegate", "serve"]
    config_path = command[command.index("-c") + 1]
    deployment = (CHART_DIR / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    assert f"- {config_path}\n" in deployment


def build_sources(stages: list[Stage]) -> list[str]:
    """What the build stage copies from the build context (not from other stages)."""
    sources: list[str] = []
    for copy in stages[0].all("COPY"):
        parts = [p for p in copy.split() if not p.startswith("--")]
        assert not copy.startswith("--from"), copy
        sources.extend(parts[:-1])
    return sources


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parents = [str(Path(*Path(path).parts[:i])) for i in range(1, len(Path(path).parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = {glob, glob.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, g) for p in parents for g in globs):
            ignored = not negated
    return ignored


def test_dockerignore_admits_the_build_sources_and_nothing_else(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in build_sources(stages):
        files = [source] if (REPO_ROOT / source).is_file() else [
            str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / source).rglob("*.py")
        ]  # fmt: skip
        assert files, f"{source} is missing from the repository"
        for file in files:
            assert not dockerignored(file, patterns), f"{file} would be left out of the build"
    for private in [
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "gateway/__pycache__/x.pyc",
    ]:
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker daemon"


def unmet_build_requirements() -> list[str]:
    """pyproject's build-system.requires not satisfied here (the wheel is built offline,
    without build isolation, so they must be installed with the test extras)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    unmet = []
    for text in pyproject["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{text} (installed: {installed})")
    return unmet


def test_wheel_built_like_the_image_holds_the_package_and_console_script(
    stages: list[Stage], tmp_path: Path
) -> None:
    unmet = unmet_build_requirements()
    assert not unmet, f"install {unmet} (add them to the test extras in pyproject.toml)"
    context = tmp_path / "context"
    context.mkdir()
    for source in build_sources(stages):
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, context / source)
    dist = tmp_path / "dist"

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(dist), str(context)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("idlegate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    shipped = {
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "gateway").rglob("*")
        if p.suffix in {".py", ".lua", ".typed"}
    }
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert not [n for n in names if n.startswith("tests/")]
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert entry_points["console_scripts"]["idlegate"] == declared["project"]["scripts"]["idlegate"]
    assert entry_points["console_scripts"]["idlegate"].startswith("gateway.cli:")
    assert re.search(r"^Requires-Dist: aiohttp", metadata, re.M)
