"""The Coffer error hierarchy: one root type, stable codes, typed across the network.

Every error a user can meet is a `CofferError` subclass. Each class carries:

- `code`: a stable string (Azure-backup style, e.g. `UserErrorFsFreezeFailed`) that goes over
  gRPC in the trailing metadata key `coffer-error-code` and into job records, and maps back to
  the same class on the other side (`from_code`);
- `retryable`: whether trying the same thing again may succeed;
- `exit_code`: what the `coffer` CLI exits with, for a refused call and for a job that failed
  with the error alike (README.md's exit code table lists every code under its exit code;
  `tests/test_cli.py` keeps the two in step);
- `grpc_status`: the gRPC status name it travels as;
- its docstring's first line: the message template, formatted with the keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

ERROR_CODE_METADATA_KEY = "coffer-error-code"
# Trailing metadata of a refusal that says when to try again: seconds, as decimal text.
RETRY_AFTER_METADATA_KEY = "coffer-retry-after"


class CofferError(Exception):
    """{detail}"""

    code: ClassVar[str] = "InternalError"
    retryable: ClassVar[bool] = False
    exit_code: ClassVar[int] = 1
    grpc_status: ClassVar[str] = "INTERNAL"
    # Seconds the caller should wait before trying again, when the refusal says so (it
    # travels in the trailing metadata, RETRY_AFTER_METADATA_KEY); None: its own backoff.
    retry_after: float | None = None
    _registry: ClassVar[dict[str, type[CofferError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in CofferError._registry:
                raise TypeError(f"duplicate error code {cls.code}")
            CofferError._registry[cls.code] = cls

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        if message is None:
            template = (self.__doc__ or "{detail}").strip().splitlines()[0]
            try:
                message = template.format(**fields)
            except KeyError:
                message = template
        super().__init__(message)
        self.message = message
        self.fields = fields

    @staticmethod
    def from_code(code: str, message: str) -> CofferError:
        """The error `code` names, carrying `message` (an unknown code gives the root type)."""
        cls = CofferError._registry.get(code, CofferError)
        return cls(message)

    @staticmethod
    def class_of(code: str) -> type[CofferError] | None:
        """The class whose stable code is `code`; None for a code no class has."""
        return CofferError._registry.get(code)

    @staticmethod
    def registered() -> dict[str, type[CofferError]]:
        """Every stable code and its class."""
        return dict(CofferError._registry)

    def __str__(self) -> str:
        return self.message


CofferError._registry[CofferError.code] = CofferError


def find_coffer_error(exc: BaseException) -> CofferError | None:
    """The CofferError `exc` is or, raised out of a task group, holds; None if there is none."""
    if isinstance(exc, CofferError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := find_coffer_error(inner)) is not None:
                return found
    return None


# --- caller mistakes -----------------------------------------------------------------------


class InvalidArgument(CofferError):
    """Invalid argument: {detail}"""

    code = "InvalidArgument"
    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class ConfigInvalid(InvalidArgument):
    """Invalid {source}: {listing}"""

    code = "ConfigInvalid"
    exit_code = 2

    def __init__(
        self, message: str | None = None, *, source: str = "", problems: Sequence[str] = ()
    ) -> None:
        # Every problem found in the file, each a sentence naming its key; kept apart for
        # `coffer-agent doctor`, which reports each as a failed check.
        self.source = source
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            listing = self.problems[0]
        else:
            listing = f"{len(self.problems)} problems:" + "".join(
                f"\n  - {problem}" for problem in self.problems
            )
        super().__init__(message, source=source, listing=listing)


class NotFound(CofferError):
    """{kind} {name!r} was not found."""

    code = "NotFound"
    exit_code = 4
    grpc_status = "NOT_FOUND"


class Conflict(CofferError):
    """{detail}"""

    code = "Conflict"
    exit_code = 5
    grpc_status = "FAILED_PRECONDITION"


class OperationInProgress(Conflict):
    """VM {vm_id!r} already has job {job_id} in progress; wait for it or cancel it."""

    code = "OperationInProgress"
    retryable = True


class PermissionDenied(CofferError):
    """Permission denied: {detail}"""

    code = "PermissionDenied"
    exit_code = 6
    grpc_status = "PERMISSION_DENIED"


class Unauthenticated(CofferError):
    """Not authenticated: {detail}"""

    code = "Unauthenticated"
    exit_code = 6
    grpc_status = "UNAUTHENTICATED"


class PathNotAllowed(PermissionDenied):
    """Restore target {path!r} is outside the directories this agent may restore into ({allowed}); pick a path under one of them or add it to `restore_dirs` in the agent config."""

    code = "UserErrorRestorePathNotAllowed"


# --- the vault workflow ------------------------------------------------------------------


class VaultNotEmpty(Conflict):
    """Vault {vault!r} still has {what}; {fix}"""

    code = "VaultNotEmpty"


class AmbiguousVmName(InvalidArgument):
    """VM name {name!r} is ambiguous: services {services} each have a VM of that name. Give it as service/name."""

    code = "AmbiguousVmName"


class AmbiguousJobId(InvalidArgument):
    """Job id {prefix!r} is ambiguous: it begins the ids of {count} jobs ({candidates}). Give more of it."""

    code = "AmbiguousJobId"


class VmNotFound(NotFound):
    """No enrolled VM is named {name!r}. `coffer agents` lists the VMs whose agents have connected."""

    code = "VmNotFound"


class RegionMismatch(Conflict):
    """VM {vm!r} is in region {vm_region!r} but vault {vault!r} is in region {vault_region!r}; a VM can only be protected by a vault in its own region."""

    code = "UserErrorRegionMismatch"


class AlreadyRegistered(Conflict):
    """VM {vm!r} is already registered to vault {vault!r}; a VM belongs to one vault at a time."""

    code = "UserErrorVmAlreadyRegistered"


class ItemNotRegistered(NotFound):
    """VM {vm!r} is not registered to {where}. {fix}"""

    code = "UserErrorVmNotRegistered"


class ItemStateConflict(Conflict):
    """VM {vm!r} is {state}: {fix}"""

    code = "UserErrorInvalidProtectionState"


class PolicyInUse(Conflict):
    """Policy {policy!r} of vault {vault!r} protects {count} VMs ({vms}); move them to another policy or stop their protection first."""

    code = "PolicyInUse"


class RecoveryPointDeleted(NotFound):
    """Recovery point {recovery_point} of VM {vm!r} is deleted (soft delete keeps it in vault {vault!r} until {purge_at}): it cannot be read until it is undeleted, `coffer undelete {vm} --rp {recovery_point}`."""

    code = "RecoveryPointDeleted"


class BackupWindowMissed(CofferError):
    """The backup of VM {vm!r} due at {slot} could not start before its window closed at {deadline}: {reason}. {fix}"""

    code = "BackupWindowMissed"
    retryable = True
    exit_code = 3
    grpc_status = "DEADLINE_EXCEEDED"


# --- data integrity ------------------------------------------------------------------------


class ChunkDigestMismatch(CofferError):
    """Chunk refused: its bytes hash to {actual}, not to the digest {claimed} it was sent with. Nothing was stored."""

    code = "ChunkDigestMismatch"
    exit_code = 7
    grpc_status = "DATA_LOSS"


class ChunkMissing(CofferError):
    """Chunk {digest} is referenced but not in the datastore."""

    code = "ChunkMissing"
    exit_code = 7
    grpc_status = "DATA_LOSS"


class CorruptData(CofferError):
    """Corrupt data in {what}: {detail}"""

    code = "CorruptData"
    exit_code = 7
    grpc_status = "DATA_LOSS"


class DataCorrupted(CofferError):
    """Recovery point {recovery_point} disk {disk!r}: chunk {chunk} ({digest}) is damaged in the datastore: {detail}. Run a verify of its vault to find every recovery point that needs it; the next backup that holds the same data stores it again."""

    code = "DataCorrupted"
    exit_code = 7
    grpc_status = "DATA_LOSS"


class RecoveryPointsDamaged(CofferError):
    """Verify job {job_id} found {damaged} of {checked} recovery points damaged ({points}): {chunks} missing or corrupt. `coffer rp list` shows which; the next backup of each VM that still holds the data stores those chunks again, and they heal."""

    code = "RecoveryPointsDamaged"
    exit_code = 7
    grpc_status = "DATA_LOSS"


class UnsupportedFormat(CofferError):
    """{what} has format version {version}; this Coffer reads up to version {supported}. Upgrade Coffer to read it."""

    code = "UnsupportedFormat"
    exit_code = 7
    grpc_status = "FAILED_PRECONDITION"


# --- keys of encrypted datastores ------------------------------------------------------------
#
# Exit code 6 ("not allowed"), as for a missing or wrong credential: the data is intact and the
# caller lacks the secret that opens it. 7 ("data integrity") would send an operator to restore
# from a copy for what a configuration fix cures. They travel as FAILED_PRECONDITION: the
# controller's configuration, not the operator's certificate, has to change.


class WrongKey(CofferError):
    """{what} is not encrypted under the master key given ({detail}). Configure the key file or passphrase it was created or last rotated with; its key export (`coffer vault key export`) names the master key it needs."""

    code = "WrongKey"
    exit_code = 6
    grpc_status = "FAILED_PRECONDITION"


class KeyUnavailable(CofferError):
    """The key for {what} is not available: {detail}"""

    code = "KeyUnavailable"
    exit_code = 6
    grpc_status = "FAILED_PRECONDITION"


# --- the agent and its VM ------------------------------------------------------------------


class AgentUnreachable(CofferError):
    """The agent of VM {vm_id!r} is not connected to the controller. Check that coffer-agent runs in the VM and can reach the controller."""

    code = "AgentUnreachable"
    retryable = True
    exit_code = 8
    grpc_status = "UNAVAILABLE"


class DuplicateAgent(Conflict):
    """Another agent process with the certificate of VM {vm_id!r} ({other}) took over its session: two agents run with one identity (a cloned VM, or a second coffer-agent started by hand?). Stop one of them, or give the other VM its own identity (`coffer pki issue-agent NEW-VM`)."""

    code = "DuplicateAgent"
    retryable = True
    grpc_status = "ABORTED"


class AgentDisconnected(CofferError):
    """The agent of VM {vm_id!r} disconnected while job {job_id} was running; the job did not complete and left no recovery point. Run it again once the agent is back."""

    code = "AgentDisconnected"
    retryable = True
    exit_code = 8
    grpc_status = "UNAVAILABLE"


class AgentSilent(CofferError):
    """The agent of VM {vm_id!r} {silence}; the job failed and its slot was freed. Check the agent (`coffer agents`, the agent's log in the VM) and run the job again."""

    code = "AgentSilent"
    retryable = True
    exit_code = 8
    grpc_status = "DEADLINE_EXCEEDED"


class AgentLimitExceeded(CofferError):
    """The agent of VM {vm_id!r} went past a limit of what one agent may make the controller hold: {detail}. An agent that does is faulty or hostile (docs/hostile-agent.md); the call was refused and nothing of it kept."""

    code = "AgentLimitExceeded"
    retryable = True
    exit_code = 6
    grpc_status = "RESOURCE_EXHAUSTED"


class DiskNotFound(CofferError):
    """VM {vm_id!r} has no disk named {disk!r}; its disks are: {known}."""

    code = "UserErrorDiskNotFound"
    exit_code = 4
    grpc_status = "NOT_FOUND"


class DiskReadFailed(CofferError):
    """Could not read disk {disk!r} at {path}: {detail}"""

    code = "UserErrorDiskReadFailed"
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class RestoreTargetFailed(CofferError):
    """Could not write the restore target {path}: {detail}"""

    code = "UserErrorRestoreTargetFailed"
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class RestoreTargetExists(Conflict):
    """Restore target {path} already exists; nothing was written. {fix}"""

    code = "UserErrorRestoreTargetExists"


class FileRecoveryFailed(CofferError):
    """Could not open {what} of recovery point {recovery_point} disk {disk!r} for file recovery: {detail}"""

    code = "UserErrorFileRecoveryFailed"
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class JobCancelled(CofferError):
    """Job {job_id} was cancelled; no recovery point was created."""

    code = "JobCancelled"
    exit_code = 3
    grpc_status = "CANCELLED"


class ControllerRestarted(CofferError):
    """The controller stopped while job {job_id} ran; it did not complete. Run it again."""

    code = "ControllerRestarted"
    retryable = True
    exit_code = 3
    grpc_status = "ABORTED"


# --- the controller and its services -------------------------------------------------------


class Unavailable(CofferError):
    """{detail}"""

    code = "ServiceUnavailable"
    retryable = True
    exit_code = 8
    grpc_status = "UNAVAILABLE"


class ControllerBusy(CofferError):
    """The controller is busy starting other agents' sessions; try again in {retry_after:.1f} s."""

    code = "ControllerBusy"
    retryable = True
    exit_code = 8
    grpc_status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class StateDirInUse(Conflict):
    """The state directory {path} is in use by another coffer-controller ({holder}); stop that one first, or give this controller its own `state_dir`."""

    code = "StateDirInUse"


class StateDirLost(CofferError):
    """The controller's lock on its state directory {path} is gone ({why}); it stops so that a second controller cannot write beside it. Find what removed or replaced the lock file, then start the controller again."""

    code = "StateDirLost"


class CatalogFull(CofferError):
    """The controller's catalog ({path}) cannot be written: its file system is full. Nothing of the change was kept. Free space under the controller's state directory; calls that change state fail until then."""

    code = "CatalogFull"
    retryable = True
    grpc_status = "RESOURCE_EXHAUSTED"


class DatastoreError(CofferError):
    """Datastore error: {detail}"""

    code = "DatastoreError"
    retryable = True
    grpc_status = "UNAVAILABLE"


class DatastoreMissing(NotFound):
    """The datastore of vault {vault!r} is not at {location}, though the catalog knows of data in it. Was `[datastore] url` in the controller config changed? Point it back, or move the datastore there (every vault's datastore is the vault's name under the url)."""

    code = "DatastoreMissing"


class DatastoreUnavailable(DatastoreError):
    """Datastore {location} did not answer {operation}: {detail}"""

    code = "DatastoreUnavailable"
    retryable = True
    exit_code = 8


class DatastoreAccessDenied(PermissionDenied):
    """Datastore {location} refused {operation}: {detail}. Check the access key id and secret key (controller config or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), and that they may read, write, list and delete under the prefix."""

    code = "DatastoreAccessDenied"


class DatastoreBucketMissing(CofferError):
    """Bucket {bucket!r} does not exist at {endpoint}. Create it, or correct the datastore url (s3://bucket/prefix) or endpoint in the controller config."""

    code = "DatastoreBucketMissing"
    exit_code = 4
    grpc_status = "FAILED_PRECONDITION"


class DatastoreFull(CofferError):
    """Datastore {location} is full: {detail}. Free space (prune recovery points, then collect garbage) or grow the storage; backups fail until then."""

    code = "DatastoreFull"
    grpc_status = "RESOURCE_EXHAUSTED"


class DatastoreReadOnly(CofferError):
    """Datastore {location} is read-only: {detail}. Backups and deletions fail until it is writable again; restores still work."""

    code = "DatastoreReadOnly"
    grpc_status = "FAILED_PRECONDITION"


class WriterLeaseHeld(Conflict):
    """Datastore {location} is in use by another controller: {holder} on host {host} (PID {pid}, {address}) holds its writer lease until {expires}. One controller writes a datastore at a time: stop the other one, or wait until its lease expires if it is gone."""

    code = "DatastoreLeaseHeld"


class WriterLeaseLost(CofferError):
    """This controller lost its writer lease on datastore {location}: {detail}. It must stop writing there; restart it once the other writer is stopped."""

    code = "DatastoreLeaseLost"
    grpc_status = "FAILED_PRECONDITION"


# --- off-site copies ------------------------------------------------------------------------


class CopyTargetConflict(Conflict):
    """Copy target {location} holds {found}, not the copy of vault {vault!r}'s datastore ({wanted}); a copy is never written over another datastore. Give the vault another copy target (`coffer vault update {vault} --copy-to NAME`), or move away what is there."""

    code = "CopyTargetConflict"


class RecoveryPointNotCopied(NotFound):
    """Recovery point {rp_id} of vault {vault!r} is not in its copy at {location}: {detail}"""

    code = "RecoveryPointNotCopied"


# --- backup policies -----------------------------------------------------------------------


class CatalogExists(Conflict):
    """The state directory {path} already has a catalog ({catalog}); a recovery would replace it. If the controller's catalog is fine, start the controller instead; to rebuild it from the datastores anyway, run again with --force (the old catalog is kept beside it)."""

    code = "CatalogExists"


class NoDatastores(NotFound):
    """No vault datastore was found under {location}: nothing there has a datastore.json. Check `[datastore] url`, the endpoint and the credentials in the controller config: each vault's datastore is its name under the url."""

    code = "NoDatastoresFound"


class InvalidPolicy(InvalidArgument):
    """Invalid backup policy: {detail}"""

    code = "InvalidPolicy"
    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


# --- consistency: scripts, freeze, snapshots -------------------------------------------------
#
# A backup that could not be made consistent failed as a job: the CLI exits 3 ("the job
# failed"). They travel as FAILED_PRECONDITION: the VM, not the request, has to change.


class UserErrorFsFreezeFailed(CofferError):
    """Could not freeze the file system at {mountpoint} ({fstype}) of disk {disk!r}: {cause}. Stop whatever holds it busy (another fsfreeze, a stuck device), raise `freeze_timeout`, or allow crash-consistent backups (`require_freeze = false`)."""

    code = "UserErrorFsFreezeFailed"
    retryable = True
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class ExtensionSnapshotFailed(CofferError):
    """The snapshot of disk {disk!r} ({provider}) failed: {cause}. {fix}"""

    code = "ExtensionSnapshotFailed"
    retryable = True
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class PreScriptFailed(CofferError):
    """The pre-script {path} failed ({attempts} attempt(s)): {cause}. Run it by hand as root to see why, raise its `timeout`, or set `continue_on_failure = true` to take a file-system-consistent backup when it fails."""

    code = "PreScriptFailed"
    retryable = True
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class PostScriptFailed(CofferError):
    """The post-script {path} failed ({attempts} attempt(s)): {cause}. The snapshot was taken; check that the application resumed, then fix the script, raise its `timeout`, or set `continue_on_failure = true`."""

    code = "PostScriptFailed"
    retryable = True
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


class UserErrorSnapshotProviderUnsupported(CofferError):
    """Disk {disk!r} cannot use the {provider} snapshot provider: {why}. Pick another provider for the disk (or none: the agent then picks the most capable one that works), or give the host what it lacks."""

    code = "UserErrorSnapshotProviderUnsupported"
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


# --- identities: enrolment, renewal, revocation, operator roles ----------------------------
#
# Refusals of who the caller is travel as UNAUTHENTICATED, refusals of what it may do as
# PERMISSION_DENIED: the CLI exits 6 for both ("not allowed").


class CertificateRevoked(Unauthenticated):
    """The certificate of {identity} (serial {serial}) was {reason}; the controller refuses it. {fix}"""

    code = "CertificateRevoked"


class InsufficientRole(PermissionDenied):
    """Operator {name!r} has the role {role}; {method} needs the role {needed} (roles, least first: reader, operator, admin). An admin can issue a certificate with another role (`coffer pki issue-operator NAME --role ROLE`)."""

    code = "InsufficientRole"


class EnrolmentTokenInvalid(Unauthenticated):
    """The enrolment token is not valid: {detail}. Ask an admin for a new one (`coffer enrol create --vm VM`)."""

    code = "EnrolmentTokenInvalid"


class EnrolmentTokenExpired(Unauthenticated):
    """The enrolment token for VM {vm_id!r} expired at {expired}. Ask an admin for a new one (`coffer enrol create --vm {vm_id}`)."""

    code = "EnrolmentTokenExpired"


class EnrolmentTokenUsed(Unauthenticated):
    """The enrolment token for VM {vm_id!r} was already used at {used}; a token enrols once. Ask an admin for a new one (`coffer enrol create --vm {vm_id}`)."""

    code = "EnrolmentTokenUsed"


class EnrolmentVmMismatch(PermissionDenied):
    """{what} names VM {given!r}, but the enrolment token is for VM {vm_id!r}; a token enrols only the VM it was made for."""

    code = "EnrolmentVmMismatch"


class NameReserved(Conflict):
    """The name {name!r} cannot be given to {wanted}: {why}."""

    code = "NameReserved"


class RenewalTooSoon(Conflict):
    """VM {vm_id!r} renewed its certificate less than {seconds} seconds ago; it may renew again after that."""

    code = "RenewalTooSoon"
    retryable = True


# --- ways back: restoring in place, over a target, to another VM, drills ---------------------
#
# Refused restores change nothing. A disk or target that is in use is conflicting state (5):
# unmount or detach it, then ask again; a configured disk as a new image's target is never
# allowed (6); a drill that found damaged file systems is a job that failed (3).


class DiskInUse(Conflict):
    """{what} {path} is in use: {why}. {fix}"""

    code = "UserErrorDiskInUse"
    retryable = True


class RestoreTargetIsDisk(PermissionDenied):
    """Restore target {path} is disk {disk!r} of VM {vm_id!r}; a restore to an image never writes over a configured disk. Roll the disk back with `coffer restore {vm_id} --rp RP --disk {disk} --in-place`, or choose another path."""

    code = "UserErrorRestoreTargetIsDisk"


class RestoreRegionMismatch(Conflict):
    """VM {vm!r} is in region {vm_region!r}, but vault {vault!r} is in region {vault_region!r}: its recovery points restore only to VMs of that region."""

    code = "UserErrorRestoreRegionMismatch"


class DrillFailed(CofferError):
    """The restore drill of recovery point {recovery_point} of VM {vm!r} found {findings}"""

    code = "RestoreDrillFailed"
    exit_code = 3
    grpc_status = "FAILED_PRECONDITION"


# --- the web console -----------------------------------------------------------------------


class WebLoginInvalid(Unauthenticated):
    """The sign-in link is not valid: {detail}. Get a new one with `coffer web login`."""

    code = "WebLoginInvalid"


class WebLoginExpired(Unauthenticated):
    """The sign-in link expired at {expired}; a link is for the next few minutes only. Get a new one with `coffer web login`."""

    code = "WebLoginExpired"


class WebLoginUsed(Unauthenticated):
    """The sign-in link was used already, at {used}; a link signs in once. Get a new one with `coffer web login`."""

    code = "WebLoginUsed"
