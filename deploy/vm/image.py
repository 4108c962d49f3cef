"""The guest image: Debian 12 with the Coffer agent in it, built once and cached by its inputs.

`build(cache)` returns an `Image` (a raw ext4 root file system, the kernel and the initrd taken
out of it) and builds it only when the cache has none for these inputs. The steps, each timed
and printed:

1. `mmdebstrap --variant=minbase` of bookworm from the Debian mirror this machine's apt uses
   (`host_mirror`), with systemd, the distribution's cloud kernel (`linux-image-cloud-amd64`),
   python3, FUSE 3, e2fsprogs and qemu-guest-agent (the test's way to run a command inside
   the guest); documentation and locales are left out. The result is a tarball cached by its
   own key (`base_key`: packages, mirror, recipe), unpacked for each image: a change to the
   agent's code does not rebuild the Debian tree.
2. The agent, installed from this checkout on the host side: the host's pip installs
   `coffer[agent]` with `--target` into `/opt/coffer` of the tree (the host interpreter must be
   the guest's minor version, 3.11, so the compiled wheels fit), byte-compiled there too. Guest
   CPU is emulated and 10-19x slower; nothing is compiled or installed inside the guest, and
   nothing writes `__pycache__` at run time (a write to `/` while it is frozen would block).
3. What makes it a Coffer VM: the agent's systemd unit from deploy/systemd, a unit that
   configures the network from the kernel command line (`coffer.ip=`), the journal
   application (`journal_app.py`) and its unit, `/etc/fstab` (the data disk on `/data`),
   volatile journald.
4. The kernel and initrd copied out of `/boot` (QEMU boots them with `-kernel`/`-initrd`), and
   the tree made into an ext4 image with `mkfs.ext4 -d` (no loop device, no mount).

The cache key is a SHA-256 of everything that goes in: the package list, the mirror, the
agent's code (shared/, agent/, pyproject.toml), the unit files and this package's guest files.
A build goes to a temporary directory that is renamed into place only when complete, so an
interrupted build leaves no half image that a later call would take as done; the two newest
images stay in the cache, older ones are removed. Downloaded packages stay in `debs/` of the
cache, so a build after a code change downloads nothing the mirror has not changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.vm.errors import VmError

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
GUEST_PYTHON = (3, 11)  # bookworm's python3: the host's pip installs wheels for it
DEFAULT_CACHE = Path(os.environ.get("COFFER_VM_CACHE", "/var/cache/coffer-vm"))
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "python3",
    "fuse3",
    "libfuse3-3",
    "e2fsprogs",
    "util-linux",
    "kmod",
    "iproute2",
    "qemu-guest-agent",
)
# The agent's code and what else goes into the image: a change to any of them is a new image.
INPUTS = ("shared", "agent", "pyproject.toml", "deploy/systemd/coffer-agent.service",
          "deploy/vm/image.py", "deploy/vm/journal_app.py", "deploy/vm/guest_files")  # fmt: skip
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
            "/usr/share/lintian/*")  # fmt: skip
MASKED = ("getty.target", "systemd-logind.service", "e2scrub_reap.service", "e2scrub_all.timer",
          "fstrim.timer", "dpkg-db-backup.timer", "apt-daily.timer", "apt-daily-upgrade.timer",
          "systemd-timesyncd.service")  # fmt: skip
BASE_VERSION = 1  # of `_debootstrap`'s recipe: a change to it makes a new Debian tree
SLACK_MIB = 384  # free space in the root file system beyond what the tree uses
KEEP_IMAGES = 2  # images kept in the cache: this checkout's and the one before (another branch)


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache: boot `kernel` with `initrd`, root on `root`."""

    directory: Path
    key: str

    @property
    def root(self) -> Path:
        return self.directory / "root.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.directory / "image.json"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.root, self.kernel, self.initrd, self.manifest))


def host_mirror(sources: Sequence[Path] = ()) -> str:
    """The Debian archive this machine's apt uses (its first `.../debian` URI for bookworm)."""
    files = list(sources) or [Path("/etc/apt/sources.list"),
                              *sorted(Path("/etc/apt/sources.list.d").glob("*"))]  # fmt: skip
    for path in files:
        with contextlib.suppress(OSError):
            text = path.read_text()
            # deb822 stanzas (URIs: ... Suites: ...) and one-line "deb URI SUITE ..." entries.
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.findall(r"^URIs:\s*(\S+)", stanza, re.M)
                suites = re.findall(r"^Suites:\s*(.+)$", stanza, re.M)
                if (uris and suites and SUITE in suites[0].split()
                        and uris[0].rstrip("/").endswith("/debian")):  # fmt: skip
                    return str(uris[0]).rstrip("/")
            for uri, suite in re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
                if suite == SUITE and uri.rstrip("/").endswith("/debian"):
                    return str(uri).rstrip("/")
    raise VmError("no Debian bookworm mirror in this machine's apt sources; pass --mirror")


def base_key(mirror: str) -> str:
    """The Debian tree's key: what mmdebstrap is given, not the agent's code, so a change to
    the agent rebuilds the image from the cached tree in a minute instead of from the mirror."""
    recipe = {"packages": PACKAGES, "mirror": mirror, "suite": SUITE, "excludes": EXCLUDES,
              "version": BASE_VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def input_key(mirror: str) -> str:
    """The cache key: a digest of the packages, the mirror and every input file's content."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"packages": PACKAGES, "mirror": mirror, "suite": SUITE,
                              "python": GUEST_PYTHON}).encode())  # fmt: skip
    for name in INPUTS:
        path = REPO / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            digest.update(str(f.relative_to(REPO)).encode() + b"\0")
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()[:16]


class Steps:
    """Prints each build step as it starts and how long it took; keeps the figures."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"==> {name}", flush=True)
        started = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - started, 1)
        print(f"    {name}: {self.seconds[name]} s", flush=True)


def run(*argv: str | Path, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)  # fmt: skip
    if done.returncode != 0:
        raise VmError(f"{Path(str(argv[0])).name} exited {done.returncode}: "
                      f"{(done.stderr or done.stdout).strip()[-2000:]}")  # fmt: skip
    return done.stdout


def build(cache: Path = DEFAULT_CACHE, *, mirror: str | None = None, force: bool = False) -> Image:
    """The cached image for this checkout, built first if the cache has none."""
    if sys.version_info[:2] != GUEST_PYTHON:
        raise VmError(f"the host's Python is {sys.version_info[0]}.{sys.version_info[1]}; "
                      "the image's agent is installed by it for the guest's 3.11")  # fmt: skip
    mirror = mirror or host_mirror()
    image = Image(cache / input_key(mirror), input_key(mirror))
    if image.complete() and not force:
        print(f"==> image {image.key} is cached in {image.directory}", flush=True)
        return image
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} is missing: run deploy/install.sh")
    cache.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".build-{image.key}-", dir=cache))
    try:
        tree = work / "tree"
        base = cache / "base" / f"{base_key(mirror)}.tar"
        if not base.exists():
            debs = cache / "debs"
            print(f"    downloads from {mirror}: {', '.join(PACKAGES)} and what they depend "
                  f"on, unless {debs} has them")  # fmt: skip
            with steps.step(f"mmdebstrap {SUITE} minbase into {base}"):
                _debootstrap(base, mirror, debs)
        with steps.step(f"unpack the Debian tree {base.name}"):
            tree.mkdir()
            run("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", base,
                "-C", tree)  # fmt: skip
        with steps.step("install coffer[agent] from this checkout into /opt/coffer (host pip)"):
            _install_agent(tree, work)
        with steps.step("guest files: units, fstab, journal application"):
            _configure(tree)
        with steps.step("kernel and initrd out of /boot"):
            _take_boot_files(tree, work)
        with steps.step("ext4 root image (mkfs.ext4 -d)"):
            size = _make_root(tree, work / "root.img")
        shutil.rmtree(tree)
        manifest = {"key": image.key, "mirror": mirror, "packages": PACKAGES,
                    "root_mib": size, "steps_seconds": steps.seconds,
                    "total_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        (work / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if image.directory.exists():
            shutil.rmtree(image.directory)
        work.rename(image.directory)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    print(f"==> image {image.key} built in {round(time.monotonic() - started, 1)} s: "
          f"{image.directory}", flush=True)  # fmt: skip
    _prune(cache, image)
    return image


def _prune(cache: Path, keep: Image, images: int = KEEP_IMAGES) -> None:
    """Remove all but the newest `images` images (each about 450 MiB); `keep` stays."""
    others = (d for d in cache.iterdir() if d != keep.directory and Image(d, d.name).complete())
    built = sorted(others, key=lambda d: d.stat().st_mtime, reverse=True)
    for old in built[images - 1 :]:
        print(f"    removing the older image {old}", flush=True)
        shutil.rmtree(old, ignore_errors=True)


def _debootstrap(base: Path, mirror: str, debs: Path) -> None:
    """The Debian tree as a tarball `base`, with the packages kept in `debs` so the next one
    downloads only what is new (mmdebstrap's own recipe for a local cache: sync-in before,
    sync-out after). Older tarballs are removed once it is in place."""
    debs.mkdir(parents=True, exist_ok=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    partial = base.with_suffix(".partial.tar")
    archives = "/var/cache/apt/archives"
    argv: list[str | Path] = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--include=" + ",".join(PACKAGES),
        "--skip=essential/unlink", f'--setup-hook=mkdir -p "$1"{archives}/',
        f"--setup-hook=sync-in {debs} {archives}/", f"--customize-hook=sync-out {archives} {debs}",
    ]  # fmt: skip
    argv += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDES]
    argv += ["--dpkgopt=path-include=/usr/share/doc/*/copyright", SUITE, partial,
             f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main"]  # fmt: skip
    try:
        run(*argv)
        partial.rename(base)
    finally:
        partial.unlink(missing_ok=True)
    for old in base.parent.glob("*.tar"):
        if old != base:
            old.unlink()


def _install_agent(tree: Path, work: Path) -> None:
    target = tree / "opt" / "coffer"
    run(sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location",
        "--target", target, f"{REPO}[agent]")  # fmt: skip
    # The controller's code comes with the package; the guest never runs it.
    shutil.rmtree(target / "controller", ignore_errors=True)
    shutil.rmtree(target / "bin", ignore_errors=True)
    # Byte-compiled here with the same minor version the guest runs, with paths as the
    # guest sees them: the guest never writes __pycache__.
    run(sys.executable, "-m", "compileall", "-q", "-j", "0", "-d", "/opt/coffer",
        "--invalidation-mode", "unchecked-hash", target)  # fmt: skip


def _configure(tree: Path) -> None:
    files = HERE / "guest_files"
    for source in sorted(files.rglob("*")):
        if source.is_file():
            dest = tree / source.relative_to(files)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            dest.chmod(0o755 if "/bin/" in str(dest) else 0o644)
    shutil.copyfile(REPO / "deploy/systemd/coffer-agent.service",
                    tree / "etc/systemd/system/coffer-agent.service")  # fmt: skip
    shutil.copyfile(HERE / "journal_app.py", tree / "usr/local/bin/coffer-journal-app")
    (tree / "usr/local/bin/coffer-journal-app").chmod(0o755)
    (tree / "etc/hostname").write_text("coffer-guest\n")
    (tree / "data").mkdir(exist_ok=True)
    (tree / "etc/coffer-agent").mkdir(exist_ok=True)
    # The agent's state directory (systemd's StateDirectory would make it) and the directory
    # its restores and recovered files may go to (its config's restore_dirs).
    (tree / "var/lib/coffer-agent/restore").mkdir(parents=True, exist_ok=True)
    (tree / "var/lib/coffer-agent").chmod(0o700)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("coffer-agent.service", "coffer-enrol.service", "coffer-journal.service",
                 "coffer-net.service"):  # fmt: skip
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    # Under emulation every unit started costs seconds of boot: what a guest that is reached
    # through qemu-guest-agent and has no users does not need is masked (no login prompts,
    # no logind, no timers of maintenance jobs).
    for unit in MASKED:
        mask = tree / "etc/systemd/system" / unit
        if not mask.is_symlink():
            mask.symlink_to("/dev/null")
    (tree / "etc/machine-id").write_text("")  # made at each first boot


def _take_boot_files(tree: Path, work: Path) -> None:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise VmError("the image has no kernel or initrd in /boot")
    shutil.copyfile(kernels[-1], work / "vmlinuz")
    shutil.copyfile(initrds[-1], work / "initrd.img")
    # The guest boots with -kernel/-initrd: the copies in its /boot are not needed.
    for f in (*kernels, *initrds):
        f.unlink()


def _make_root(tree: Path, image: Path) -> int:
    used = int(run("du", "-sxm", tree).split()[0])
    size = -(-(used + SLACK_MIB) // 64) * 64
    with image.open("wb") as f:
        f.truncate(size << 20)
    run("mkfs.ext4", "-q", "-F", "-L", "coffer-root", "-d", tree, image)
    return size
