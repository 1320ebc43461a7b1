"""jobs/offline_bundle.py: parsing what a target has, choosing what to bring, the pip commands, and trimming and
packing real wheels (built here) that real pip installs without an index. Nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("offline_bundle", REPO / "jobs" / "offline_bundle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["offline_bundle"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ob = _load()
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_parse_have_reads_freeze_list_and_names():
    text = "\n".join(
        [
            "# pip freeze of the target",
            "torch==2.11.0+cu130",
            "Typing_Extensions==4.12.2",
            "mypkg @ file:///build/mypkg-1.0-py3-none-any.whl",
            "-e git+https://example.invalid/x.git#egg=x",
            "Package    Version",
            "---------- -------",
            "numpy      2.5.2",
            "aiohttp",
            "",
        ]
    )
    have = ob.parse_have(text)
    assert have.names == {"torch", "typing-extensions", "mypkg", "numpy", "aiohttp"}
    assert have.pins == {"torch": "2.11.0", "typing-extensions": "4.12.2", "numpy": "2.5.2"}


def test_parse_have_names_the_bad_line():
    with pytest.raises(SystemExit, match=r"freeze.txt:2: not a package line"):
        ob.parse_have("numpy==2.0\n!!! garbage\n", "freeze.txt")


def test_project_requirements_are_pyprojects():
    reqs = ob.project_requirements()
    assert "ray[train,data,serve]==2.60.0" in reqs and any(r.startswith("torch") for r in reqs)


def _report(*items):
    return {
        "install": [
            {"metadata": {"name": n, "version": v, "requires_dist": list(r)}, "requested_extras": list(e)}
            for n, v, r, e in items
        ]
    }


def test_needed_skips_what_the_target_has_and_its_dependencies():
    report = _report(
        ("ray", "2.60", ["click", 'fastapi; extra == "serve"', 'gymnasium; extra == "rllib"', "jsonschema"], ["serve"]),
        ("click", "8.1", [], []),
        ("fastapi", "0.1", ["starlette>=1", "pydantic"], []),
        ("starlette", "1.0", [], []),
        ("pydantic", "2.0", ["Pydantic_Core==2.1"], []),
        ("pydantic-core", "2.1", [], []),
        ("jsonschema", "4", ["rpds-py"], []),
        ("rpds-py", "1", [], []),
        ("gymnasium", "1", [], []),  # only under an extra nobody asked for
        ("timm", "1.0", ["huggingface-hub"], []),  # the target has timm: its hub client is its business
        ("huggingface-hub", "2.4", ["httpx2"], []),
        ("httpx2", "2", [], []),
    )
    have = ob.parse_have("click==8.1\ntimm\npydantic\n")
    names = [r.name for r in ob.needed(ob.read_report(report), ["ray[serve]==2.60.0", "timm"], have)]
    assert names == ["fastapi", "jsonschema", "ray", "rpds-py", "starlette"]


def test_pip_commands_target_the_given_python_and_platforms(tmp_path):
    platforms = ["manylinux_2_28_x86_64", "manylinux2014_x86_64"]
    cmd = ob.download_command(["ray==2.60.0", "fastapi==0.1"], "3.12", platforms, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == platforms
    assert cmd[-2:] == ["ray==2.60.0", "fastapi==0.1"] and cmd[cmd.index("-d") + 1] == str(tmp_path)
    resolve = ob.resolve_command(["ray==2.60.0"], "3.12", platforms, tmp_path / "r.json", tmp_path / "t")
    assert "--dry-run" in resolve and "--ignore-installed" in resolve and "--report" in resolve
    assert "--no-deps" not in resolve  # the resolver must see the dependencies


def _wheel(dest: Path, name: str = "tinypkg", version: str = "0.1") -> Path:
    """A real wheel: a package with a `jars/` folder (trimmed), a kept module, and a console script."""
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{name}/kept/data.txt": b"kept\n",
        f"{name}/jars/big.jar": b"\0" * 50_000,
        f"{name}/cli.py": b"def main():\n    print('hello from tinypkg')\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{name}-{version}.dist-info/entry_points.txt": f"[console_scripts]\ntinycli = {name}.cli:main\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def _import_from(site: Path) -> str:
    code = "import tinypkg, os; print(tinypkg.VALUE, os.path.isdir(os.path.join(tinypkg.__path__[0], 'jars')))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


TRIM = ("tinypkg/jars",)


@pytest.mark.timeout(120)
def test_tar_xz_bundle_is_trimmed_and_imports(tmp_path):
    wheel = _wheel(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    bundle = ob.pack([wheel], out, "tar.xz", PY, [], TRIM)
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        script = tar.extractfile("bin/tinycli").read()
    assert "tinypkg/__init__.py" in names and "tinypkg/kept/data.txt" in names
    assert not [n for n in names if "/jars" in n]
    assert script.startswith(b"#!/usr/bin/env python3\n")  # not this machine's interpreter path
    site = tmp_path / "site"
    command = ob.install_command("tar.xz", bundle)
    subprocess.run(command.split(" && export")[0].replace("/tmp/site", str(site)), shell=True, cwd=out, check=True)
    assert _import_from(site) == "42 False"


@pytest.mark.timeout(120)
def test_trimmed_wheels_install_with_pip_no_index(tmp_path):
    wheel = _wheel(tmp_path)
    out = tmp_path / "out"
    bundle = ob.pack([wheel], out, "wheels", PY, [], TRIM)
    trimmed = bundle / wheel.name
    with zipfile.ZipFile(trimmed) as z:
        assert not [n for n in z.namelist() if "/jars/" in n]
        record = z.read("tinypkg-0.1.dist-info/RECORD").decode()
    assert "jars" not in record and "tinypkg/__init__.py,sha256=" in record
    site = tmp_path / "site"
    command = ob.install_command("wheels", bundle).split(" && export")[0].replace("/tmp/site", str(site))
    subprocess.run(command.replace("python3 -m pip", f"{sys.executable} -m pip"), shell=True, cwd=out, check=True)
    assert _import_from(site) == "42 False"


def test_trimmed_matches_folders_and_globs():
    assert ob.trimmed("ray/jars/ray_dist.jar") and ob.trimmed("ray/rllib/algorithms/ppo.py")
    assert ob.trimmed("ray/dashboard/client/build/static/js/main.js")
    assert ob.trimmed("ray/dashboard/client/build/speedscope-1.5.3/index.html")
    assert not ob.trimmed("ray/dashboard/client/build/index.html")  # the dashboard process needs it to start
    assert not ob.trimmed("ray/data/__init__.py") and not ob.trimmed("ray/jarsfile.py")


def test_size_report_says_whether_it_fits():
    text, fits = ob.size_report(40 * ob.MIB, 1 * ob.MIB, 64)
    assert fits and "together 41.0 MiB" in text and "fits" in text
    text, fits = ob.size_report(63 * ob.MIB, 2 * ob.MIB, 64)
    assert not fits and "DOES NOT FIT" in text
    assert ob.size_report(10**12, None, None)[1]  # no limit given: nothing to fail
