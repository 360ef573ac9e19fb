"""Day one of an operator who adopts the reconciler: migrating what the old script left on
disk, then the commands they type. Real CLI subprocesses, real files, a real step-ca.

The old `certificate-renewal-manager.sh` ran `step ca certificate --force CN CRT KEY`, which
writes the leaf followed by the CA's intermediate into CRT (step's default bundle) and the
key beside it; its manifest is a bare array and the CA comes from `$STEPPATH/config/defaults.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import load_cert, reconcile, write_manifest

NO_CHOICE = {"RECONCILER_ISSUER": None}  # the issuer comes from defaults.json, as on the old host


def old_host(tmp_path: Path, ca) -> tuple[Path, dict]:
    """A STEPPATH as `step ca bootstrap` plus the old script's flags left it: every setting
    of the CA in defaults.json, nothing in the environment."""
    steppath = tmp_path / "step"
    (steppath / "config").mkdir(parents=True)
    password = tmp_path / "provisioner.pass"
    password.write_text(ca.password + "\n")
    password.chmod(0o600)
    (steppath / "config" / "defaults.json").write_text(
        json.dumps(
            {
                "ca-url": ca.url,
                "fingerprint": ca.fingerprint,
                "root": str(ca.root_path),
                "provisioner": ca.provisioner,
                "password-file": str(password),
            }
        )
    )
    return steppath, {**NO_CHOICE, "STEPPATH": str(steppath)}


def serials(folder: Path) -> dict[str, int]:
    return {p.name: load_cert(p).serial_number for p in sorted(folder.glob("*.crt")) if p.name != "ca.crt"}


def pems_in(path: Path) -> int:
    return len(x509.load_pem_x509_certificates(path.read_bytes()))


def test_certificates_the_old_script_made_are_adopted_without_a_new_certificate_by_a_fresh_state_folder(
    tmp_path, step_ca
):
    """Leaf + intermediate files from `step ca certificate`, the unchanged bare array, a brand-new
    --state-dir: the first pass only trims the chains include_ca: false leaves out and writes the
    missing ca_path; no certificate is reissued (the intermediate in the files verifies against
    the root, so it is the issuer's), and the next two passes plan nothing."""
    steppath, env = old_host(tmp_path, step_ca)
    tls = tmp_path / "tls"
    entries = [
        {
            "common_name": "web.internal.example",
            "sans": ["10.0.0.5"],
            "cert_path": "tls/web.crt",
            "key_path": "tls/web.key",
        },
        {
            "common_name": "api.internal.example",
            "cert_path": "tls/api.crt",
            "key_path": "tls/api.key",
            "include_ca": True,
        },
        {
            "common_name": "db.internal.example",
            "cert_path": "tls/db.crt",
            "key_path": "tls/db.key",
            "include_ca": False,
            "ca_path": "tls/ca.crt",
        },
    ]
    # what the old script left: every file a bundle (made here through another state folder,
    # which is then thrown away, as a new host's state folder starts empty)
    old = write_manifest(
        tmp_path / "old.json", [{**{k: v for k, v in e.items() if k != "ca_path"}, "include_ca": True} for e in entries]
    )
    reconcile("-m", str(old), state_dir=tmp_path / "old-state", env=env, check=0)
    shutil.rmtree(tmp_path / "old-state")
    assert all(pems_in(p) == 2 for p in tls.glob("*.crt")), "the old files hold leaf + intermediate"
    # one file someone trimmed to the leaf by hand: the intermediate is learned from the others
    leaf_only = tls / "db.crt"
    leaf_only.write_bytes(load_cert(leaf_only).public_bytes(serialization.Encoding.PEM))
    before = serials(tls)

    manifest = write_manifest(tmp_path / "certificate-manifest.json", entries)
    state = tmp_path / "new-state"
    plan = reconcile("-m", str(manifest), "--plan", "--output", "json", state_dir=state, env=env, check=0)
    actions = {c["name"]: [a["action"] for a in c["actions"]] for c in json.loads(plan.stdout)["certificates"]}
    assert actions == {
        "web.internal.example": ["rewrite_chain"],
        "api.internal.example": [],
        "db.internal.example": ["write_ca"],
    }, plan.stdout

    outputs = []
    for _ in range(3):
        proc = reconcile("-m", str(manifest), state_dir=state, env=env, check=0)
        assert "damaged" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        outputs.append(proc.stdout)
        assert serials(tls) == before, f"a certificate was reissued:\n{proc.stdout}"
    assert "reissue" not in outputs[0] and "issued" not in outputs[0].replace("reissued", ""), outputs[0]
    assert "No changes: 3 certificates match the manifest." in outputs[1], outputs[1]
    assert "No changes: 3 certificates match the manifest." in outputs[2], outputs[2]
    assert (pems_in(tls / "web.crt"), pems_in(tls / "api.crt"), pems_in(tls / "db.crt")) == (1, 2, 1)
    assert load_cert(tls / "ca.crt") == x509.load_pem_x509_certificate(step_ca.root_pem())
    assert not list(state.glob("cache/*.bad-*")), "a cache the pass itself wrote was called damaged"


def test_a_pass_that_only_fixes_chains_and_ca_files_says_so(tmp_path):
    """The summary counts rewritten chains and written CA files, not "hooks retried"."""
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {
                "common_name": "a.example",
                "cert_path": str(out / "a.crt"),
                "key_path": str(out / "a.key"),
                "include_ca": True,
                "ca_path": str(out / "ca.crt"),
            },
            {
                "common_name": "b.example",
                "cert_path": str(out / "b.crt"),
                "key_path": str(out / "b.key"),
                "include_ca": True,
            },
        ],
    )
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)
    manifest.write_text(manifest.read_text().replace("true", "false"))
    (out / "ca.crt").unlink()
    proc = reconcile("-m", str(manifest), state_dir=state, check=0)
    assert "Applied: 2 of 2 chains rewritten; 1 of 1 CA file written (0 of 2 unchanged)." in proc.stdout, proc.stdout
    assert "retried" not in proc.stdout, proc.stdout


def test_the_observation_cache_a_pass_writes_for_a_ca_path_is_read_back_as_sound(tmp_path):
    """A manifest with a ca_path: the second pass must not call the first pass's cache damaged."""
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {
                "common_name": "a.example",
                "cert_path": str(out / "a.crt"),
                "key_path": str(out / "a.key"),
                "ca_path": str(out / "ca.crt"),
            },
        ],
    )
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)
    for args in (("--plan",), ("status",), ()):
        proc = reconcile(*args, "-m", str(manifest), state_dir=state, check=0)
        assert "damaged" not in proc.stderr, proc.stderr
    assert not list(state.glob("cache/*.bad-*"))


def test_an_intermediate_bundled_by_another_ca_is_not_learned_and_its_certificate_is_reissued(
    tmp_path, step_ca, other_step_ca
):
    """Learning intermediates from files checks each against the configured root: a bundle
    another CA made stays foreign, for its own file and for every pass after it."""
    _steppath, other_env = old_host(tmp_path / "other", other_step_ca)
    _steppath, env = old_host(tmp_path / "ours", step_ca)
    entry = {
        "common_name": "web.internal.example",
        "cert_path": "tls/web.crt",
        "key_path": "tls/web.key",
        "include_ca": True,
    }
    manifest = write_manifest(tmp_path / "certificate-manifest.json", [entry])
    reconcile("-m", str(manifest), state_dir=tmp_path / "other-state", env=other_env, check=0)
    # that host's state folder is gone, as on a new host: its marks on the files are stale
    shutil.rmtree(tmp_path / "other-state")
    assert pems_in(tmp_path / "tls" / "web.crt") == 2
    state = tmp_path / "state"
    plan = reconcile("-m", str(manifest), "--plan", "--output", "json", state_dir=state, env=env, check=0)
    (cert,) = json.loads(plan.stdout)["certificates"]
    assert [a["action"] for a in cert["actions"]] == ["reissue"], plan.stdout
    reconcile("-m", str(manifest), state_dir=state, env=env, check=0)
    ours = x509.load_pem_x509_certificate(step_ca.intermediate_pem())
    load_cert(tmp_path / "tls" / "web.crt").verify_directly_issued_by(ours)
    cached = [
        x509.load_pem_x509_certificate(p.read_bytes()) for p in (state / "step-ca" / "intermediates").glob("*.crt")
    ]
    assert cached == [ours], "only the configured CA's own intermediate is cached"


def test_entries_sharing_a_ca_path_with_different_owners_are_invalid_naming_both(tmp_path):
    """Two owners for one ca_path file chowned it back and forth on every pass: that is a
    manifest error naming both entries, and nothing is written."""
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "issuer": {"type": "local"},
            "certificates": [
                {
                    "common_name": "a.example",
                    "cert_path": "out/a.crt",
                    "key_path": "out/a.key",
                    "ca_path": "out/ca.crt",
                    "owner": "root:root",
                },
                {
                    "common_name": "b.example",
                    "cert_path": "out/b.crt",
                    "key_path": "out/b.key",
                    "ca_path": "out/ca.crt",
                },
                {
                    "name": "c",
                    "common_name": "c.example",
                    "cert_path": "out/c.crt",
                    "key_path": "out/c.key",
                    "ca_path": "out/ca.crt",
                    "owner": "nobody:nogroup",
                },
            ],
        },
    )
    for args in (("validate",), ()):
        proc = reconcile(*args, "-m", str(manifest), state_dir=tmp_path / "state", check=1)
        assert "certificates[2].owner" in proc.stderr and "certificates[0] (a.example)" in proc.stderr, proc.stderr
        assert str(out / "ca.crt") in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "certificates[1]" not in proc.stderr, "an entry without an owner leaves the owner alone: no conflict"
    assert not out.exists()
    # the same owner spelled another way is one owner
    manifest.write_text(manifest.read_text().replace('"nobody:nogroup"', '"0:0"'))
    reconcile("validate", "-m", str(manifest), state_dir=tmp_path / "state", check=0)


def test_renew_takes_names_before_and_after_options(tmp_path):
    """`reconcile renew a -m m.json --plan b`: names and options mix, as in any CLI."""
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {
                "name": n,
                "common_name": f"{n}.example",
                "cert_path": str(out / f"{n}.crt"),
                "key_path": str(out / f"{n}.key"),
            }
            for n in ("a", "b", "c")
        ],
    )
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)
    proc = reconcile("renew", "a", "-m", str(manifest), "--plan", "--output", "json", "b", state_dir=state, check=0)
    planned = {c["name"]: [a["action"] for a in c["actions"]] for c in json.loads(proc.stdout)["certificates"]}
    assert planned == {"a": ["renew"], "b": ["renew"], "c": []}, proc.stdout
    proc = reconcile("renew", "a", "--all", "-m", str(manifest), state_dir=state, check=2)
    assert "Traceback" not in proc.stderr and "--all" in proc.stderr, proc.stderr


def test_status_is_not_ready_while_a_chain_or_ca_file_waits_for_repair(tmp_path):
    """A chain include_ca no longer asks for, or a deleted ca_path file: status says
    "repair due" with the reason and exits 1, as for a wrong owner or mode."""
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "m.json",
        [
            {
                "common_name": "a.example",
                "cert_path": str(out / "a.crt"),
                "key_path": str(out / "a.key"),
                "include_ca": True,
            },
            {
                "common_name": "b.example",
                "cert_path": str(out / "b.crt"),
                "key_path": str(out / "b.key"),
                "ca_path": str(out / "ca.crt"),
            },
        ],
    )
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)
    reconcile("status", "-m", str(manifest), state_dir=state, check=0)
    manifest.write_text(manifest.read_text().replace("true", "false"))
    (out / "ca.crt").unlink()
    proc = reconcile("status", "-m", str(manifest), "--output", "json", state_dir=state, check=1)
    rows = {r["name"]: r for r in json.loads(proc.stdout)["certificates"]}
    assert {n: r["state"] for n, r in rows.items()} == {"a.example": "repair due", "b.example": "repair due"}, (
        proc.stdout
    )
    assert "include_ca: false" in rows["a.example"]["problem"] and "missing" in rows["b.example"]["problem"], (
        proc.stdout
    )
    reconcile("-m", str(manifest), state_dir=state, check=0)
    reconcile("status", "-m", str(manifest), state_dir=state, check=0)
