"""apply in this process, against a fake issuer that signs for real (tests/fakes.py): real
files, the real status store, real hooks; no root, no subprocess for the reconciler, no CA.
The end-to-end behaviour through the CLI as root stays in test_apply.py."""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fakes import FakeIssuer, InProcessPass, desired_from

from reconciler.apply import ApplyContext, apply
from reconciler.apply_reporter import ApplyReporter
from reconciler.atomic import CommitRefused, Transaction
from reconciler.crypto import fingerprint
from reconciler.folders import open_folder
from reconciler.issuers import IssuerError
from reconciler.observe import Trust, observe
from reconciler.parse import parse_leaf
from reconciler.status import StatusStore


def entry(out: Path, name: str, **extra) -> dict:
    return {
        "common_name": f"{name}.example",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        **extra,
    }


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)  # a folder others may not write: the target folders are checked
    return tmp_path, out, InProcessPass(tmp_path / "state")


def status_json(run: InProcessPass) -> dict:
    return json.loads((run.state / "status.json").read_text())["certificates"]


def test_missing_files_are_issued_chained_to_the_issuer_with_their_modes_and_the_next_plan_is_empty(site):
    tmp, out, run = site
    desired = desired_from(tmp, [entry(out, "a", sans=["10.0.0.1"], permissions="640"), entry(out, "b")])
    plan, result, _status = run.run(desired)
    assert [a.action for p in plan.certificates for a in p.actions] == ["issue", "issue"]
    assert result.ok and [c.content_changed for c in result.certificates] == [True, True]
    leaf = x509.load_pem_x509_certificates((out / "a.crt").read_bytes())[0]
    leaf.verify_directly_issued_by(run.issuer.intermediate)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.1"}
    assert stat.S_IMODE((out / "a.key").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "b.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "b.crt").stat().st_mode) == 0o644
    assert status_json(run)["a.example"]["last_action"] == "issue"
    again, _serials = run.plan(desired)
    assert not again.changes


def test_a_ca_refusal_fails_only_its_certificate_writes_nothing_for_it_and_is_recorded(site):
    tmp, out, run = site
    run.issuer.refuse["a.example"] = IssuerError("the CA is down", transient=True)
    desired = desired_from(tmp, [entry(out, "a"), entry(out, "b")])
    _plan, result, _status = run.run(desired)
    by_name = {c.name: c for c in result.certificates}
    assert not by_name["a.example"].ok and by_name["a.example"].transient
    assert "the CA is down" in by_name["a.example"].error
    assert by_name["b.example"].ok
    assert not (out / "a.crt").exists() and not (out / "a.key").exists()
    assert (out / "b.crt").exists()
    record = status_json(run)["a.example"]
    assert record["failures"] == 1 and "the CA is down" in record["last_error"]
    assert result.failures() == [f"a.example: {by_name['a.example'].error}"]


def test_a_certificate_for_other_names_than_requested_is_never_written(site):
    tmp, out, run = site
    run.issuer.other_sans = ("evil.example",)
    desired = desired_from(tmp, [entry(out, "a")])
    _plan, result, _status = run.run(desired)
    (res,) = result.certificates
    assert not res.ok and "other SANs (evil.example)" in res.error
    assert sorted(os.listdir(out)) == []


@pytest.mark.parametrize(
    "tamper, error",
    [
        (lambda i: replace(i, leaf_pem=b"<html>502 Bad Gateway</html>"), "not a PEM certificate"),
        (
            lambda i: replace(i, chain_pem=b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"),
            "a chain that is not PEM",
        ),
        # no leaf, and the leaf first in the chain: the file would read as a good certificate
        (lambda i: replace(i, leaf_pem=b"", chain_pem=i.leaf_pem + i.chain_pem), "not a PEM certificate"),
    ],
    ids=["leaf", "chain", "leaf-in-chain"],
)
def test_a_ca_answer_that_is_not_pem_is_refused_with_a_clear_error_and_nothing_is_written(site, tamper, error):
    tmp, out, run = site
    run.issuer.tamper = tamper
    _plan, result, _status = run.run(desired_from(tmp, [entry(out, "a", include_ca=True)]))
    (res,) = result.certificates
    assert not res.ok and error in res.error and "check the CA's logs" in res.error
    assert "Traceback" not in res.error and "unexpected error" not in res.error
    assert os.listdir(out) == []


def test_a_failed_hook_stays_owed_until_a_later_pass_runs_it_successfully(site):
    tmp, out, run = site
    ran = tmp / "ran"
    fail = tmp / "fail"
    fail.write_text("")
    command = f"echo run >> {ran}; test ! -e {fail}"
    desired = desired_from(
        tmp, [entry(out, "a", post_renewal_command=command), entry(out, "b", post_renewal_command=command)]
    )
    _plan, result, _status = run.run(desired)
    (hook,) = result.hooks
    assert not hook.ok and hook.certificates == ("a.example", "b.example")
    assert all(r["hook_pending"] and r["hook"]["result"] == "failed" for r in status_json(run).values())

    fail.unlink()
    plan, result, _status = run.run(desired)
    assert [a.action for p in plan.certificates for a in p.actions] == ["run_hook", "run_hook"]
    assert result.ok and ran.read_text() == "run\nrun\n", "one run per distinct command per pass"
    assert not any(r.get("hook_pending") for r in status_json(run).values())


def test_no_hooks_and_a_refused_hook_converge_the_files_and_leave_the_hook_owed(site):
    tmp, out, run = site
    ran = tmp / "ran"
    desired = desired_from(tmp, [entry(out, "a", post_renewal_command=f"touch {ran}")])
    _plan, result, _status = run.run(desired, skip_hooks=True)
    assert result.ok and result.hooks == [] and (out / "a.crt").exists()
    assert status_json(run)["a.example"]["hook"]["result"] == "skipped"

    plan, result, _status = run.run(desired, refuse_hooks="the manifest is writable by others")
    assert [a.action for a in plan.certificates[0].actions] == ["run_hook"]
    (hook,) = result.hooks
    assert not hook.ok and hook.refused == "the manifest is writable by others"
    record = status_json(run)["a.example"]
    assert record["hook_pending"] and record["hook"]["result"] == "refused"
    assert not ran.exists()


def test_a_cancelled_pass_starts_no_certificate_runs_no_hook_and_owes_nothing_new(site):
    tmp, out, run = site
    desired = desired_from(tmp, [entry(out, "a", post_renewal_command="true")])
    _plan, result, _status = run.run(desired, cancelled=lambda: True)
    assert result.certificates == [] and result.hooks == []
    assert os.listdir(out) == []
    assert run.issuer.requests == []
    record = status_json(run)["a.example"]
    assert "deploying_from" not in record and not record.get("hook_pending")


def test_renewal_with_rotation_never_keeps_the_key_and_replaces_only_the_certificate(site):
    tmp, out, run = site
    desired = desired_from(
        tmp, [entry(out, "a", duration="1h", renew_before="20m", key={"type": "EC", "rotation": "never"})]
    )
    run.run(desired)
    key, serial = (
        (out / "a.key").read_bytes(),
        x509.load_pem_x509_certificates((out / "a.crt").read_bytes())[0].serial_number,
    )
    plan, result, _status = run.run(desired, now=datetime.now(timezone.utc) + timedelta(minutes=50))
    assert [a.action for a in plan.certificates[0].actions] == ["renew"]
    assert result.ok and (out / "a.key").read_bytes() == key
    assert x509.load_pem_x509_certificates((out / "a.crt").read_bytes())[0].serial_number != serial


@pytest.mark.parametrize("include_ca", [False, True])
def test_re_observing_what_apply_wrote_gives_the_facts_of_a_fresh_read_and_sees_a_later_change(site, include_ca):
    tmp, out, run = site
    desired = desired_from(tmp, [entry(out, "a", include_ca=include_ca), entry(out, "b")])
    _plan, result, _status = run.run(desired)
    written = result.certificates[0].written
    assert written is not None and written.signer == fingerprint(run.issuer.intermediate)
    cert, trust = desired.certificates[0], Trust.of(run.issuer.trust_pems(), authoritative=True)
    fresh = observe(cert, trust)
    assert fresh.cert.issued_by == written.signer and fresh.key_matches
    assert observe(cert, trust, written=written) == fresh
    # the file is parsed once, when deploy checks the CA's answer: the re-read reuses that
    assert parse_leaf((out / "a.crt").read_bytes(), written)[0] is written.parsed is not None
    # the issuer's word is taken only for the bytes it vouched for: another certificate put
    # there after the pass (here one the fake CA's root never signed) is checked in full
    stranger = FakeIssuer()
    stranger.intermediate = run.issuer.intermediate  # same name, other key: only the signature tells
    stranger_pass = InProcessPass(tmp / "other-state", stranger)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    stranger_pass.run(desired_from(elsewhere, [entry(elsewhere, "a")]))
    (out / "a.crt").write_bytes((elsewhere / "a.crt").read_bytes())
    assert observe(cert, trust, written=written).cert.issued_by is None
    assert parse_leaf((out / "a.crt").read_bytes(), written)[0] is not written.parsed


def test_a_refused_rename_puts_the_files_already_replaced_back(tmp_path):
    """A key replaced, then its certificate's rename refused (here: a folder appeared in
    its place): the old key is put back, so the service keeps a matching pair."""
    (tmp_path / "k").write_bytes(b"old key")
    os.chmod(tmp_path / "k", 0o600)
    with open_folder(tmp_path, None) as folder, Transaction() as tx:
        tx.stage("key", folder, "k", b"new key", 0o600)
        tx.stage("cert", folder, "c", b"new cert", 0o644)
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "x").write_text("")  # a non-empty folder: rename(2) cannot replace it
        with pytest.raises(CommitRefused) as refused:
            tx.commit()
    assert refused.value.label == "cert" and refused.value.undone == ("key",) and refused.value.restored
    assert refused.value.cause.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert (tmp_path / "k").read_bytes() == b"old key" and stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["c", "k"], "no temporary file is left behind"


def test_leaving_a_transaction_uncommitted_discards_what_it_staged(tmp_path):
    with open_folder(tmp_path, None) as folder, Transaction() as tx:
        tx.stage("key", folder, "k", b"new key", 0o600)
        assert len(os.listdir(tmp_path)) == 1
    assert os.listdir(tmp_path) == []


def test_a_key_and_its_certificate_in_one_folder_share_one_walk_from_the_root(site, monkeypatch):
    """The folder both files land in is opened once per deployment, whether it was there
    (`a`) or is created by the write (`b`'s new folder); a key elsewhere gets its own walk."""
    import reconciler.targets

    tmp, out, run = site
    walked: list[Path] = []
    real = reconciler.targets.resolve_file

    def counting(path, *args, **kwargs):
        opened = real(path, *args, **kwargs)
        walked.append(opened[0].path)
        return opened

    monkeypatch.setattr(reconciler.targets, "resolve_file", counting)
    entries = [entry(out, "a"), entry(out / "new", "b"), entry(out, "c", key_path=str(tmp / "private" / "c.key"))]
    _plan, result, _status = run.run(desired_from(tmp, entries))
    assert result.ok
    assert sorted(walked) == sorted([out, out / "new", tmp / "private", out])
    for path in (out / "a.key", out / "a.crt", out / "new" / "b.key", out / "new" / "b.crt", tmp / "private" / "c.key"):
        assert path.exists()
    again, _serials = run.plan(desired_from(tmp, entries))
    assert not again.changes


def test_a_folder_made_writable_by_every_user_while_the_ca_answers_is_refused_when_a_folder_is_created_below_it(
    tmp_path,
):
    """The certificate's folder does not exist yet, so it is created after the CA answered:
    that walk starts from / again rather than from the folders checked before the call."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "site" / "keys").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "site", 0o755)
    issuer = FakeIssuer()
    real = issuer.issue

    def issue(request, key):
        os.chmod(tmp_path / "site", 0o777)  # while the CA answers
        return real(request, key)

    issuer.issue = issue  # type: ignore[method-assign]
    run = InProcessPass(tmp_path / "state", issuer=issuer)
    a = {
        "common_name": "a.example",
        "key_path": str(tmp_path / "site" / "keys" / "a.key"),
        "cert_path": str(tmp_path / "site" / "newcerts" / "a.crt"),
    }
    _plan, result, _status = run.run(desired_from(tmp_path, [a]))
    (res,) = result.certificates
    assert not res.ok and "every user" in res.error
    assert not (tmp_path / "site" / "newcerts" / "a.crt").exists()


def test_a_chain_rewrite_whose_intermediate_the_issuer_no_longer_holds_intact_fails_with_a_clear_error(
    site, monkeypatch
):
    """rewrite_chain takes the chain from the issuer's certificates (trust_pems): one damaged
    since the plan was made (the embedded CA's intermediate_ca.crt) is no certificate the
    issuer knows, a failure in words, not an unexpected ValueError."""
    tmp, out, run = site
    desired = desired_from(tmp, [entry(out, "a", include_ca=True)])
    run.run(desired)
    leaf = x509.load_pem_x509_certificates((out / "a.crt").read_bytes())[0]
    (out / "a.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))  # the chain is gone
    root_pem, _intermediate = run.issuer.trust_pems()
    plan, serials = run.plan(desired)
    assert [a.action for p in plan.certificates for a in p.actions] == ["rewrite_chain"]
    damaged = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    monkeypatch.setattr(run.issuer, "trust_pems", lambda: [root_pem, damaged])
    ctx = ApplyContext(run.issuer, serials=serials, cwd=tmp)
    result = apply(plan, ctx, ApplyReporter(StatusStore(run.state), progress=False))
    (failed,) = result.certificates
    assert not failed.ok
    assert "the issuer no longer knows certificate" in failed.error, failed.error
