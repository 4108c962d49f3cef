"""The one error of the guest tooling: what went wrong building, starting or asking a guest."""


class VmError(Exception):
    """A guest image could not be built, or a guest started, stopped or asked."""
