"""A real VM: the agent in a QEMU guest, its disks backed up live, the VM booted from the restore.

Issue 15's proof (tests/vm_scenario.py says each step). It boots real guests under QEMU's
emulator and builds the guest image first when the cache has none (about 2 minutes), so it is
marked `vm`: `-m "not vm"` skips it; the full suite (`.ci/run`) runs it. Phase timings are
printed (`-s`) and recorded in docs/vm-guest.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.vm_scenario import run

pytestmark = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.timeout(2400),  # a cold image build and a loaded machine
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tap devices, the lab)"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="QEMU is missing: run deploy/install.sh"
    ),
]


def test_guest_backed_up_live_restored_and_booted_again(tmp_path: Path) -> None:
    figures = run(tmp_path)
    print("\n" + json.dumps(figures, indent=2))
    # Every check is inside the scenario; what is left is what the operator would look at.
    assert figures["full"]["frozen_ms"] > 0
    assert figures["incremental"]["sent_mib"] < figures["full"]["sent_mib"]
