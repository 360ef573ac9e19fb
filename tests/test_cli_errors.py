"""Bad command-line input and errors an operator can fix, through the real CLI: one clear
line naming what is wrong and what to do, the documented exit code, no traceback, nothing
written."""

from __future__ import annotations

import pytest

from helpers import reconcile, tree_snapshot, write_manifest


def bare_manifest(tmp_path):
    return write_manifest(
        tmp_path / "m.json",
        [
            {
                "common_name": "a.example",
                "cert_path": str(tmp_path / "out/a.crt"),
                "key_path": str(tmp_path / "out/a.key"),
            }
        ],
    )


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--workers", "0", "0 is not a whole number of at least 1"),
        ("--workers", "-3", "-3 is not a whole number of at least 1"),
        ("--workers", "two", "'two' is not a whole number of at least 1"),
        ("--lock-timeout", "-5", "-5 is not between 0 and 86400 seconds"),
        ("--lock-timeout", "nan", "nan is not between 0 and 86400 seconds"),
    ],
)
def test_an_out_of_range_pass_option_is_a_usage_error_that_changes_nothing(tmp_path, option, value, words):
    manifest = bare_manifest(tmp_path)
    before = tree_snapshot(tmp_path)
    proc = reconcile("-m", str(manifest), option, value, state_dir=tmp_path / "state")
    assert proc.returncode == 2, proc.stderr
    assert f"argument {option}: {words}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_snapshot(tmp_path) == before  # not even the state folder


def test_a_lock_held_past_the_timeout_prints_what_holds_it_and_what_to_do(tmp_path):
    """LockTimeout is a ReconcilerError like the others: message and hint, exit 1."""
    import fcntl
    import os

    manifest = bare_manifest(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = reconcile("-m", str(manifest), "--lock-timeout", "0.2", state_dir=state)
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert f"another reconcile (pid {os.getpid()}) holds {state / 'lock'} for more than 0.2s" in line
    assert "hint: wait for it, or raise --lock-timeout" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_every_error_the_cli_reports_derives_from_one_base_with_a_hint():
    from reconciler.errors import ReconcilerError
    from reconciler.folders import FolderError
    from reconciler.issuers import IssuerConfigError, IssuerError
    from reconciler.lock import LockTimeout
    from reconciler.manifest import ManifestError
    from reconciler.passes import UnknownCertificate
    from reconciler.status import StatusError

    for cls in (
        FolderError,
        IssuerConfigError,
        IssuerError,
        LockTimeout,
        ManifestError,
        UnknownCertificate,
        StatusError,
    ):
        assert issubclass(cls, ReconcilerError), cls
    err = ReconcilerError("the thing at /x is broken", hint="fix /x")
    assert (err.message, err.hint) == ("the thing at /x is broken", "fix /x")
    assert str(err) == "the thing at /x is broken (hint: fix /x)"
    assert str(ReconcilerError("no hint here")) == "no hint here"


def test_a_bad_timeout_in_the_environment_is_reported_like_the_flag_it_stands_for(tmp_path):
    manifest = bare_manifest(tmp_path)
    before = tree_snapshot(tmp_path)
    proc = reconcile("-m", str(manifest), state_dir=tmp_path / "state", env={"RECONCILER_CA_TIMEOUT": "soon"})
    assert proc.returncode == 2, proc.stderr
    assert "argument --ca-timeout: 'soon' is not a number of seconds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_snapshot(tmp_path) == before


def test_defaults_read_the_environment_they_are_given_not_the_process_one():
    from reconciler import defaults

    env = {"RECONCILER_STATE_DIR": "", "RECONCILER_ALLOW_UNTRUSTED_MANIFEST": "0"}
    assert defaults.setting("RECONCILER_STATE_DIR", "/fallback", env) == "/fallback"  # empty counts as unset
    assert not defaults.flag("RECONCILER_ALLOW_UNTRUSTED_MANIFEST", env)
    assert defaults.flag("RECONCILER_ALLOW_UNTRUSTED_MANIFEST", {"RECONCILER_ALLOW_UNTRUSTED_MANIFEST": "yes"})
    assert not defaults.colour_allowed({"NO_COLOR": ""}) and not defaults.colour_allowed({"TERM": "dumb"})
    assert defaults.colour_allowed({"TERM": "xterm"})
