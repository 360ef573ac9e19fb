"""Every manifest field takes effect on the next pass, with the smallest action.

Real passes (`passes.run_pass`: observe → plan → apply → status) against the embedded CA,
on real files, as root (owners are real chowns).
"""

from __future__ import annotations

import copy
import json
import os
import grp
import pwd
import stat
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.diff import CHMOD, CHOWN, ISSUE, REISSUE, RENEW, REWRITE_CHAIN, WRITE_CA
from reconciler.desired import load_desired
from reconciler.passes import Settings, run_pass, snapshot
from reconciler.render import plan_json, plan_text
from reconciler.status import StatusStore

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("these tests chown to real users (nobody, nogroup): run them as root (they never skip)")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    """One embedded CA for the module: creating one per example would dominate the run time."""
    return tmp_path_factory.mktemp("shared-ca") / "ca"


class Site:
    def __init__(self, folder: Path, ca_dir: Path, entry: dict):
        self.folder = folder
        self.manifest = folder / "certificate-manifest.json"
        self.settings = Settings(manifest=self.manifest, state_dir=folder / "state")
        self.ca_dir = ca_dir
        self.write(entry)

    def write(self, entry: dict) -> None:
        self.entry = entry
        doc = {"issuer": {"type": "local", "dir": str(self.ca_dir)}, "certificates": [entry]}
        self.manifest.write_text(json.dumps(doc))

    def plan(self):
        return snapshot(self.settings, load_desired(self.settings), StatusStore(self.settings.state_dir)).plan

    def actions(self) -> list[str]:
        (p,) = self.plan().certificates
        assert p.error is None, p.error
        return [a.action for a in p.actions]

    def converge(self):
        _snap, result = run_pass(self.settings)
        assert result.ok, result.failures()
        return result

    def path(self, field: str) -> Path:
        return self.folder / self.entry[field]

    def hook_runs(self) -> list[str]:
        log = self.folder / "hook.log"
        return log.read_text().splitlines() if log.exists() else []


def base_entry(**extra) -> dict:
    return {
        "common_name": "svc.example.com",
        "cert_path": "tls/svc.crt",
        "key_path": "tls/svc.key",
        "post_renewal_command": 'echo "$RECONCILER_ACTION" >> hook.log',
        **extra,
    }


def chain_of(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def meta(path: Path) -> tuple:
    st_ = os.stat(path)
    return st_.st_ino, st_.st_mtime_ns, st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode), path.read_bytes()


# --------------------------------------------------------------------------- include_ca


@pytest.mark.parametrize("turn_on", [True, False], ids=["include_ca-on", "include_ca-off"])
def test_changing_include_ca_rewrites_the_chain_keeping_leaf_and_key(tmp_path, ca_dir, turn_on):
    site = Site(tmp_path, ca_dir, base_entry(include_ca=not turn_on, owner="nobody:nogroup", permissions="640"))
    site.converge()
    crt, key = site.path("cert_path"), site.path("key_path")
    leaf_before = chain_of(crt)[0]
    key_before = meta(key)
    assert len(chain_of(crt)) == (1 if turn_on else 2)
    hooks_before = site.hook_runs()

    site.write(base_entry(include_ca=turn_on, owner="nobody:nogroup", permissions="640"))
    assert site.actions() == [REWRITE_CHAIN]
    site.converge()

    after = chain_of(crt)
    assert after[0] == leaf_before  # the same leaf, byte for byte (DER)
    assert meta(key) == key_before  # the key file was not touched at all
    assert len(after) == (2 if turn_on else 1)
    if turn_on:
        after[0].verify_directly_issued_by(after[1])
        assert after[1] == x509.load_pem_x509_certificate((ca_dir / "intermediate_ca.crt").read_bytes())
    st_ = crt.stat()
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (NOBODY, NOGROUP, 0o640)
    # the file's content changed: its post-renewal command ran, once, after the rewrite
    assert site.hook_runs() == hooks_before + [REWRITE_CHAIN]
    assert site.actions() == []


def test_a_stale_intermediate_in_the_file_is_replaced_by_the_issuers(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry(include_ca=True))
    site.converge()
    crt = site.path("cert_path")
    leaf, _intermediate = chain_of(crt)
    from reconciler.issuers.local import LocalCA

    foreign = LocalCA(tmp_path / "other-ca")
    foreign._ensure()
    stale = (tmp_path / "other-ca" / "intermediate_ca.crt").read_bytes()
    crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + stale)
    assert site.actions() == [REWRITE_CHAIN]
    site.converge()
    assert chain_of(crt)[0] == leaf
    assert chain_of(crt)[1] == x509.load_pem_x509_certificate((ca_dir / "intermediate_ca.crt").read_bytes())
    assert site.actions() == []


# --------------------------------------------------------------------------- ca_path


def test_a_deleted_ca_file_is_written_again_with_its_owner_and_no_new_certificate(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry(ca_path="tls/ca.crt", owner="nobody:nogroup"))
    site.converge()
    ca_file, crt = site.path("ca_path"), site.path("cert_path")
    serial = chain_of(crt)[0].serial_number
    cert_before = meta(crt)
    ca_file.unlink()
    assert site.actions() == [WRITE_CA]
    site.converge()
    assert ca_file.read_bytes() == (ca_dir / "root_ca.crt").read_bytes()
    st_ = ca_file.stat()
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (NOBODY, NOGROUP, 0o644)
    assert chain_of(crt)[0].serial_number == serial and meta(crt) == cert_before
    assert site.hook_runs()[-1] == WRITE_CA
    assert site.actions() == []


def test_a_new_ca_path_is_written_without_a_new_certificate(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry())
    site.converge()
    serial = chain_of(site.path("cert_path"))[0].serial_number
    site.write(base_entry(ca_path="trust/root.crt"))
    assert site.actions() == [WRITE_CA]
    site.converge()
    assert site.path("ca_path").read_bytes() == (ca_dir / "root_ca.crt").read_bytes()
    assert chain_of(site.path("cert_path"))[0].serial_number == serial
    assert site.actions() == []


def test_owner_applies_to_the_ca_file_too(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry(ca_path="tls/ca.crt"))
    site.converge()
    site.write(base_entry(ca_path="tls/ca.crt", owner="nobody:nogroup"))
    assert site.actions() == [CHOWN]
    site.converge()
    for field in ("cert_path", "key_path", "ca_path"):
        st_ = site.path(field).stat()
        assert (st_.st_uid, st_.st_gid) == (NOBODY, NOGROUP), field
    os.chown(site.path("ca_path"), 0, 0)
    os.chmod(site.path("ca_path"), 0o600)
    assert site.actions() == [CHOWN, CHMOD]
    site.converge()
    st_ = site.path("ca_path").stat()
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (NOBODY, NOGROUP, 0o644)
    assert site.actions() == []


# --------------------------------------------------------------------------- cert_type and duration


def test_changing_cert_type_reissues_with_the_asked_usage(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry())
    site.converge()
    site.write(base_entry(cert_type="client"))
    assert site.actions() == [REISSUE]
    site.converge()
    eku = chain_of(site.path("cert_path"))[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert site.actions() == []


def test_changing_duration_reissues_at_once_not_at_the_next_renewal(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry())
    site.converge()
    site.write(base_entry(duration="72h"))
    assert site.actions() == [REISSUE]
    site.converge()
    leaf = chain_of(site.path("cert_path"))[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=72, minutes=1)
    assert site.actions() == []


# --------------------------------------------------------------------------- the plan says it


def test_the_new_actions_are_named_exactly_in_the_json_plan_and_in_words_in_the_text(tmp_path, ca_dir):
    site = Site(tmp_path, ca_dir, base_entry(ca_path="tls/ca.crt"))
    site.converge()
    site.path("ca_path").unlink()
    site.write(base_entry(ca_path="tls/ca.crt", include_ca=True))
    plan = site.plan()
    (cert,) = plan_json(plan)["certificates"]
    assert [a["action"] for a in cert["actions"]] == ["rewrite_chain", "write_ca"]
    assert cert["actions"][0]["drift"][0]["field"] == "chain"
    text = plan_text(plan)
    assert text.splitlines()[0] == "Plan: 1 to rewrite the chain, 1 to write the CA file (0 of 1 unchanged)."
    assert "rewrite chain the certificate file lacks the CA chain include_ca asks for" in text
    assert f"write CA file CA file {site.path('ca_path')} missing" in text
    assert "Hooks that would run:" in text


# --------------------------------------------------------------------------- property: change one field


_KEYS = [{"type": "EC"}, {"type": "EC", "curve": "P-384"}, {"type": "Ed25519"}]


@st.composite
def starts(draw) -> dict:
    return base_entry(
        sans=draw(st.sampled_from([[], ["www.example.com"], ["10.0.0.5", "api.example.com"]])),
        key=draw(st.sampled_from(_KEYS)),
        cert_type=draw(st.sampled_from(["server", "client"])),
        duration=draw(st.sampled_from(["24h", "48h"])),
        renew_before=draw(st.sampled_from(["12h", "33%"])),
        include_ca=draw(st.booleans()),
        **({"ca_path": "tls/ca.crt"} if draw(st.booleans()) else {}),
        owner=draw(st.sampled_from(["root:root", "nobody:nogroup"])),
        cert_permissions=draw(st.sampled_from(["644", "640"])),
        key_permissions=draw(st.sampled_from(["600", "640"])),
    )


def _other(draw, options: list, current):
    return draw(st.sampled_from([o for o in options if o != current]))


@st.composite
def changes(draw, entry: dict) -> tuple[str, dict, str | None]:
    """(field, the changed entry, the one action DESIGN's drift table names for it or None)."""
    field = draw(
        st.sampled_from(
            [
                "sans",
                "common_name",
                "key",
                "cert_type",
                "duration",
                "include_ca",
                "ca_path",
                "owner",
                "cert_permissions",
                "key_permissions",
                "renew_before",
                "cert_path",
                "post_renewal_command",
            ]
        )
    )
    new = copy.deepcopy(entry)
    expected: str | None
    if field == "sans":
        new["sans"] = _other(
            draw, [[], ["www.example.com"], ["10.0.0.6"], ["2001:db8::1", "www.example.com"]], entry["sans"]
        )
        expected = REISSUE
    elif field == "common_name":
        new["common_name"] = "other.example.com"
        expected = REISSUE
    elif field == "key":
        new["key"] = _other(draw, _KEYS, entry["key"])
        expected = REISSUE
    elif field == "cert_type":
        new["cert_type"] = "client" if entry["cert_type"] == "server" else "server"
        expected = REISSUE
    elif field == "duration":
        new["duration"] = _other(draw, ["24h", "48h", "7d", "13h"], entry["duration"])
        expected = REISSUE
    elif field == "include_ca":
        new["include_ca"] = not entry["include_ca"]
        expected = REWRITE_CHAIN
    elif field == "ca_path":
        if "ca_path" in entry and draw(st.booleans()):
            del new["ca_path"]  # the old file stays where it is; nothing to do
            expected = None
        else:
            new["ca_path"] = "trust/root.crt" if "ca_path" in entry else "tls/ca.crt"
            expected = WRITE_CA
    elif field == "owner":
        new["owner"] = "nobody:nogroup" if entry["owner"] == "root:root" else "root:root"
        expected = CHOWN
    elif field in ("cert_permissions", "key_permissions"):
        options = ["644", "640", "444"] if field == "cert_permissions" else ["600", "640", "400"]
        new[field] = _other(draw, options, entry[field])
        expected = CHMOD
    elif field == "renew_before":
        # a fresh certificate is outside any window a valid renew_before can name
        new["renew_before"] = _other(draw, ["12h", "33%", "6h", "10%"], entry["renew_before"])
        expected = None
    elif field == "cert_path":
        new["cert_path"] = "tls/moved.crt"
        expected = ISSUE
    else:  # a changed command runs at the next change, not now
        new["post_renewal_command"] = 'echo "changed $RECONCILER_ACTION" >> hook.log'
        expected = None
    return field, new, expected


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_changing_any_one_field_plans_exactly_the_tables_action_and_then_nothing(ca_dir, data):
    entry = data.draw(starts(), label="start")
    field, changed, expected = data.draw(changes(entry), label="change")
    with tempfile.TemporaryDirectory() as folder:
        site = Site(Path(folder), ca_dir, entry)
        site.converge()
        assert site.actions() == [], "a converged certificate plans nothing"
        key_before = meta(site.path("key_path"))
        leaf_before = chain_of(site.path("cert_path"))[0]
        hooks_before = len(site.hook_runs())

        site.write(changed)
        assert site.actions() == ([expected] if expected else []), field
        site.converge()
        assert site.actions() == [], f"after applying the change of {field}"

        new_cert = chain_of(site.path("cert_path"))
        if expected not in (ISSUE, REISSUE, RENEW):  # no new certificate, no new key
            assert new_cert[0] == leaf_before
            if expected not in (CHOWN, CHMOD):
                assert meta(site.path("key_path")) == key_before
        # the hook runs exactly when a file's content changed
        ran = len(site.hook_runs()) - hooks_before
        assert ran == (1 if expected in (ISSUE, REISSUE, RENEW, REWRITE_CHAIN, WRITE_CA) else 0), (
            field,
            site.hook_runs(),
        )
        assert len(new_cert) == (2 if changed["include_ca"] else 1)
        if "ca_path" in changed:
            ca_file = site.path("ca_path")
            assert ca_file.read_bytes() == (ca_dir / "root_ca.crt").read_bytes()
            st_ = ca_file.stat()
            want_owner = (NOBODY, NOGROUP) if changed["owner"] == "nobody:nogroup" else (0, 0)
            assert ((st_.st_uid, st_.st_gid), stat.S_IMODE(st_.st_mode)) == (want_owner, 0o644)
