"""Strict config files: every mistake in a controller or agent config is named with its key,
its section and the nearest known key, and neither program starts with one; good configs give
the same values as before."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig, DiskConfig
from agent.consistency import ConsistencyPolicy
from agent.scripts import Script
from agent.snapshot import DEFAULT_ORDER
from controller.config import (
    DEFAULT_CHUNK_SIZE,
    ControllerConfig,
    DatastoreSettings,
    EncryptionSettings,
    MqttBroker,
)
from shared.address import Address, parse_address, parse_host
from shared.errors import ConfigInvalid, InvalidArgument
from tests.cluster import BIN, Cluster

# --- the agent -------------------------------------------------------------------------------


def agent_toml(top: str = "", disk: str = "", consistency: str = "", script: str = "") -> str:
    """A valid agent config, with lines added to its top level, disk, [consistency] and
    [consistency.pre_script]."""
    return (
        f'vm_id = "web-1"\ncontroller = "ctl.example.net:7443"\ntls_dir = "tls"\n{top}\n'
        f'[[disks]]\nname = "root"\npath = "/dev/vda"\n{disk}\n'
        f"[consistency]\n{consistency}\n"
        f'[consistency.pre_script]\npath = "/etc/coffer-agent/quiesce.sh"\n{script}\n'
    )


BAD_AGENT_CONFIGS = [
    # Unknown keys: the nearest known one, in the key's own section or where it belongs.
    (agent_toml(top='regoin = "eu-west"'), "unknown key 'regoin': did you mean 'region'?"),
    (
        agent_toml(top='restore_dir = ["/srv/restore"]'),
        "unknown key 'restore_dir': did you mean 'restore_dirs'?",
    ),
    (
        agent_toml(consistency="requre_freeze = true"),
        "unknown key 'requre_freeze' in [consistency]: did you mean 'require_freeze'?",
    ),
    (
        agent_toml(top="requre_freeze = true"),
        "unknown key 'requre_freeze': did you mean 'require_freeze' in [consistency]?",
    ),
    (  # written under [[disks]] instead of [consistency]
        agent_toml(disk="require_freeze = true"),
        "unknown key 'require_freeze' in [[disks]] #1: did you mean 'require_freeze' in "
        "[consistency]?",
    ),
    (
        agent_toml(script="retyres = 2"),
        "unknown key 'retyres' in [consistency.pre_script]: did you mean 'retries'?",
    ),
    (
        agent_toml(disk='snapshots = ["reflink"]'),
        "unknown key 'snapshots' in [[disks]] #1: did you mean 'snapshot'?",
    ),
    (
        agent_toml(top="colour = 1"),
        "unknown key 'colour': known keys at the top level: vm_id, name, service, region, "
        "controller, tls_dir, state_dir, restore_dirs, controller_name, disks, consistency",
    ),
    # Types: nothing coerced; a boolean is not an integer.
    (
        agent_toml(consistency='require_freeze = "yes"'),
        "'require_freeze' in [consistency] must be true or false, not a string ('yes')",
    ),
    (
        agent_toml(consistency='freeze_timeout = "10"'),
        "'freeze_timeout' in [consistency] must be a number, not a string ('10')",
    ),
    (
        agent_toml(script="retries = true"),
        "'retries' in [consistency.pre_script] must be an integer, not a boolean (true)",
    ),
    (
        agent_toml(script="retries = 1.5"),
        "'retries' in [consistency.pre_script] must be an integer, not a number (1.5)",
    ),
    (
        agent_toml(script='args = ["--flush", 1]'),
        "item 2 of 'args' in [consistency.pre_script] must be a string, not an integer (1)",
    ),
    (
        agent_toml(top='restore_dirs = "/srv/restore"'),
        "'restore_dirs' must be a list, not a string ('/srv/restore')",
    ),
    (agent_toml(top="region = 3"), "'region' must be a string, not an integer (3)"),
    (
        'vm_id = "web-1"\ncontroller = "ctl.example.net:7443"\ntls_dir = "tls"\nconsistency = 5\n',
        "'consistency' must be a table, not an integer (5)",
    ),
    # Addresses.
    (
        agent_toml().replace("ctl.example.net:7443", "ctl.example.net"),
        "'controller': 'ctl.example.net' is not host:port, e.g. 'ctl.example.net:7443'",
    ),
    (
        agent_toml().replace("ctl.example.net:7443", "::1:7443"),
        "'controller': '::1:7443': an IPv6 address goes in brackets, e.g. '[::1]:7443'",
    ),
    (
        agent_toml().replace("ctl.example.net:7443", "[::1]:70000"),
        "'controller': '[::1]:70000': the port 70000 is not within 1-65535",
    ),
    (
        agent_toml().replace('"ctl.example.net:7443"', "7443"),
        "'controller' must be a string, not an integer (7443)",
    ),
    # Ranges and meanings.
    (
        agent_toml(consistency="thaw_deadline = 5"),
        "[consistency]: thaw_deadline (5 s) must be longer than freeze_timeout (10 s): the "
        "watchdog would thaw a file system while its freeze may still be under way",
    ),
    (
        agent_toml(script="timeout = 0"),
        "'timeout' in [consistency.pre_script] must be more than 0, not 0",
    ),
    (
        agent_toml(consistency="thaw_deadline = inf"),
        "'thaw_deadline' in [consistency] must be a finite number, not inf",
    ),
    (
        agent_toml(disk='snapshot = ["reflnk"]'),
        "item 1 of 'snapshot' in [[disks]] #1: unknown snapshot provider 'reflnk': did you "
        "mean 'reflink'? known: reflink, btrfs-subvolume, lvm, read-while-frozen",
    ),
    (
        agent_toml().replace('"web-1"', '"Web 1"'),
        "'vm_id': VM id 'Web 1' must be 1-63 characters of a-z, 0-9, '.', '_' or '-', "
        "starting with a letter or digit",
    ),
    (
        agent_toml().replace('name = "root"', 'name = "root/1"'),
        "'name' in [[disks]] #1: disk name 'root/1' must be 1-64 letters, digits, '.', '_' "
        "or '-', starting with a letter or digit",
    ),
    (
        agent_toml(top='[[disks]]\nname = "root"\npath = "/dev/vdb"'),
        "disk names repeat in [[disks]]: root",
    ),
    (agent_toml(top='state_dir = ""'), "'state_dir' must not be empty"),
    # Required keys.
    (agent_toml().replace('vm_id = "web-1"\n', ""), "missing required key 'vm_id'"),
    (
        agent_toml().replace('path = "/etc/coffer-agent/quiesce.sh"\n', ""),
        "missing required key 'path' in [consistency.pre_script]",
    ),
]


@pytest.mark.parametrize(("text", "problem"), BAD_AGENT_CONFIGS)
def test_a_bad_agent_config_names_its_key(text: str, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigInvalid) as raised:
        AgentConfig.load(path)
    assert raised.value.problems == (problem,)
    assert str(raised.value) == f"Invalid agent config {path}: {problem}"
    assert isinstance(raised.value, InvalidArgument)
    assert (raised.value.code, raised.value.exit_code) == ("ConfigInvalid", 2)


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        agent_toml(top='regoin = "eu-west"', consistency="freeze = 1", script="retyres = 2")
    )
    with pytest.raises(ConfigInvalid) as raised:
        AgentConfig.load(path)
    assert sorted(raised.value.problems) == [
        "'freeze' in [consistency] must be true or false, not an integer (1)",
        "unknown key 'regoin': did you mean 'region'?",
        "unknown key 'retyres' in [consistency.pre_script]: did you mean 'retries'?",
    ]
    assert str(raised.value).startswith(f"Invalid agent config {path}: 3 problems:\n  - ")


def test_a_file_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="cannot read it: No such file or directory"):
        AgentConfig.load(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text('vm_id = "web-1\n')
    with pytest.raises(ConfigInvalid, match=r"bad.toml: it is not valid TOML: "):
        AgentConfig.load(tmp_path / "bad.toml")


def test_a_full_agent_config_gives_the_same_values_as_before(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "agent.toml"
    path.write_text(
        'vm_id = "web-1"\nname = "Web one"\nservice = "shop"\nregion = "eu-west"\n'
        'controller = "[fd00::1]:7443"\ncontroller_name = "ctl.example.net"\n'
        'tls_dir = "tls"\nstate_dir = "/var/lib/coffer-agent"\n'
        'restore_dirs = ["restore", "/srv/restore"]\n'
        '[[disks]]\nname = "root"\npath = "/dev/vda"\n'
        '[[disks]]\nname = "data"\npath = "data.img"\nsnapshot = ["read-while-frozen"]\n'
        "[consistency]\nfreeze = true\nrequire_freeze = true\nfreeze_timeout = 5\n"
        'thaw_deadline = 20.5\nsnapshot = ["reflink", "read-while-frozen"]\n'
        '[consistency.pre_script]\npath = "/etc/q.sh"\nargs = ["--flush"]\ntimeout = 60\n'
        "retries = 1\ncontinue_on_failure = true\nretry_delay = 0.5\n"
        '[consistency.post_script]\npath = "/etc/r.sh"\n'
    )
    base = path.parent.absolute()
    assert AgentConfig.load(path) == AgentConfig(
        vm_id="web-1",
        name="Web one",
        service="shop",
        region="eu-west",
        controller="[fd00::1]:7443",
        tls_dir=base / "tls",
        state_dir=Path("/var/lib/coffer-agent"),
        disks=(DiskConfig("root", Path("/dev/vda")), DiskConfig("data", base / "data.img")),
        restore_dirs=(base / "restore", Path("/srv/restore")),
        controller_name="ctl.example.net",
        consistency=ConsistencyPolicy(
            pre_script=Script(Path("/etc/q.sh"), ("--flush",), 60.0, 1, True, 0.5),
            post_script=Script(Path("/etc/r.sh")),
            freeze=True,
            require_freeze=True,
            freeze_timeout=5.0,
            thaw_deadline=20.5,
            providers=("reflink", "read-while-frozen"),
            disk_providers={"data": ("read-while-frozen",)},
        ),
    )


def test_a_minimal_agent_config_takes_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('vm_id = "web-1"\ncontroller = "localhost:7443"\ntls_dir = "/tls"\n')
    assert AgentConfig.load(path) == AgentConfig(
        vm_id="web-1",
        name="web-1",
        service="default",
        region="",
        controller="localhost:7443",
        tls_dir=Path("/tls"),
        state_dir=Path("/var/lib/coffer-agent"),
        disks=(),
        consistency=ConsistencyPolicy(providers=DEFAULT_ORDER),
    )


# --- the controller --------------------------------------------------------------------------


def controller_toml(top: str = "", mqtt: str | None = None) -> str:
    text = f'listen = "127.0.0.1:7443"\nstate_dir = "state"\npki_dir = "pki"\n{top}\n'
    return text if mqtt is None else text + f"[mqtt]\n{mqtt}\n"


BAD_CONTROLLER_CONFIGS = [
    (
        controller_toml().replace("127.0.0.1:7443", "28745"),
        ("'listen': '28745' is not host:port, e.g. '127.0.0.1:28745'",),
    ),
    (
        controller_toml().replace('"127.0.0.1:7443"', "28745"),
        ("'listen' must be a string, not an integer (28745)",),
    ),
    (
        controller_toml().replace("listen", "lisen"),
        ("unknown key 'lisen': did you mean 'listen'?",),
    ),
    (
        controller_toml(top='chunk_size = "512K"'),
        ("'chunk_size' must be an integer, not a string ('512K')",),
    ),
    (
        controller_toml(top="chunk_size = 1000000"),
        ("'chunk_size': 1000000 is not a power of two from 4096 (4 KiB) to 16777216 (16 MiB)",),
    ),
    (
        controller_toml(top="chunk_size = 33554432"),
        ("'chunk_size': 33554432 is not a power of two from 4096 (4 KiB) to 16777216 (16 MiB)",),
    ),
    (
        controller_toml(top="chunk_size = true"),
        ("'chunk_size' must be an integer, not a boolean (true)",),
    ),
    (
        controller_toml(top="chunk_sise = 4096"),
        ("unknown key 'chunk_sise': did you mean 'chunk_size'?",),
    ),
    (
        controller_toml(top="gc_grace_seconds = -1"),
        ("'gc_grace_seconds' must be at least 0, not -1",),
    ),
    (
        controller_toml(top='gc_grace_seconds = "6h"'),
        ("'gc_grace_seconds' must be a number, not a string ('6h')",),
    ),
    (
        controller_toml(top='advertise_host = "ctl.example.net:7443"'),
        (
            "'advertise_host': 'ctl.example.net:7443' is not a host name or IP address "
            "(a port does not go here)",
        ),
    ),
    (
        controller_toml(mqtt='host = "mqtt.example.net"\nport = "8883"'),
        ("'port' in [mqtt] must be an integer, not a string ('8883')",),
    ),
    (
        controller_toml(mqtt='host = "mqtt.example.net"\nport = 0'),
        ("'port' in [mqtt] must be at least 1, not 0",),
    ),
    (
        controller_toml(mqtt='hots = "mqtt.example.net"\nport = 8883'),
        (
            "missing required key 'host' in [mqtt]",
            "unknown key 'hots' in [mqtt]: did you mean 'host'?",
        ),
    ),
    (
        controller_toml(top='host = "mqtt.example.net"'),
        ("unknown key 'host': did you mean 'host' in [mqtt]?",),
    ),
    (
        controller_toml().replace('state_dir = "state"\n', ""),
        ("missing required key 'state_dir'",),
    ),
    (
        controller_toml().replace('"pki"', '["pki"]'),
        ("'pki_dir' must be a string, not a list (['pki'])",),
    ),
]


def test_a_full_controller_config_gives_the_same_values_as_before(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(
        'listen = "[::]:7443"\nstate_dir = "state"\npki_dir = "/etc/coffer/pki"\n'
        'chunk_size = 1048576\ngc_grace_seconds = 3600\nadvertise_host = "ctl.example.net"\n'
        '[mqtt]\nhost = "10.0.0.5"\nport = 8883\n'
    )
    config = ControllerConfig.load(path)
    assert config == ControllerConfig(
        listen="[::]:7443",
        state_dir=tmp_path.absolute() / "state",
        pki_dir=Path("/etc/coffer/pki"),
        chunk_size=1 << 20,
        mqtt=MqttBroker("10.0.0.5", 8883),
        advertise_host="ctl.example.net",
        gc_grace_seconds=3600.0,
    )
    assert config.listen_host == "::"
    path.write_text('state_dir = "/s"\npki_dir = "/p"\n')
    assert ControllerConfig.load(path) == ControllerConfig(
        "127.0.0.1:7443", Path("/s"), Path("/p"), DEFAULT_CHUNK_SIZE
    )


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7443", Address("127.0.0.1", 7443)),
        ("ctl.example.net:1", Address("ctl.example.net", 1)),
        ("localhost:65535", Address("localhost", 65535)),
        ("[::1]:7443", Address("::1", 7443)),
        ("[fd00::1]:8883", Address("fd00::1", 8883)),
    ],
)
def test_addresses_that_parse(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "'' is not host:port, e.g. 'host:7443'"),
        ("7443", "'7443' is not host:port, e.g. '127.0.0.1:7443'"),
        ("host:", "'host:': the port '' is not a number"),
        ("host:0", "'host:0': the port 0 is not within 1-65535"),
        ("host:65536", "'host:65536': the port 65536 is not within 1-65535"),
        ("host:+80", "'host:+80': the port '+80' is not a number"),
        (":7443", "':7443': the host is empty"),
        ("::1:7443", "'::1:7443': an IPv6 address goes in brackets, e.g. '[::1]:7443'"),
        ("[::1]7443", "'[::1]7443' is not [IPv6 address]:port, e.g. '[::1]:7443'"),
        ("[host]:7443", "'host' in '[host]:7443' is not a valid IPv6 address"),
        ("300.1.1.1:80", "'300.1.1.1:80': '300.1.1.1' is not a valid IPv4 address"),
        ("ho st:80", "'ho st:80': 'ho st' is not a host name or IP address"),
        ("https://h:80", "'https://h:80': 'https://h' is not a host name or IP address"),
    ],
)
def test_addresses_that_do_not(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_address(text)


def test_listen_may_take_any_free_port() -> None:
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == Address("127.0.0.1", 0)
    assert parse_host("[::1]") == "::1"


# --- the programs ----------------------------------------------------------------------------


def test_the_controller_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    """`listen = "28745"` used to end in a traceback."""
    path = tmp_path / "controller.toml"
    path.write_text(controller_toml().replace("127.0.0.1:7443", "28745"))
    result = subprocess.run(
        [str(BIN / "coffer-controller"), "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"coffer-controller: Invalid controller config {path}: 'listen': '28745' is not "
        "host:port, e.g. '127.0.0.1:28745'\n"
    )
    assert not (tmp_path / "state").exists()  # nothing was started or created


def test_doctor_reports_config_problems_as_failed_checks(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(agent_toml(top='regoin = "eu-west"', consistency="requre_freeze = true"))
    result = subprocess.run(
        [str(BIN / "coffer-agent"), "doctor", "--config", str(path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout) == [
        {
            "check": "config",
            "verdict": "fail",
            "found": "unknown key 'requre_freeze' in [consistency]: did you mean 'require_freeze'?",
            "fix": f"edit {path}",
        },
        {
            "check": "config",
            "verdict": "fail",
            "found": "unknown key 'regoin': did you mean 'region'?",
            "fix": f"edit {path}",
        },
    ]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster") as running:
        yield running


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_misspelt_region_does_not_reach_the_controller(cluster: Cluster, tmp_path: Path) -> None:
    """An agent config with `regoin` used to enrol the VM with an empty region, overwriting
    the one recorded for it; now the agent refuses to start and the record is kept."""
    image = tmp_path / "root.img"
    with image.open("wb") as f:
        f.truncate(4 << 20)
    agent = cluster.add_agent("web-1", {"root": image}, region="eu-west")
    assert agent.process.stop() == 0
    cluster.wait_online("web-1", online=False)
    agent.config.write_text(agent.config.read_text().replace("region =", "regoin ="))
    agent.process.start()
    assert agent.process.popen is not None
    assert agent.process.popen.wait(30) == 2
    log = agent.process.log.read_text()
    assert f"coffer-agent: Invalid agent config {agent.config}: unknown key 'regoin': did you " \
        "mean 'region'?" in log  # fmt: skip
    assert "Traceback" not in log
    (listed,) = cluster.coffer("agents")
    assert (listed["vm_id"], listed["region"], listed["online"]) == ("web-1", "eu-west", False)


# --- the controller's datastores and master key ----------------------------------------------


def storage_toml(datastore: str = "", encryption: str | None = None) -> str:
    text = controller_toml() + f"[datastore]\n{datastore}\n"
    return text if encryption is None else text + f"[encryption]\n{encryption}\n"


S3 = 'url = "s3://coffer-backups/eu"\n'

BAD_STORAGE_CONFIGS = [
    (
        storage_toml('url = "http://store.example.net/coffer"'),
        (
            "'url' in [datastore]: 'http://store.example.net/coffer' is neither a directory "
            "nor s3://bucket/prefix",
        ),
    ),
    (
        storage_toml('url = "s3://Coffer_Backups/eu"'),
        (
            "'url' in [datastore]: bucket name 'Coffer_Backups' in 's3://Coffer_Backups/eu' "
            "must be 3-63 lower-case letters, digits, '.' or '-', starting and ending with a "
            "letter or digit",
        ),
    ),
    (
        storage_toml('url = "/srv/coffer"\nendpoint = "https://s3.example.net"\nregion = "x"'),
        ("[datastore]: endpoint, region: only for an s3:// url",),
    ),
    (
        storage_toml(S3 + 'endpoint = "http://10.0.0.5:8333"'),
        (
            "[datastore]: endpoint http://10.0.0.5:8333 is plain HTTP: use https, or set "
            "allow_http = true for a store on this machine or a trusted network",
        ),
    ),
    (
        storage_toml(S3 + 'endpoint = "s3.example.net"'),
        ("'endpoint' in [datastore]: 's3.example.net' is not an http:// or https:// URL",),
    ),
    (
        storage_toml(S3 + 'access_key_id = "AKIA123"'),
        ("[datastore]: access_key_id and secret_access_key go together",),
    ),
    (
        storage_toml(S3 + "max_concurrent_requests = 0"),
        ("'max_concurrent_requests' in [datastore] must be at least 1, not 0",),
    ),
    (
        storage_toml(S3 + "lease_seconds = 1"),
        ("'lease_seconds' in [datastore] must be at least 3, not 1",),
    ),
    (
        storage_toml(S3 + 'secret_key = "x"'),
        ("unknown key 'secret_key' in [datastore]: did you mean 'secret_access_key'?",),
    ),
    (
        storage_toml(S3, 'master_key_file = "k"\npassphrase_file = "p"'),
        ("[encryption]: a master key file or a passphrase file, not both",),
    ),
    (
        storage_toml(S3, 'master_key = "k"'),
        ("unknown key 'master_key' in [encryption]: did you mean 'master_key_file'?",),
    ),
]


def test_datastore_and_encryption_settings(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(controller_toml())
    config = ControllerConfig.load(path)
    # The defaults: datastores and the master key in the state directory.
    assert config.datastores == DatastoreSettings(str(tmp_path.absolute() / "state/datastores"))
    assert config.encryption == EncryptionSettings()
    assert config.default_master_key_file == tmp_path.absolute() / "state/master.key"
    # A relative directory is taken from the config file's directory, as every path.
    path.write_text(storage_toml('url = "backups"', 'master_key_file = "keys/master.key"'))
    config = ControllerConfig.load(path)
    assert config.datastores.url == str(tmp_path.absolute() / "backups")
    assert config.datastores.s3 is None
    assert config.encryption.master_key_file == tmp_path.absolute() / "keys/master.key"
    path.write_text(
        storage_toml(
            S3 + 'endpoint = "http://127.0.0.1:8333"\nallow_http = true\nregion = "eu-1"\n'
            'access_key_id = "AKIA123"\nsecret_access_key = "s3cr3t"\nlease_seconds = 30\n',
            'passphrase_file = "/etc/coffer/passphrase"',
        )
    )
    config = ControllerConfig.load(path)
    settings = config.datastores
    assert settings.url == "s3://coffer-backups/eu"
    assert settings.lease_seconds == 30
    assert settings.s3 is not None
    assert (settings.s3.endpoint, settings.s3.region, settings.s3.allow_http) == (
        "http://127.0.0.1:8333",
        "eu-1",
        True,
    )
    assert (settings.s3.access_key_id, settings.s3.secret_access_key) == ("AKIA123", "s3cr3t")
    assert "s3cr3t" not in repr(config)  # a config may be logged; its secrets are not shown
    assert config.encryption.passphrase_file == Path("/etc/coffer/passphrase")


# --- off-site copy targets ---------------------------------------------------------------------


def targets_toml(*targets: str, datastore: str = "") -> str:
    text = controller_toml() + (f"[datastore]\n{datastore}\n" if datastore else "")
    return text + "".join(f"[[copy_targets]]\n{target}\n" for target in targets)


BAD_COPY_TARGET_CONFIGS = [
    (
        targets_toml('url = "s3://coffer-copies/eu"'),
        ("missing required key 'name' in [[copy_targets]] #1",),
    ),
    (
        targets_toml('name = "US copy"\nurl = "/srv/copies"'),
        ("'name' in [[copy_targets]] #1: 'US copy' is not 1-63 lowercase letters, digits or '-'",),
    ),
    (
        targets_toml('name = "us"\nurl = "/srv/a"', 'name = "us"\nurl = "/srv/b"'),
        ("[[copy_targets]]: more than one is named us",),
    ),
    (
        targets_toml('name = "us"\nurl = "/srv/coffer/copies"', datastore='url = "/srv/coffer"'),
        (
            "[[copy_targets]] 'us': url /srv/coffer/copies overlaps [datastore] url /srv/coffer: "
            "a copy must live apart from the data it copies and from other copies",
        ),
    ),
    (
        targets_toml('name = "us"\nurl = "state/datastores"'),
        (
            "[[copy_targets]] 'us': url state/datastores overlaps [datastore] url "
            "state/datastores: a copy must live apart from the data it copies and from other "
            "copies",
        ),
    ),
    (
        targets_toml('name = "a"\nurl = "s3://copies/eu"', 'name = "b"\nurl = "s3://copies"'),
        (
            "[[copy_targets]] 'b': url s3://copies overlaps copy target 'a' s3://copies/eu: a "
            "copy must live apart from the data it copies and from other copies",
        ),
    ),
    (
        targets_toml('name = "us"\nurl = "/srv/copies"\nregion = "us-east-1"'),
        ("[[copy_targets]] #1: region: only for an s3:// url",),
    ),
    (
        targets_toml('name = "us"\nurl = "s3://copies/eu"\nendpont = "https://s3.example.net"'),
        ("unknown key 'endpont' in [[copy_targets]] #1: did you mean 'endpoint'?",),
    ),
]


def test_copy_targets_settings(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(controller_toml())
    assert ControllerConfig.load(path).copy_targets == ()
    path.write_text(
        targets_toml(
            'name = "nas"\nurl = "copies"',
            'name = "us-copy"\nurl = "s3://coffer-copies/eu"\nendpoint = "https://s3.example.net"'
            '\naccess_key_id = "AKIA123"\nsecret_access_key = "s3cr3t"\nlease_seconds = 30',
            datastore='url = "s3://coffer-backups/eu"',
        )
    )
    nas, us = ControllerConfig.load(path).copy_targets
    assert (nas.name, nas.url, nas.s3, nas.is_s3) == (
        "nas",
        str(tmp_path.absolute() / "copies"),
        None,
        False,
    )
    assert (us.name, us.url, us.lease_seconds, us.is_s3) == (
        "us-copy",
        "s3://coffer-copies/eu",
        30,
        True,
    )
    assert us.s3 is not None
    assert (us.s3.endpoint, us.s3.access_key_id) == ("https://s3.example.net", "AKIA123")
    assert "s3cr3t" not in repr(us)


# --- [web], [metrics], [alerts] -------------------------------------------------------------

BAD_OPERATIONS_CONFIGS = [
    (
        controller_toml() + '[web]\nlisten = "0.0.0.0:7480"\ncert_file = "web.crt"\n',
        ("[web]: cert_file and key_file go together",),
    ),
    (
        controller_toml() + '[web]\nlisten = "0.0.0.0:7480"\nurl = "http://backup.example.net"\n',
        ("[web]: url 'http://backup.example.net': the console is served over https only",),
    ),
    (
        controller_toml() + '[web]\nlisten = "0.0.0.0:7480"\nlogin_link_seconds = 7200\n',
        ("'login_link_seconds' in [web] must be at most 3600, not 7200",),
    ),
    (
        controller_toml() + '[web]\nlisen = "0.0.0.0:7480"\n',
        (
            "missing required key 'listen' in [web]",
            "unknown key 'lisen' in [web]: did you mean 'listen'?",
        ),
    ),
    (
        controller_toml() + "[alerts]\ncheck_seconds = 0\n",
        ("'check_seconds' in [alerts] must be at least 1, not 0",),
    ),
    (
        controller_toml() + '[[alerts.webhooks]]\nurl = "hooks.example.net"\n',
        ("'url' in [[alerts.webhooks]] #1: 'hooks.example.net' is not an http:// or https:// URL",),
    ),
    (
        controller_toml() + '[alerts.email]\nhost = "smtp.example.net"\nsender = "c@x"\nto = []\n',
        ("'to' in [alerts.email] must not be empty",),
    ),
]


def test_web_metrics_and_alerts_are_off_until_configured(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(controller_toml())
    config = ControllerConfig.load(path)
    assert config.web is None
    assert config.metrics is None
    assert config.alerts.webhooks == ()
    assert config.alerts.email is None
    path.write_text(
        controller_toml()
        + '[web]\nlisten = "0.0.0.0:7480"\ncert_file = "w.crt"\nkey_file = "w.key"\n'
        + '[alerts.email]\nhost = "smtp.example.net"\nsender = "c@x"\nto = ["a@x"]\n'
        + 'username = "c"\npassword_file = "smtp.pw"\n'
    )
    config = ControllerConfig.load(path)
    assert config.web is not None
    assert config.web.cert_file == tmp_path / "w.crt"
    assert config.alerts.email is not None
    assert config.alerts.email.password_file == tmp_path / "smtp.pw"


# Every table of bad controller configs, one check: each is refused, naming each problem.
@pytest.mark.parametrize(
    ("text", "problems"),
    BAD_CONTROLLER_CONFIGS + BAD_STORAGE_CONFIGS + BAD_COPY_TARGET_CONFIGS + BAD_OPERATIONS_CONFIGS,
)
def test_a_bad_controller_config_names_its_key(
    text: str, problems: tuple[str, ...], tmp_path: Path
) -> None:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    with pytest.raises(ConfigInvalid) as raised:
        ControllerConfig.load(path)
    assert raised.value.problems == problems
