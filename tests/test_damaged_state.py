"""Every file in the state folder is validated when read. A damaged one (wrong shape, wrong
types, out-of-range numbers, a folder where a file belongs) is set aside as
`<name>.bad-<timestamp>` with a warning naming it, and rebuilt: the pass goes on, exits 0 and
converges; the next pass has nothing to warn about. A state folder that is not a usable
folder is a clear error (exit 1), never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import REPO, reconcile, write_manifest


def status_doc(**certs) -> str:
    return json.dumps({"version": 1, "certificates": certs, "manifest": {}})


def damage_observed(text: str):
    """A function that rewrites the svc row of the observation cache with `text`'s changes."""

    def damage(state: Path) -> None:
        path = state / "cache" / "observed.json"
        doc = json.loads(path.read_text())
        [key] = doc["entries"]
        row = doc["entries"][key]
        exec(text, {"doc": doc, "key": key, "row": row})
        path.write_text(json.dumps(doc))

    return damage


def write(rel: str, data: str):
    def damage(state: Path) -> None:
        (state / rel).write_text(data)

    return damage


def make_folder(rel: str):
    def damage(state: Path) -> None:
        (state / rel).unlink()
        (state / rel).mkdir()
        (state / rel / "inside").write_text("x")

    return damage


def validation_cache(data: bytes):
    def damage(state: Path) -> None:
        [path] = (state / "cache").glob("valid-entries-*.txt")
        path.write_bytes(data)

    return damage


# (id, damage, the file that must be named and set aside, does the hook run once more:
# a status store lost whole, or a damaged record, cannot vouch that no hook was owed)
DAMAGES = [
    ("status-not-json", write("status.json", "{not json"), "status.json", True),
    ("status-object-of-numbers", write("status.json", '{"0":1}'), "status.json", True),
    ("status-certificates-list", write("status.json", '{"version":1,"certificates":[]}'), "status.json", True),
    ("status-hook-failures-many", write("status.json", status_doc(svc={"hook_failures": "many"})), "status.json", True),
    (
        "status-manifest-x",
        write("status.json", json.dumps({"version": 1, "certificates": {}, "manifest": "x"})),
        "status.json",
        True,
    ),
    ("status-hook-record-garbage", write("status.json", status_doc(svc={"hook": {"command": 1}})), "status.json", True),
    (
        "status-failures-negative",
        write("status.json", status_doc(svc={"failures": -3, "last_error": 5})),
        "status.json",
        True,
    ),
    ("status-a-folder", make_folder("status.json"), "status.json", True),
    ("observed-object-of-numbers", write("cache/observed.json", '{"0":1}'), "cache/observed.json", False),
    ("observed-row-object", damage_observed("doc['entries'][key] = {'0': 1}"), "cache/observed.json", False),
    ("observed-not-after-1e300", damage_observed("row[3][3] = 1e300"), "cache/observed.json", False),  # not_after
    ("observed-sans-number", damage_observed("row[3][1] = 7"), "cache/observed.json", False),  # the SANs
    ("observed-entries-text", damage_observed("doc['entries'] = 'x'"), "cache/observed.json", False),
    ("observed-short-row", damage_observed("doc['entries'][key] = row[:2]"), "cache/observed.json", False),
    ("observed-a-folder", make_folder("cache/observed.json"), "cache/observed.json", False),
    ("validation-cache-binary", validation_cache(b"\xff\xfe\x00garbage\n"), "cache/valid-entries-", False),
    ("validation-cache-not-digests", validation_cache(b"not a digest\n{}\n"), "cache/valid-entries-", False),
]


@pytest.fixture
def site(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    hook_log = tmp_path / "hook.log"
    m = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {"type": "local"},
            "certificates": [
                {
                    "name": "svc",
                    "common_name": "svc.state.test",
                    "cert_path": str(out / "svc.crt"),
                    "key_path": str(out / "svc.key"),
                    "post_renewal_command": f"echo ran >> {hook_log}",
                },
            ],
        },
    )
    reconcile("-m", str(m), state_dir=state, check=0)
    # a second, steady pass writes the observation cache as it stands
    assert "No changes" in reconcile("-m", str(m), state_dir=state, check=0).stdout
    return m, state, hook_log


@pytest.mark.parametrize("damage,name,hook_again", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_a_damaged_state_file_is_set_aside_with_a_warning_and_rebuilt(site, damage, name, hook_again):
    m, state, hook_log = site
    damage(state)
    runs = len(hook_log.read_text().splitlines())
    # read-only commands read around it and leave it where it is
    for args in (("--plan",), ("status",)):
        proc = reconcile(*(("status", "-m", str(m)) if args == ("status",) else ("-m", str(m), *args)), state_dir=state)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in (0, 1), proc.stderr
    proc = reconcile("-m", str(m), state_dir=state)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "damaged" in proc.stderr and str(state / name) in proc.stderr, proc.stderr
    aside = [p for p in (state / name).parent.iterdir() if p.name.startswith(Path(name).name) and ".bad-" in p.name]
    assert len(aside) == 1, sorted(os.listdir((state / name).parent))
    assert "set aside as" in proc.stderr and str(aside[0]) in proc.stderr
    # a damaged record cannot vouch that its hook ran: it runs once more, never zero times
    assert len(hook_log.read_text().splitlines()) == runs + (1 if hook_again else 0)
    if hook_again:
        assert "run once more" in proc.stderr or "runs once more" in proc.stderr, proc.stderr
    proc = reconcile("-m", str(m), state_dir=state, check=0)
    assert "No changes" in proc.stdout and "damaged" not in proc.stderr, proc.stderr


def test_a_state_folder_that_is_a_file_is_a_clear_error(tmp_path, site):
    m, _state, _ = site
    state = tmp_path / "state-file"
    state.write_text("not a folder")
    for args in (("-m", str(m)), ("-m", str(m), "--plan"), ("status", "-m", str(m))):
        proc = reconcile(*args, state_dir=state)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"the state folder {state} is not a folder" in proc.stderr, proc.stderr
    assert state.read_text() == "not a folder"


def test_an_unreadable_state_folder_is_a_clear_error_for_a_user_who_is_not_root(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="reconciler-state-test-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        nobody = 65534
        out, state = base / "out", base / "state"
        out.mkdir()
        os.chown(out, nobody, nobody)
        m = write_manifest(
            base / "m.json",
            {
                "issuer": {"type": "local"},
                "certificates": [
                    {
                        "name": "svc",
                        "common_name": "svc.state.test",
                        "cert_path": str(out / "svc.crt"),
                        "key_path": str(out / "svc.key"),
                    },
                ],
            },
        )
        os.chmod(m, 0o644)
        state.mkdir(mode=0o700)
        os.chown(state, nobody, nobody)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        # the checkout, the virtualenv and the interpreter may all sit below folders only root
        # can enter (root's 0700 home, a 0700 temporary clone): `nobody` runs the system
        # interpreter of the same minor version on copies of the package and of the
        # virtualenv's packages, inside the test's own world-readable folder
        site_packages = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        lib = base / "lib"
        shutil.copytree(
            site_packages, lib, ignore=shutil.ignore_patterns("hypothesis*", "_pytest", "pip", "setuptools", "*.pyc")
        )
        shutil.copytree(
            REPO / "reconciler", lib / "reconciler", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
        for folder, _dirs, _files in os.walk(lib):
            os.chmod(folder, 0o755)
        env.update(NO_COLOR="1", PYTHONPATH=str(lib), HOME=str(base))
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"

        def run(*args):
            return subprocess.run(
                [python, "-m", "reconciler", *args, "--state-dir", str(state)],
                capture_output=True,
                text=True,
                env=env,
                user=nobody,
                group=nobody,
                cwd=base,
                timeout=120,
            )

        assert run("-m", str(m)).returncode == 0
        os.chmod(state, 0)
        for args in (("-m", str(m)), ("-m", str(m), "--plan"), ("status", "-m", str(m))):
            proc = run(*args)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"cannot use the state folder {state}: Permission denied" in proc.stderr, proc.stderr
        os.chmod(state, 0o700)
        assert run("-m", str(m)).returncode == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_cache_folder_that_is_a_file_is_set_aside_and_rebuilt(site):
    m, state, _ = site
    shutil.rmtree(state / "cache")
    (state / "cache").write_text("x")
    proc = reconcile("-m", str(m), state_dir=state, check=0)
    assert f"{state / 'cache'} is damaged: it is a file, not a folder; set aside as" in proc.stderr, proc.stderr
    assert (state / "cache").is_dir() and "Traceback" not in proc.stderr
    proc = reconcile("-m", str(m), state_dir=state, check=0)
    assert "No changes" in proc.stdout and "damaged" not in proc.stderr, proc.stderr
