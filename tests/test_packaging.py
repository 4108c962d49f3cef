"""The agent installs without the controller's dependencies.

pyproject.toml splits them: what both sides need is the base, `coffer[agent]` adds what only
the agent uses and `coffer[controller]` the controller's and the CLI's. This builds, in
seconds, a virtualenv holding exactly `coffer[agent]` (the distributions its requirements
pull in, taken from this environment, and the `agent` and `shared` packages) and starts the
agent from it: `coffer-agent --version` and every agent module imports, while the
controller's libraries are not there to import.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)

CONTROLLER_ONLY = (
    "aiosqlite",
    "click",
    "rich",
    "obstore",
    "aiohttp",
    "jinja2",
    "prometheus_client",
)


def closure(name: str, extras: set[str]) -> set[str]:
    """The distributions `name[extras]` needs, itself excluded, recursively."""
    wanted: set[str] = set()
    todo = [(name, extras)]
    while todo:
        dist, chosen = todo.pop()
        for text in metadata.requires(dist) or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in (chosen or {""})
            ):
                continue
            key = canonicalize_name(requirement.name)
            if key == "coffer" or key in wanted:
                continue
            wanted.add(key)
            todo.append((requirement.name, set(requirement.extras)))
    return wanted


def test_the_agents_requirements_leave_out_the_controllers() -> None:
    agent = closure("coffer", {"agent"})
    controller = closure("coffer", {"controller"})
    for name in ("aiosqlite", "click", "rich", "obstore", "aiohttp", "jinja2", "prometheus-client"):
        assert name in controller
        assert name not in agent, f"the agent would install {name}"
    assert "pyfuse3" in agent
    assert "pyfuse3" not in controller


def _link_distribution(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        source = Path(str(dist.locate_file(top)))
        target = site / top
        if source.exists() and not target.exists():
            target.symlink_to(source)


def test_the_agent_starts_from_a_venv_with_only_its_own_dependencies(tmp_path: Path) -> None:
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    assert site != Path(sysconfig.get_paths()["purelib"])
    for name in closure("coffer", {"agent"}):
        _link_distribution(name, site)
    for package in ("agent", "shared"):
        shutil.copytree(
            ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    info = site / f"coffer-{metadata.version('coffer')}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: coffer\nVersion: {metadata.version('coffer')}\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
        )

    version = subprocess.run(
        [str(python), "-m", "agent.main", "--version"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"coffer-agent {metadata.version('coffer')}"
    modules = sorted(p.stem for p in (ROOT / "agent").glob("*.py") if p.stem != "__init__")
    imported = run(f"import importlib\nfor m in {modules!r}: importlib.import_module('agent.' + m)")
    assert imported.returncode == 0, imported.stderr
    for name in (*CONTROLLER_ONLY, "controller"):
        missing = run(f"import {name}")
        assert missing.returncode != 0, f"{name} is importable in the agent's venv"
