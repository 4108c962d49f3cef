"""Who may call which operator RPC: the role each method needs, and whether it changes state.

One table, `OPERATOR_METHODS`, names every method of `OperatorService` with the least operator
role that may call it and whether a call changes state (those are audited). The gRPC edge
(`controller.interceptors`) checks it on every call, before the handler runs. A method not in
the table is refused to everyone, admins included: a new RPC is unusable until someone decides
who may call it (`tests/test_access.py` walks the service and fails for a method left out).

- reader: lists, the dashboard, job views;
- operator: backups, restores, files, verify, cancelling a job, discovery;
- admin: vaults, policies, protection (register, protect, stop, resume), deletes, pruning and
  garbage collection, PKI (revocation, certificates), enrolment, keys, the audit log.

Operator certificates from before roles existed carry none: they are taken as `admin` (what
every operator was then), with a warning in the log once per certificate; re-issue them with
a role (`coffer pki issue-operator NAME --role ROLE`) and revoke the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shared.errors import InsufficientRole
from shared.tls import OperatorRole

READER, OPERATOR, ADMIN = OperatorRole.READER, OperatorRole.OPERATOR, OperatorRole.ADMIN
# The role an operator certificate without one is taken to have (see the module note).
LEGACY_ROLE: Final = OperatorRole.ADMIN


@dataclass(frozen=True)
class Access:
    """What calling one method takes."""

    needs: OperatorRole
    changes: bool = False
    """It changes state: every call is audited."""


_READ = Access(READER)
_OPERATE = Access(OPERATOR, changes=True)
_ADMINISTER = Access(ADMIN, changes=True)

OPERATOR_METHODS: Final[dict[str, Access]] = {
    # lists, the dashboard, job views
    "ListAgents": _READ,
    "ListVaults": _READ,
    "GetVault": _READ,
    "ListItems": _READ,
    "GetPolicy": _READ,
    "ListPolicies": _READ,
    "ListJobs": _READ,
    "GetJob": _READ,
    "WatchJob": _READ,
    "ListRecoveryPoints": _READ,
    "Dashboard": _READ,
    # backups, restores, cancelling; discovery records a job
    "Discover": _OPERATE,
    "BackupNow": _OPERATE,
    "Restore": _OPERATE,
    "Drill": _OPERATE,
    "Undelete": _ADMINISTER,
    "Copy": _OPERATE,
    "UpgradeVault": _ADMINISTER,
    "CancelJob": _OPERATE,
    # files of a recovery point (each call a FileRecovery job), and verifying recovery points
    "ListFiles": _OPERATE,
    "GetFiles": _OPERATE,
    "MountFiles": _OPERATE,
    "UnmountFiles": _OPERATE,
    "Verify": _OPERATE,
    # vaults, policies, protection, deletes
    "CreateVault": _ADMINISTER,
    "UpdateVault": _ADMINISTER,
    "DeleteVault": _ADMINISTER,
    "Register": _ADMINISTER,
    "Unregister": _ADMINISTER,
    "CreatePolicy": _ADMINISTER,
    "UpdatePolicy": _ADMINISTER,
    "DeletePolicy": _ADMINISTER,
    "Protect": _ADMINISTER,
    "StopProtection": _ADMINISTER,
    "ResumeProtection": _ADMINISTER,
    "Prune": _ADMINISTER,
    "CollectGarbage": _ADMINISTER,
    # identities and the audit log
    "CreateEnrolmentToken": _ADMINISTER,
    "ListCertificates": Access(ADMIN),
    "RevokeCertificates": _ADMINISTER,
    "ListAudit": Access(ADMIN),
    # a vault's keys: an export is audited too (whoever holds it and the master key reads the
    # vault's data)
    "RotateVaultKey": _ADMINISTER,
    "ExportVaultKeys": _ADMINISTER,
}


def access_of(method: str) -> Access | None:
    """What the operator RPC `method` (its bare name) takes; None if no one may call it."""
    return OPERATOR_METHODS.get(method)


def check_role(name: str, role: OperatorRole, method: str) -> Access:
    """The method's access if operator `name` with `role` may call it; else InsufficientRole."""
    access = access_of(method)
    if access is None:
        raise InsufficientRole(
            f"Operator method {method} is not in the controller's table of roles, so no one "
            "may call it (a controller older than its client, or a method someone forgot to "
            "give a role).",
        )
    if not role.allows(access.needs):
        raise InsufficientRole(name=name, role=role, method=method, needed=access.needs)
    return access
