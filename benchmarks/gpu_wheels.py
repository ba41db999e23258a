"""The wheels `benchmarks/gpu_check.sh` needs on a GPU machine without network access.

``download FOLDER`` runs where the package is installed and the network is reachable; copy
FOLDER to the GPU machine and run ``MACE_WHEELS=FOLDER bash benchmarks/gpu_check.sh``, which
calls ``select FOLDER`` there: the wheels whose distribution that machine lacks or has at an
older version (its own newer installs are kept). The downloaded wheels are this
installation's versions (the ones the test suite ran with) of every distribution the package
needs, except those a GPU machine brings with its torch and transformers (``--have``), built for
the GPU machine's Python (``--python-version``) on x86-64 Linux. open-clip-torch comes without
its dependencies: only its CLIP vocabulary file is read.

    python benchmarks/gpu_wheels.py download FOLDER [--python-version 3.12] [--have torch,transformers]
    python benchmarks/gpu_wheels.py select FOLDER
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PACKAGE = "mace-kernels"
LEAVES = ("open-clip-torch",)  # wanted without their own dependencies
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def requirements_of(dist: str) -> list[str]:
    """The installed distributions ``dist`` requires (extras and other platforms' markers left out)."""
    found = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        found.append(canonicalize_name(req.name))
    return found


def closure(roots: list[str]) -> set[str]:
    """Every installed distribution reachable from ``roots`` through their requirements."""
    seen: set[str] = set()
    stack = [canonicalize_name(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        stack.extend(requirements_of(name))
    return seen


def wanted(have: list[str]) -> dict[str, str]:
    """distribution -> version: what the package needs beyond ``have`` and their dependencies."""
    needed = closure(requirements_of(PACKAGE)) - closure(have)
    needed |= {canonicalize_name(leaf) for leaf in LEAVES}
    return {name: metadata.version(name) for name in sorted(needed)}


def to_install(folder: Path) -> list[Path]:
    """The wheels in ``folder`` whose distribution is not installed here, or is older."""
    chosen = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        try:
            if version <= Version(metadata.version(name)):
                continue
        except metadata.PackageNotFoundError:
            pass
        chosen.append(wheel)
    return chosen


def download(folder: Path, python_version: str, have: list[str]) -> list[Path]:
    """Download the pinned wheels into ``folder``; the wheels now there."""
    try:
        pins = wanted(have)
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"gpu_wheels: {exc} is not installed here; run it where {PACKAGE} is installed") from None
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(folder)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={version}" for name, version in pins.items()]
    done = subprocess.run(command)
    if done.returncode:
        raise SystemExit(f"gpu_wheels: pip download failed (exit {done.returncode})")
    return sorted(folder.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="download the wheels into FOLDER")
    get.add_argument("folder", type=Path)
    get.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    get.add_argument("--have", default="torch,transformers",
                     help="comma-separated distributions the GPU machine already has, with their dependencies")
    pick = commands.add_parser("select", help="print the wheels in FOLDER this machine needs, one per line")
    pick.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "select":
        if not args.folder.is_dir():
            raise SystemExit(f"gpu_wheels: {args.folder} is not a folder")
        for wheel in to_install(args.folder):
            print(wheel)
        return 0
    wheels = download(args.folder, args.python_version, [h for h in args.have.split(",") if h])
    width = max([len(w.name) for w in wheels] + [5])
    print(f"{'wheel':<{width}} {'MB':>6}")
    for wheel in wheels:
        print(f"{wheel.name:<{width}} {wheel.stat().st_size / 2**20:6.1f}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels for Python {args.python_version}, {total:.1f} MB in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
