"""Real QEMU guests with the Coffer agent inside: the cached image and the guests run from it."""

from deploy.vm.errors import VmError
from deploy.vm.guest import Guest, GuestSpec
from deploy.vm.image import Image, build

__all__ = ["Guest", "GuestSpec", "Image", "VmError", "build"]
