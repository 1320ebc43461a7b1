"""Wheels for nodes without a package index: what rayimgcls needs that a target image lacks, trimmed and packed.

Run on a connected machine (any OS, any Python with pip), for the target's Python and platform:

    jobs/offline_bundle.sh 3.12 bundle/ --have target-freeze.txt       # bundle/rayimgcls-deps.tar.xz
    jobs/offline_bundle.sh 3.12 bundle/ --have target-freeze.txt --format wheels --max-mib 60

1. Resolve rayimgcls's dependencies (pyproject.toml) that the target lacks, for the target, with pip's own
   resolver (`pip install --dry-run --report`, `--only-binary=:all: --python-version --platform`): metadata
   only, nothing large is downloaded. The target's packages are not pinned as constraints: a partial list
   sends pip's backtracking past its limit (measured: 7 minutes, then ResolutionTooDeep); where the resolver
   chose another version of a package the target has, the log says so (the target's stays).
2. Keep only what the target lacks and what is reachable from rayimgcls through packages the target lacks
   (a package the target has brings its dependencies along already).
3. `pip download --no-deps` exactly those wheels.
4. Trim files no rayimgcls command runs (Ray's Java jars, RLlib, the dashboard's web assets) and pack:
   `tar.xz` (default) of the tree `pip install --target` makes, unpacked onto PYTHONPATH on the target; or
   `wheels`: the trimmed wheels, re-zipped, for `pip install --no-index --no-deps`.
5. Print the sizes (each wheel, the bundle, the repository as `git archive` packs it) and the install command,
   also written to OUT/INSTALL.txt; with --max-mib, exit 1 when bundle + repository exceed it.

Only the standard library and pip are used, so this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The platform tags pip matches exactly, newest glibc first: a manylinux_2_28 box takes all of these.
DEFAULT_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
# Paths (globs, relative to site-packages) that no rayimgcls command uses: Ray's Java worker jars (33 MB),
# RLlib (7.8 MB) and the dashboard's JavaScript (8.4 MB; index.html stays, so the dashboard process, which
# Serve's REST API and the job server run in, still starts).
TRIM = (
    "ray/jars",
    "ray/rllib",
    "ray/dashboard/client/build/static",
    "ray/dashboard/client/build/speedscope-*",
)
ARCHIVE = "rayimgcls-deps.tar.xz"
MIB = 1 << 20


def canonical(name: str) -> str:
    """PEP 503 name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------------
# Inputs: rayimgcls's requirements, and what the target already has


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """`[project] dependencies` of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    text = pyproject.read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise SystemExit(f"error: {pyproject}: no [project] dependencies list")
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)


@dataclass
class Have:
    """What the target has: every name, and the exact version where the list says it."""

    names: set[str] = field(default_factory=set)
    pins: dict[str, str] = field(default_factory=dict)  # canonical name -> version, local label removed


def parse_have(text: str, source: str = "--have") -> Have:
    """A `pip freeze` (`name==1.0`, `name @ file://...`), a `pip list` (`name 1.0`, header lines skipped) or
    bare names, one a line; `#` comments and `-e`/`-r` option lines are ignored. A local version label
    (`torch==2.11.0+cu130`) is dropped from the pin: PyPI has no such version, and the target's build is
    what stays anyway."""
    have = Have()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-") or set(line) <= set("- "):
            continue
        if line.lower().split()[:2] == ["package", "version"]:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(?:==|\s)\s*([0-9][^\s;]*))?\s*(?:@.*)?$", line)
        if m is None:
            raise SystemExit(f"error: {source}:{n}: not a package line: {raw!r}")
        name = canonical(m.group(1))
        have.names.add(name)
        if m.group(2):
            have.pins[name] = m.group(2).split("+", 1)[0]
    return have


# ---------------------------------------------------------------------------------------------------------
# pip commands


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    """The flags that make pip choose wheels for the target instead of this machine."""
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in platforms:
        flags += ["--platform", p]
    return flags


def pip_command(verb: str, options: list[str], python_version: str, platforms: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", verb, "--quiet", *options, *target_flags(python_version, platforms), *args]


def resolve_command(
    requirements: list[str], python_version: str, platforms: list[str], report: Path, target: Path
) -> list[str]:
    """pip's resolver for the target, metadata only (`--dry-run`; PyPI serves wheel metadata on its own)."""
    options = ["--dry-run", "--ignore-installed", "--report", str(report), "--target", str(target)]
    return pip_command("install", options, python_version, platforms, requirements)


def download_command(pins: list[str], python_version: str, platforms: list[str], dest: Path) -> list[str]:
    """Exactly the resolved wheels, none of their dependencies (those were chosen already)."""
    return pip_command("download", ["--no-deps", "-d", str(dest)], python_version, platforms, pins)


def stage_command(wheels: list[Path], python_version: str, platforms: list[str], target: Path) -> list[str]:
    """Install the downloaded wheels into one tree, as the target's pip would (no index, nothing compiled)."""
    options = ["--no-index", "--no-deps", "--no-compile", "--target", str(target)]
    return pip_command("install", options, python_version, platforms, [str(w) for w in wheels])


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[2:]) if cmd[:2] == [sys.executable, "-m"] else " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------------------------------------------------
# Resolution -> what to bring


@dataclass(frozen=True)
class Resolved:
    name: str  # canonical
    version: str
    requires: tuple[str, ...]  # requirement strings of the wheel's metadata
    extras: tuple[str, ...] = ()  # extras the top-level request asked for


def read_report(report: dict) -> dict[str, Resolved]:
    """pip's installation report -> canonical name -> Resolved."""
    out = {}
    for item in report.get("install", []):
        meta = item["metadata"]
        name = canonical(meta["name"])
        out[name] = Resolved(
            name, meta["version"], tuple(meta.get("requires_dist") or ()), tuple(item.get("requested_extras") or ())
        )
    return out


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?[^;]*(?:;(.*))?$")


def requirement_name(req: str) -> str:
    m = _REQ.match(req)
    if m is None:
        raise SystemExit(f"error: not a requirement: {req!r}")
    return canonical(m.group(1))


def _edges(pkg: Resolved, extras: set[str]) -> list[tuple[str, set[str]]]:
    """Dependencies of `pkg` with the extras they ask for, under the extras active on `pkg`. Other markers are
    left to the resolver, which only put packages into the report that the target needs."""
    out = []
    for req in pkg.requires:
        m = _REQ.match(req)
        if m is None:
            continue
        marker = m.group(3) or ""
        wanted = set(re.findall(r"""extra\s*==\s*['"]([^'"]+)['"]""", marker))
        if wanted and not wanted & extras:
            continue
        out.append((canonical(m.group(1)), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}))
    return out


def needed(resolved: dict[str, Resolved], roots: list[str], have: Have) -> list[Resolved]:
    """Resolved packages the target lacks and that rayimgcls reaches through packages the target lacks."""
    active: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str]]] = []
    for req in roots:
        m = _REQ.match(req)
        if m:
            todo.append((canonical(m.group(1)), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}))
    while todo:
        name, extras = todo.pop()
        if name not in resolved or name in have.names:
            continue  # not for this platform, or the target brings it (and what it needs)
        seen = active.get(name)
        if seen is not None and extras <= seen:
            continue
        active[name] = (seen or set()) | extras
        todo += _edges(resolved[name], active[name])
    return sorted((resolved[n] for n in active), key=lambda r: r.name)


# ---------------------------------------------------------------------------------------------------------
# Trimming and packing


def trimmed(path: str, patterns: tuple[str, ...] = TRIM) -> bool:
    """Whether a path relative to site-packages lies under one of the trimmed globs."""
    parts = path.split("/")
    for pattern in patterns:
        depth = pattern.count("/") + 1
        if len(parts) >= depth and fnmatch.fnmatchcase("/".join(parts[:depth]), pattern):
            return True
    return False


def trim_tree(site: Path, patterns: tuple[str, ...] = TRIM) -> int:
    """Delete the trimmed paths under an installed tree; returns the bytes removed."""
    removed = 0
    for pattern in patterns:
        for path in sorted(site.glob(pattern)):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            removed += sum(p.stat().st_size for p in files)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def portable_scripts(bin_dir: Path) -> None:
    """Console scripts pip wrote name this machine's Python in their first line; the target has its own."""
    if not bin_dir.is_dir():
        return
    for script in bin_dir.iterdir():
        data = script.read_bytes()
        if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
            script.write_bytes(b"#!/usr/bin/env python3\n" + data.split(b"\n", 1)[1])


def pack_tree(site: Path, archive: Path) -> None:
    """tar.xz of the tree, paths relative to it (xz preset 9: half the size of the wheels' zip deflate)."""
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for path in sorted(site.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(site).as_posix(), recursive=False)


def trim_wheel(wheel: Path, out: Path, patterns: tuple[str, ...] = TRIM) -> int:
    """A copy of the wheel without the trimmed files, its RECORD rewritten to match (pip checks that every
    file it installs is listed). Returns the bytes removed (uncompressed)."""
    removed = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for info in src.infolist():
            if info.filename == record_name:
                continue
            if trimmed(info.filename, patterns):
                removed += info.file_size
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            kept.append([info.filename, f"sha256={digest}", str(len(data))])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*kept, [record_name, "", ""]])
        dst.writestr(record_name, buf.getvalue())
    return removed


def install_command(fmt: str, bundle: Path) -> str:
    """What to run on the target, from the folder the bundle was copied to."""
    if fmt == "tar.xz":
        return f"mkdir -p /tmp/site && tar -xJf {bundle.name} -C /tmp/site && export PYTHONPATH=/tmp/site"
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {bundle.name}/*.whl "
        "&& export PYTHONPATH=/tmp/site"
    )


def repo_bytes(repo: Path = REPO) -> int | None:
    """The repository's committed files as `git archive` packs them (tar, uncompressed); None outside git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "archive", "HEAD"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return len(out.stdout)


def size_report(bundle_bytes: int, repo: int | None, max_mib: float | None) -> tuple[str, bool]:
    """The lines that say what travels, and whether it fits under --max-mib (always when none is given)."""
    lines = [f"bundle: {bundle_bytes / MIB:.1f} MiB"]
    total = bundle_bytes
    if repo is not None:
        total += repo
        lines.append(f"repository (git archive): {repo / MIB:.1f} MiB; together {total / MIB:.1f} MiB")
    fits = max_mib is None or total <= max_mib * MIB
    if max_mib is not None:
        lines.append(f"limit {max_mib:g} MiB: {'fits' if fits else 'DOES NOT FIT'}")
    return "\n".join(lines), fits


def pack(
    wheels: list[Path], out: Path, fmt: str, python_version: str, platforms: list[str], patterns: tuple[str, ...] = TRIM
) -> Path:
    """Trim and pack downloaded wheels into OUT (see the module docstring); returns the bundle's path."""
    if fmt == "tar.xz":
        with tempfile.TemporaryDirectory() as tmp:
            site = Path(tmp) / "site"
            run(stage_command(wheels, python_version, platforms, site))
            removed = trim_tree(site, patterns)
            portable_scripts(site / "bin")
            bundle = out / ARCHIVE
            pack_tree(site, bundle)
    else:
        bundle = out / "wheels"
        bundle.mkdir(parents=True, exist_ok=True)
        removed = sum(trim_wheel(w, bundle / w.name, patterns) for w in wheels)
    print(f"trimmed {removed / MIB:.1f} MiB ({', '.join(patterns)})")
    return bundle


def bundle_size(bundle: Path) -> int:
    return bundle.stat().st_size if bundle.is_file() else sum(p.stat().st_size for p in bundle.rglob("*.whl"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobs/offline_bundle.sh",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("python_version", help="the target's Python, e.g. 3.12")
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--have", type=Path, help="what the target has: `pip freeze`, `pip list` or names, one a line")
    p.add_argument("--format", choices=("tar.xz", "wheels"), default="tar.xz")
    p.add_argument("--platform", action="append", help=f"target platform tag (repeatable); default {DEFAULT_PLATFORMS}")
    p.add_argument("--requirement", action="append", help="bring this too (repeatable), e.g. 'aiohttp>=3.9'")
    p.add_argument("--max-mib", type=float, help="fail when bundle + repository exceed this many MiB")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise SystemExit(f"error: PYTHON_VERSION {args.python_version!r}: expected e.g. 3.12")
    platforms = args.platform or list(DEFAULT_PLATFORMS)
    have = parse_have(args.have.read_text(), str(args.have)) if args.have else Have()
    # What the target has is no root: resolving it would pull its whole tree (torch's CUDA wheels) for nothing.
    roots = [r for r in project_requirements() + (args.requirement or []) if requirement_name(r) not in have.names]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run(resolve_command(roots, args.python_version, platforms, report, Path(tmp) / "t"))
        resolved = read_report(json.loads(report.read_text()))
        for name, version in sorted(have.pins.items()):
            if name in resolved and resolved[name].version != version:
                print(f"note: the target has {name}=={version}; the resolver chose {resolved[name].version}")
        bring = needed(resolved, roots, have)
        print(f"the target lacks {len(bring)} package(s): {', '.join(f'{r.name}=={r.version}' for r in bring)}")
        if not bring:
            return 0
        dest = Path(tmp) / "wheels"
        run(download_command([f"{r.name}=={r.version}" for r in bring], args.python_version, platforms, dest))
        wheels = sorted(dest.glob("*.whl"))
        for w in sorted(wheels, key=lambda w: -w.stat().st_size):
            print(f"  {w.stat().st_size / MIB:7.2f} MiB  {w.name}")
        print(f"  {sum(w.stat().st_size for w in wheels) / MIB:7.2f} MiB  in all, as downloaded")
        bundle = pack(wheels, args.out, args.format, args.python_version, platforms)
    text, fits = size_report(bundle_size(bundle), repo_bytes(), args.max_mib)
    command = install_command(args.format, bundle)
    (args.out / "INSTALL.txt").write_text(f"# on the target, in the folder holding {bundle.name}:\n{command}\n")
    print(f"{text}\ninstall on the target (from the folder holding {bundle.name}):\n  {command}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
