"""The reconciler installs like a Python tool: a built wheel, in a fresh venv outside the
repository, works from any folder (the schema ships inside the package).

The wheel is built from a copy of the checkout, so the build leaves nothing (build/,
*.egg-info) in the tree; it is installed with its dependencies by the venv's own pip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, figure, load_cert

MANIFEST = REPO / "etc" / "certificate-manifest.json"
SCHEMA = REPO / "reconciler" / "schema" / "certificate-manifest.schema.json"


def run(*cmd, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))}: exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def clean_env(home: Path) -> dict:
    """No RECONCILER_* settings, no PYTHONPATH pointing back into the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RECONCILER_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(NO_COLOR="1", HOME=str(home))
    env.pop("XDG_STATE_HOME", None)
    return env


def checkout_files() -> list[str]:
    """What a clean clone holds: tracked and new files, nothing ignored (.venv, build/, egg-info)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return sorted({f for f in out.decode().split("\0") if f and (REPO / f).is_file()})


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    ignored_before = _ignored_in_tree()
    src = tmp / "src"
    for rel in checkout_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = tmp / "dist"
    started = time.monotonic()
    run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", dist, src, cwd=tmp
    )
    built = time.monotonic() - started
    (wheel,) = dist.glob("certificate_reconciler-*.whl")
    venv = tmp / "venv"
    started = time.monotonic()
    run(sys.executable, "-m", "venv", venv, cwd=tmp)
    run(venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel, cwd=tmp)
    took = time.monotonic() - started
    figure(f"{wheel.name}: {wheel.stat().st_size} bytes, built in {built:.1f}s, venv + install {took:.1f}s")
    assert _ignored_in_tree() == ignored_before, "building the wheel left files in the checkout"
    home = tmp / "home"
    home.mkdir()
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "bin": venv / "bin" / "reconcile", "env": clean_env(home), "cwd": elsewhere, "tmp": tmp}


def _ignored_in_tree() -> set[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {line for line in out.splitlines() if "build/" in line or ".egg-info" in line}


def test_the_wheel_ships_every_subpackage_and_the_schema(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    packages = {str(p.relative_to(REPO)) for p in (REPO / "reconciler").rglob("__init__.py")}
    assert packages <= names, f"missing from the wheel: {sorted(packages - names)}"
    assert "reconciler/schema/certificate-manifest.schema.json" in names
    assert not any(n.startswith(("tests/", "schema/", "bench/")) for n in names), sorted(names)


def test_the_installed_tool_validates_the_example_manifest_from_another_folder(installed):
    proc = run(installed["bin"], "validate", "-m", MANIFEST, cwd=installed["cwd"], env=installed["env"])
    first, ok = proc.stdout.splitlines()
    assert first.startswith("issuer: embedded CA in ") and ok == "ok: 2 certificates", proc.stdout


def test_the_installed_tool_converges_the_example_manifest(installed):
    # a copy, so the example's relative paths (../demo/...) land in the temporary folder
    site = installed["tmp"] / "site"
    (site / "etc").mkdir(parents=True)
    manifest = site / "etc" / "certificate-manifest.json"
    shutil.copy2(MANIFEST, manifest)
    state = installed["tmp"] / "state"
    run(installed["bin"], "-m", manifest, "--state-dir", state, cwd=installed["cwd"], env=installed["env"])

    doc = json.loads(manifest.read_text())
    for entry in doc["certificates"]:
        cert = (manifest.parent / entry["cert_path"]).resolve()
        assert load_cert(cert).subject.rfc4514_string() == f"CN={entry['common_name']}"
        assert (manifest.parent / entry["key_path"]).resolve().is_file()
    assert (state / "ca").is_dir(), "the example uses the embedded CA"
    plan = run(
        installed["bin"],
        "-m",
        manifest,
        "--state-dir",
        state,
        "--plan",
        "--detailed-exitcode",
        cwd=installed["cwd"],
        env=installed["env"],
    )
    assert "No changes" in plan.stdout, plan.stdout


def test_the_installed_schema_command_prints_the_packaged_schema(installed):
    proc = run(installed["bin"], "schema", cwd=installed["cwd"], env=installed["env"])
    assert proc.stdout.encode() == SCHEMA.read_bytes()
