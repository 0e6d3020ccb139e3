"""A local stand-in for the NeMo base image, for building docker/Dockerfile where no registry can be reached.

The image's root file system is made from this machine: the Python that runs the tests (with the whole pinned stack
already installed, so the Dockerfile's pip steps resolve offline and install nothing but qatflow), the few programs
the Dockerfile and nemo_run's job scripts call (bash, coreutils, grep, sed, getent, useradd), and the system
libraries all of those link against. /etc is written here, minimal: nothing of this machine's users, keys or
settings goes in. pip in the image never reaches an index.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# Debian packages whose files go in whole: the shell and tools of the Dockerfile, install.sh and nemo_run's scripts.
PACKAGES = ("bash", "dash", "coreutils", "grep", "sed", "libc-bin", "passwd", "login", "findutils")
PIP_CONF = """\
[global]
no-index = true
disable-pip-version-check = true
[install]
# pip reads this switch inverted: "false" turns build isolation off, so building qatflow needs no index either.
no-build-isolation = false
"""
PASSWD = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
SHADOW = "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
GSHADOW = "root:*::\nnogroup:*::\n"
NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"


def python_roots() -> list[Path]:
    """The interpreter's installation, and the virtualenv it runs in if any."""
    roots = [Path(sys.base_prefix).resolve()]
    if Path(sys.prefix).resolve() != roots[0]:
        roots.append(Path(sys.prefix).resolve())
    return roots


def image_path() -> str:
    return ":".join([str(Path(sysconfig.get_path("scripts"))), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
                     "/usr/bin", "/sbin", "/bin"])


def _package_files(packages: tuple[str, ...]) -> list[Path]:
    listing = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in listing.splitlines() if line.startswith("/") and not Path(line).is_dir()]


def _elf_files(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _linked_libraries(files: list[Path]) -> set[Path]:
    """The system libraries (transitively) that these ELF files load, as ldd resolves them here."""
    libraries: set[Path] = set()
    for start in range(0, len(files), 200):
        result = subprocess.run(["ldd", *map(str, files[start:start + 200])], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
                libraries.add(Path(parts[parts.index("=>") + 1]))
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                libraries.add(Path(parts[0]))
    return libraries


def _physical(path: Path) -> Path:
    """The path with its folders resolved (Debian's /bin, /lib are links into /usr), the file itself not."""
    return Path(os.path.realpath(path.parent)) / path.name


def system_files() -> list[Path]:
    """Programs, their libraries and the libraries of everything in the Python trees; links with their targets."""
    wanted = {_physical(p) for p in _package_files(PACKAGES)}
    python_files = [p for root in python_roots() for p in root.rglob("*")
                    if p.suffix == ".so" or ".so." in p.name or p.parent.name == "bin"]
    elves = _elf_files(sorted(wanted) + python_files)
    wanted |= {_physical(p) for p in _linked_libraries(elves)}
    roots = tuple(str(root) + "/" for root in python_roots())
    closed: set[Path] = set()
    for path in wanted:
        while True:
            if str(path).startswith(roots) or path in closed or not os.path.lexists(path):
                break
            closed.add(path)
            if not path.is_symlink():
                break
            path = _physical(path.parent / os.readlink(path))
    return sorted(closed)


def base_key() -> str:
    """Changes when the Python stack changes: the installed distributions and the interpreter."""
    names = sorted(p.name for root in python_roots() for p in root.rglob("*.dist-info") if p.is_dir())
    return hashlib.sha256("\n".join([sys.version, *map(str, python_roots()), *names]).encode()).hexdigest()[:12]


def _stage_etc(staging: Path) -> None:
    """The image's own top folders, Debian's /usr links and a minimal /etc, in a folder that tar starts from."""
    for folder, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("home", 0o755), ("root", 0o755),
                         ("etc/default", 0o755), ("etc/skel", 0o755)):
        (staging / folder).mkdir(parents=True, exist_ok=True)
        (staging / folder).chmod(mode)
    for link in ("bin", "sbin", "lib", "lib64"):  # Debian's merged /usr
        if Path("/" + link).is_symlink():
            (staging / link).symlink_to(os.readlink("/" + link))
    for name, text, mode in (("passwd", PASSWD, 0o644), ("group", GROUP, 0o644), ("shadow", SHADOW, 0o640),
                             ("gshadow", GSHADOW, 0o640), ("nsswitch.conf", NSSWITCH, 0o644),
                             ("pip.conf", PIP_CONF, 0o644)):
        (staging / "etc" / name).write_text(text)
        (staging / "etc" / name).chmod(mode)
    # Settings of useradd and the new user's shell files: Debian's defaults, no secrets in them.
    for name in ("login.defs", "default/useradd", "skel/.bashrc", "skel/.profile", "skel/.bash_logout"):
        if (Path("/etc") / name).is_file():
            shutil.copy2(Path("/etc") / name, staging / "etc" / name)


def rootfs_command(staging: Path) -> list[str]:
    """A GNU tar command that writes the root file system to stdout, every file owned by root as in an image."""
    _stage_etc(staging)
    members = [str(path).lstrip("/") for path in system_files() if path.parts[1] != "etc"]
    (staging.parent / "members.txt").write_text("\n".join(members) + "\n")
    # Named files without recursion (their folders are made on import), then the Python trees whole.
    return ["tar", "-c", "-f", "-", "--numeric-owner", "--owner=0", "--group=0", "-C", str(staging), ".",
            "--no-recursion", "-C", "/", "-T", str(staging.parent / "members.txt"), "--recursion",
            *[str(root).lstrip("/") for root in python_roots()]]


def import_base(tag: str, docker_env: dict[str, str], timeout: int = 900) -> None:
    """`docker import` of the root file system as `tag`, with PATH at this Python."""
    changes = [f"ENV PATH={image_path()}", "ENV LANG=C.UTF-8", "CMD [\"/bin/bash\"]"]
    with tempfile.TemporaryDirectory(prefix="qatflow-rootfs-") as scratch:
        staging = Path(scratch) / "rootfs"
        staging.mkdir()
        archive = subprocess.Popen(rootfs_command(staging), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", *[arg for change in changes for arg in ("--change", change)],
                                   "-", tag], stdin=archive.stdout, capture_output=True, text=True, env=docker_env,
                                  timeout=timeout)
        archive.stdout.close()
        tar_errors = archive.stderr.read().decode(errors="replace")
        archive.wait(timeout=60)
    if archive.returncode != 0 or imported.returncode != 0:
        raise RuntimeError(f"making the base image failed: tar: {tar_errors[-1500:]} docker import: "
                           f"{imported.stderr[-1500:]}")
