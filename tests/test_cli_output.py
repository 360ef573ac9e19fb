"""What `reconcile` prints and the codes it exits with, as an operator (or a health check,
or a pipe into `head`) sees them: real subprocesses, real files, the embedded CA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import after_issuer, REPO, entry, reconcile, write_manifest
from reconciler.render import json_pieces

LOCAL = {"type": "local"}


@pytest.fixture
def site(tmp_path):
    return tmp_path, tmp_path / "state", tmp_path / "out"


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- honest summaries


def test_a_pass_whose_issuance_fails_says_none_were_issued_and_lists_no_hook_as_run(site):
    tmp, state, out = site
    (tmp / "not-a-folder").write_text("the embedded CA cannot live here")
    marker = tmp / "hook-ran"
    m = write_manifest(
        tmp / "m.json",
        {
            "issuer": {"type": "local", "dir": str(tmp / "not-a-folder")},
            "certificates": [
                entry(out, "a", post_renewal_command=f"touch {marker}"),
                entry(out, "b", post_renewal_command=f"touch {marker}"),
                entry(out, "c"),
            ],
        },
    )
    proc = reconcile("-m", str(m), state_dir=state)
    no_traceback(proc)
    assert proc.returncode == 1
    lines = after_issuer(proc.stdout).splitlines()
    assert lines[0] == "Applied: 0 of 3 issued, 3 failed (0 of 3 unchanged)."
    assert all(re.fullmatch(r"\s+x [abc]\s+issue\s+.*\(failed\)", line) for line in lines[1:4]), proc.stdout
    assert "Hooks:" not in proc.stdout and "Hooks run:" not in proc.stdout
    assert lines[4:] == ["Hooks held back:", f"  touch {marker}   (for a, b): their certificates failed"]
    assert not marker.exists()
    assert "error: 3 of 3 certificates failed; everything else was done:" in proc.stderr


def test_a_partly_failed_pass_counts_each_action_and_runs_only_the_hooks_it_may(site):
    tmp, state, out = site
    out.mkdir()
    (out / "blocker").write_text("a file where a folder should be")
    ran = tmp / "ran"
    hook = f"echo $RECONCILER_CERTIFICATES >> {ran}"
    broken = entry(out, "broken", post_renewal_command=hook)
    broken["cert_path"], broken["key_path"] = str(out / "blocker" / "x.crt"), str(out / "blocker" / "x.key")
    m = write_manifest(
        tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "good", post_renewal_command=hook), broken]}
    )
    proc = reconcile("-m", str(m), state_dir=state)
    no_traceback(proc)
    assert proc.returncode == 1
    lines = after_issuer(proc.stdout).splitlines()
    assert lines[0] == "Applied: 1 of 2 issued, 1 failed (0 of 2 unchanged).", proc.stdout
    assert re.fullmatch(r"\s+\+ good\s+issue\s+certificate file missing; key file missing", lines[1])
    assert re.fullmatch(r"\s+x broken\s+issue\s+certificate file unreadable: .*\(failed\)", lines[2]), lines[2]
    assert lines[3:] == [
        "Hooks run:",
        f"  {hook}   (for good): succeeded",
        "Hooks held back:",
        f"  {hook}   (for broken): its certificate failed",
    ]
    assert ran.read_text().split() == ["good"]
    assert "error: 1 of 2 certificates failed; everything else was done:" in proc.stderr

    data = json.loads(reconcile("-m", str(m), "--output", "json", state_dir=state).stdout)
    assert data["result"]["hooks_held_back"] == [
        {"command": hook, "certificates": ["broken"], "reason": "its certificate failed"}
    ]


def test_a_failed_hook_is_listed_as_run_and_failed(site):
    tmp, state, out = site
    m = write_manifest(
        tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a", post_renewal_command="exit 3")]}
    )
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    assert after_issuer(proc.stdout).splitlines() == [
        "Applied: 1 of 1 issued (0 of 1 unchanged).",
        "    + a  issue    certificate file missing; key file missing",
        "Hooks run:",
        "  exit 3   (for a): failed with exit code 3",
    ]
    assert "error: 1 hook failed; everything else was done:" in proc.stderr


def test_a_successful_pass_says_how_many_of_how_many(site):
    tmp, state, out = site
    m = write_manifest(
        tmp / "m.json",
        {"issuer": LOCAL, "certificates": [entry(out, "a", post_renewal_command="true"), entry(out, "b")]},
    )
    proc = reconcile("-m", str(m), state_dir=state, check=0)
    assert after_issuer(proc.stdout).splitlines()[0] == "Applied: 2 of 2 issued (0 of 2 unchanged)."
    assert after_issuer(proc.stdout).splitlines()[-2:] == ["Hooks run:", "  true   (for a): succeeded"]
    os.chmod(out / "b.key", 0o644)
    proc = reconcile("-m", str(m), state_dir=state, check=0)
    assert after_issuer(proc.stdout).splitlines()[0] == "Applied: 1 of 1 chmodded (1 of 2 unchanged)."


def test_json_output_written_in_pieces_is_the_one_line_document():
    """--output json is written a thousand certificates at a time (json_pieces): the same bytes
    as encoding the whole document at once, for lists shorter and longer than a piece."""
    data = {
        "format_version": 1,
        "changes": True,
        "certificates": [{"name": f"c{i}", "actions": [{"action": "issue", "drift": []}]} for i in range(2345)],
        "hooks": [],
        "issuer": {"type": "local", "description": "embedded CA in /x"},
        "notes": ["é ✓"],
    }
    assert "".join(json_pieces(data)) == json.dumps(data, separators=(",", ":")) + "\n"


# --------------------------------------------------------------------------- grammar and wording


def test_one_certificate_matches_in_the_singular(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a")]})
    reconcile("-m", str(m), state_dir=state, check=0)
    assert (
        after_issuer(reconcile("-m", str(m), "--plan", state_dir=state, check=0).stdout)
        == "No changes: 1 certificate matches the manifest.\n"
    )
    assert (
        after_issuer(reconcile("-m", str(m), state_dir=state, check=0).stdout)
        == "No changes: 1 certificate matches the manifest.\n"
    )
    doctor = reconcile("doctor", "-m", str(m), state_dir=state)
    assert "is valid (1 certificate)" in doctor.stdout, doctor.stdout


def test_a_jittered_renewal_says_when_it_became_due(site):
    tmp, state, out = site
    # 1m asked, 2m granted (1m backdate): a 99 % window is always open, jitter or not
    m = write_manifest(
        tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a", duration="1m", renew_before="99%")]}
    )
    reconcile("-m", str(m), state_dir=state, check=0)
    proc = reconcile("-m", str(m), "--plan", state_dir=state, check=0)
    row = after_issuer(proc.stdout).splitlines()[1]
    assert re.fullmatch(
        r"\s+~ a\s+renew\s+renewal due since [\dhms]+ ago \(window 99% \+ jitter\); expires in \d+[ms]\d*s?", row
    ), row
    assert "inside the" not in proc.stdout


# --------------------------------------------------------------------------- status as a health check


def status(m: Path, state: Path) -> tuple[int, dict]:
    proc = reconcile("status", "-m", str(m), "--output", "json", state_dir=state)
    no_traceback(proc)
    return proc.returncode, {c["name"]: c["state"] for c in json.loads(proc.stdout)["certificates"]}


def test_status_exits_0_only_when_every_certificate_is_ready(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a"), entry(out, "b")]})
    assert status(m, state) == (1, {"a": "missing", "b": "missing"})
    reconcile("-m", str(m), state_dir=state, check=0)
    assert status(m, state) == (0, {"a": "ready", "b": "ready"})
    text = reconcile("status", "-m", str(m), state_dir=state)
    assert text.returncode == 0

    os.chmod(out / "b.key", 0o644)
    assert status(m, state) == (1, {"a": "ready", "b": "repair due"})
    text = reconcile("status", "-m", str(m), state_dir=state)
    assert text.returncode == 1 and "b: key mode 0644, want 0600" in text.stdout


def test_status_exits_1_for_a_failed_issuance_and_an_owed_hook(site):
    tmp, state, out = site
    gate = tmp / "gate"
    m = write_manifest(
        tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a", post_renewal_command=f"test -e {gate}")]}
    )
    reconcile("-m", str(m), state_dir=state, check=1)
    assert status(m, state) == (1, {"a": "hook pending"})
    gate.touch()
    reconcile("-m", str(m), state_dir=state, check=0)
    assert status(m, state) == (0, {"a": "ready"})

    (out / "a.key").unlink()
    (tmp / "ca-file").write_text("not a folder")
    write_manifest(m, {"issuer": {"type": "local", "dir": str(tmp / "ca-file")}, "certificates": [entry(out, "a")]})
    reconcile("-m", str(m), state_dir=state, check=1)
    assert status(m, state) == (1, {"a": "error"})


def test_status_of_an_invalid_manifest_lists_the_last_valid_copy_and_says_why(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a")]})
    reconcile("-m", str(m), state_dir=state, check=0)
    (state / "last-valid-manifest.json").write_bytes(m.read_bytes())  # as --watch keeps it
    m.write_text('{"issuer": {"type": "local"}, "certificates": [{"name": 1}]}')
    proc = reconcile("status", "-m", str(m), "--output", "json", state_dir=state)
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and not doc["manifest_valid"]
    assert (
        doc["manifest_problem"].startswith("manifest invalid since ") and "certificates[0]" in doc["manifest_problem"]
    )
    assert [(c["name"], c["state"]) for c in doc["certificates"]] == [("a", "ready")]

    (state / "last-valid-manifest.json").write_text("{ damaged")
    proc = reconcile("status", "-m", str(m), "--output", "json", state_dir=state)
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    assert (proc.returncode, doc["certificates"]) == (1, []) and "certificates[0]" in doc["manifest_problem"]


def test_status_help_documents_the_exit_codes(site):
    proc = reconcile("status", "--help", check=0)
    assert "Exit codes" in proc.stdout and "not ready" in proc.stdout


# --------------------------------------------------------------------------- closed pipes


def run_into_closed_pipe(*args: str, state: Path) -> subprocess.CompletedProcess:
    """Like `reconcile ARGS | head -0`: stdout is a pipe whose reader is already gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(PYTHONPATH=str(REPO), RECONCILER_STATE_DIR=str(state), NO_COLOR="1")
    try:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [("doctor",), ("--plan",), ("status",), ("validate",), ("--plan", "--output", "json")])
def test_output_into_a_closed_pipe_ends_quietly(site, args):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, f"c{i}") for i in range(30)]})
    proc = (
        run_into_closed_pipe(args[0], "-m", str(m), *args[1:], state=state)
        if args[0] in ("doctor", "status", "validate")
        else run_into_closed_pipe("-m", str(m), *args, state=state)
    )
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141


def test_a_pass_into_a_closed_pipe_still_converges(site):
    tmp, state, out = site
    m = write_manifest(tmp / "m.json", {"issuer": LOCAL, "certificates": [entry(out, "a")]})
    proc = run_into_closed_pipe("-m", str(m), state=state)
    assert proc.stderr == "" and proc.returncode == 141
    assert (
        after_issuer(reconcile("-m", str(m), "--plan", state_dir=state, check=0).stdout)
        == "No changes: 1 certificate matches the manifest.\n"
    )
