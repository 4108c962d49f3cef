"""Checks on the code itself: the generated protobuf code matches the .proto files, and the
README's configuration examples are accepted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, AgentFile
from controller.config import ControllerConfig, ControllerFile, MqttBroker
from shared.config import Section, sections

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _readme_block(name: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"`{name}`:\n\n```toml\n", 1)[1].split("```", 1)[0]


def _readme_blocks(name: str) -> list[str]:
    """Every example of `name` in the README: the main one, and those introduced by
    "`name` with ...:" (the controller's with an S3 datastore, with the web console, with
    metrics and alerts)."""
    readme = (ROOT / "README.md").read_text()
    found = re.findall(rf"`{re.escape(name)}`[^`]*?:\n\n```toml\n(.*?)```", readme, re.DOTALL)
    assert found
    assert found[0] == _readme_block(name)
    return found


def _uncommented(block: str) -> str:
    """The block with its commented-out settings (`# key = ...`, `# [table]`) switched on."""
    return re.sub(r"^# (?=[\w\[])", "", block, flags=re.MULTILINE)


@pytest.mark.parametrize("name", ["controller.toml", "agent.toml"])
def test_the_readme_config_examples_load(name: str, tmp_path: Path) -> None:
    """The configuration files the README shows are ones the programs accept, also with
    every setting it shows commented out switched on."""
    block = _readme_block(name)
    path = tmp_path / name
    path.write_text(block)
    if name == "agent.toml":
        agent = AgentConfig.load(path)
        assert agent.consistency.pre_script is not None
        assert agent.consistency.pre_script.continue_on_failure
    else:
        controller = ControllerConfig.load(path)
        assert controller.gc_grace_seconds == 21600
    path.write_text(_uncommented(block))
    if name == "agent.toml":
        agent = AgentConfig.load(path)
        assert agent.consistency.require_freeze
        assert agent.consistency.order_for("root") == ("read-while-frozen",)
        assert agent.controller_name == "controller.example.net"
    else:
        controller = ControllerConfig.load(path)
        assert controller.mqtt == MqttBroker("mqtt.example.net", 8883)
        assert controller.advertise_host == "controller.example.net"


def test_the_readme_s3_controller_config_loads(tmp_path: Path) -> None:
    """The README's controller config for an S3 datastore with a passphrase, as shown and with
    every setting it shows commented out switched on."""
    s3 = _readme_blocks("controller.toml")[1]
    path = tmp_path / "controller.toml"
    for text in (s3, _uncommented(s3)):
        path.write_text(text)
        controller = ControllerConfig.load(path)
        assert controller.datastores.url == "s3://coffer-backups/eu"
        assert controller.datastores.s3 is not None
        assert controller.datastores.s3.region == "eu-central-1"
        assert controller.encryption.passphrase_file == Path("/etc/coffer/passphrase")


@pytest.mark.parametrize(
    ("name", "schema"), [("controller.toml", ControllerFile), ("agent.toml", AgentFile)]
)
def test_the_readme_config_examples_show_every_key(name: str, schema: type[Section]) -> None:
    """Every key the program knows is shown in the README's examples (at least in a comment)."""
    block = "\n".join(_readme_blocks(name))
    shown = set(re.findall(r"^(?:# )?\[{1,2}([\w.]+)\]{1,2}|^(?:# )?(\w+) =", block, re.M))
    names = {part for table, key in shown for part in (table.split(".") if table else [key])}
    names.add("post_script")  # named in a comment: "and [consistency.post_script]"
    for path, _, model in sections(schema):
        for key in model.model_fields:
            assert key in names, f"{'.'.join((*path, key))} is not in the README's {name}"
