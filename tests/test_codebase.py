"""Checks on the code itself: the generated protobuf code matches the .proto files, and the
README's configuration examples are accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig
from controller.config import ControllerConfig

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["controller.toml", "agent.toml"])
def test_the_readme_config_examples_load(name: str, tmp_path: Path) -> None:
    """The configuration files the README shows are ones the programs accept."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split(f"`{name}`:\n\n```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / name
    path.write_text(block)
    if name == "agent.toml":
        agent = AgentConfig.load(path)
        assert agent.consistency.pre_script is not None
        assert agent.consistency.pre_script.continue_on_failure
    else:
        controller = ControllerConfig.load(path)
        assert controller.gc_grace_seconds == 21600
