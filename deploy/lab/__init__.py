"""The lab: VMs made of Linux namespaces, for the end-to-end tests and the demo (see lab.py)."""

from deploy.lab.lab import Lab, LabError

__all__ = ["Lab", "LabError"]
