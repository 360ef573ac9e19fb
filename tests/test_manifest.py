"""load+validate: both manifest shapes, defaults, and every error a manifest can give.

Every error is checked for its JSON path and the words that tell the operator what to do.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.manifest import DERIVED_VERSION, Issue, ManifestError, load
from reconciler.validation_cache import ValidationCache
from reconciler.model import IssuerSpec, KeySpec, RenewBefore

ROOT_GROUP = grp.getgrgid(0).gr_name
ROOT_USER = pwd.getpwuid(0).pw_name
NO_SUCH_USER = "no-such-user-reconciler"
NO_SUCH_GROUP = "no-such-group-reconciler"


def entry(n: int = 0, **fields) -> dict:
    base = {"common_name": f"svc{n}.example.com", "cert_path": f"certs/svc{n}.crt", "key_path": f"private/svc{n}.key"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def write(tmp_path: Path, document, name: str = "certificate-manifest.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def load_doc(tmp_path: Path, document):
    return load(write(tmp_path, document))


def issues_of(tmp_path: Path, document) -> list[Issue]:
    with pytest.raises(ManifestError) as info:
        load_doc(tmp_path, document)
    return info.value.issues


def raw_issues(tmp_path: Path, data: bytes) -> list[Issue]:
    path = tmp_path / "certificate-manifest.json"
    path.write_bytes(data)
    with pytest.raises(ManifestError) as info:
        load(path)
    return info.value.issues


def one_error(tmp_path: Path, document, path: str, *words: str) -> str:
    """Exactly one error, at `path`, whose message holds every word; returns the message."""
    issues = issues_of(tmp_path, document)
    assert [i.path for i in issues] == [path], [str(i) for i in issues]
    message = issues[0].message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    return message


def error_at(issues: list[Issue], path: str, *words: str) -> str:
    found = [i for i in issues if i.path == path]
    assert found, f"no error at {path}; got {[str(i) for i in issues]}"
    assert len(found) == 1, [str(i) for i in found]
    for w in words:
        assert w in found[0].message, f"{w!r} not in {found[0].message!r}"
    return found[0].message


# --------------------------------------------------------------------------- shapes and defaults


def test_bare_array_and_object_shape_give_the_same_certificates(tmp_path):
    entries = [entry(1, sans=["a.example.com", "10.0.0.1"]), entry(2, key={"type": "Ed25519"})]
    bare = load_doc(tmp_path, entries)
    obj = load(write(tmp_path, {"certificates": entries}, "object.json"))
    assert bare.certificates == obj.certificates
    assert bare.issuer is None and obj.issuer is None  # no issuer block: flags, env or defaults.json decide
    assert [c.name for c in bare.certificates] == ["svc1.example.com", "svc2.example.com"]


def test_every_field_has_its_documented_default(tmp_path):
    (c,) = load_doc(tmp_path, [entry(1)]).certificates
    assert c.name == c.common_name == "svc1.example.com"
    assert c.sans == frozenset({"svc1.example.com"})
    assert (c.cert_mode, c.key_mode) == (0o644, 0o600)
    assert c.renew_before == RenewBefore(fixed=timedelta(hours=12))
    assert c.duration == timedelta(hours=24)
    assert c.hook_timeout == timedelta(minutes=5)
    assert c.key == KeySpec(type="EC", curve="P-256", size=None, rotation="always")
    assert (c.owner, c.uid, c.gid) == (None, None, None)
    assert c.post_renewal_command is None
    assert (c.include_ca, c.ca_path, c.cert_type) == (False, None, "server")
    assert (c.guest_id, c.guest_type, c.allow_symlink) == (None, None, False)


def test_defaults_apply_to_every_entry_and_entries_override_them(tmp_path):
    doc = {
        "defaults": {
            "owner": f"{ROOT_USER}:{ROOT_GROUP}",
            "permissions": "640",
            "renew_before": "33%",
            "duration": "48h",
            "key": {"type": "RSA", "size": 3072},
            "post_renewal_command": "systemctl reload nginx",
            "cert_type": "client",
        },
        "certificates": [
            entry(1),
            entry(
                2,
                owner="0",
                renew_before="90m",
                key={"type": "EC", "curve": "P-384"},
                cert_permissions="644",
                cert_type="server",
            ),
        ],
    }
    first, second = load_doc(tmp_path, doc).certificates
    assert (first.uid, first.gid, first.cert_mode, first.key_mode) == (0, 0, 0o640, 0o640)
    assert first.renew_before == RenewBefore(share=0.33)
    assert first.duration == second.duration == timedelta(hours=48)
    assert first.key == KeySpec("RSA", None, 3072, "always")
    assert first.cert_type == "client"
    assert first.post_renewal_command == second.post_renewal_command == "systemctl reload nginx"
    # the entry wins, field by field; "key" is replaced as a whole
    assert (second.uid, second.gid) == (0, None)
    assert (second.cert_mode, second.key_mode) == (0o644, 0o640)
    assert second.renew_before == RenewBefore(fixed=timedelta(minutes=90))
    assert second.key == KeySpec("EC", "P-384", None, "always")
    assert second.cert_type == "server"


def test_relative_paths_resolve_against_the_manifest_folder_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "reconciler"
    folder.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    doc = {
        "issuer": {"type": "local", "dir": "../ca"},
        "certificates": [entry(1, cert_path="../tls/a.crt", key_path="private/a.key", ca_path="/srv/ca.crt")],
    }
    desired = load(write(folder, doc))
    (c,) = desired.certificates
    assert c.cert_path == str(tmp_path / "etc" / "tls" / "a.crt")
    assert c.key_path == str(folder / "private" / "a.key")
    assert c.ca_path == "/srv/ca.crt"
    assert desired.issuer.dir == tmp_path / "etc" / "ca"
    assert desired.manifest_path == folder / "certificate-manifest.json"


def test_a_relative_manifest_path_is_made_absolute(tmp_path, monkeypatch):
    write(tmp_path, [entry(1)])
    monkeypatch.chdir(tmp_path)
    (c,) = load(Path("certificate-manifest.json")).certificates
    assert c.cert_path == str(tmp_path / "certs" / "svc1.crt")


def test_sans_include_the_common_name_normalised(tmp_path):
    (c,) = load_doc(
        tmp_path, [entry(1, common_name="WWW.Example.COM.", sans=["2001:DB8::1", "10.0.0.5", "*.Example.com"])]
    ).certificates
    assert c.common_name == "www.example.com"  # written into the certificate as the SAN normaliser spells it
    assert c.sans == frozenset({"www.example.com", "IP:2001:db8::1", "IP:10.0.0.5", "*.example.com"})


@pytest.mark.parametrize(
    "key, want",
    [
        ({"type": "EC"}, KeySpec("EC", "P-256", None, "always")),
        ({"type": "EC", "curve": "P-384"}, KeySpec("EC", "P-384", None, "always")),
        ({"type": "RSA"}, KeySpec("RSA", None, 2048, "always")),
        ({"type": "RSA", "size": 4096, "rotation": "never"}, KeySpec("RSA", None, 4096, "never")),
        ({"type": "Ed25519"}, KeySpec("Ed25519", None, None, "always")),
    ],
)
def test_key_specs(tmp_path, key, want):
    (c,) = load_doc(tmp_path, [entry(1, key=key)]).certificates
    assert c.key == want


@pytest.mark.parametrize(
    "fields, cert_mode, key_mode",
    [
        ({}, 0o644, 0o600),
        ({"permissions": "640"}, 0o640, 0o640),
        ({"permissions": "0640"}, 0o640, 0o640),
        ({"permissions": "640", "cert_permissions": "644"}, 0o644, 0o640),
        ({"permissions": "640", "key_permissions": "600"}, 0o640, 0o600),
        ({"cert_permissions": "444", "key_permissions": "400"}, 0o444, 0o400),
        ({"permissions": "644", "key_permissions": "600"}, 0o644, 0o600),
        ({"key_permissions": "644", "allow_world_readable_key": True}, 0o644, 0o644),
    ],
)
def test_permissions_apply_to_both_files_and_the_specific_fields_override(tmp_path, fields, cert_mode, key_mode):
    (c,) = load_doc(tmp_path, [entry(1, **fields)]).certificates
    assert (c.cert_mode, c.key_mode) == (cert_mode, key_mode)


@pytest.mark.parametrize(
    "owner, uid, gid",
    [
        (f"{ROOT_USER}:{ROOT_GROUP}", 0, 0),
        (ROOT_USER, 0, None),
        ("0:33", 0, 33),
        ("4242:4343", 4242, 4343),  # numeric ids need not exist
        ("nobody:nogroup", None, None),
    ],
)
def test_owner_forms(tmp_path, owner, uid, gid):
    if owner == "nobody:nogroup":
        # Debian's base users; the apply tests rely on them too
        uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    (c,) = load_doc(tmp_path, [entry(1, owner=owner)]).certificates
    assert (c.owner, c.uid, c.gid) == (owner, uid, gid)


@pytest.mark.parametrize(
    "text, want",
    [
        ("12h", RenewBefore(fixed=timedelta(hours=12))),
        ("90m", RenewBefore(fixed=timedelta(minutes=90))),
        ("1h30m", RenewBefore(fixed=timedelta(minutes=90))),
        ("33%", RenewBefore(share=0.33)),
        ("12.5%", RenewBefore(share=0.125)),
    ],
)
def test_renew_before_forms(tmp_path, text, want):
    (c,) = load_doc(tmp_path, [entry(1, renew_before=text)]).certificates
    assert c.renew_before == want


def test_renew_before_in_days_with_a_longer_lifetime(tmp_path):
    (c,) = load_doc(tmp_path, [entry(1, renew_before="2d", duration="1w")]).certificates
    assert (c.renew_before.fixed, c.duration) == (timedelta(days=2), timedelta(days=7))


def test_name_guest_and_flags_are_carried(tmp_path):
    (c,) = load_doc(
        tmp_path,
        [
            entry(
                1,
                name="web",
                guest_id=101,
                guest_type="lxc",
                include_ca=True,
                ca_path="ca.crt",
                allow_symlink=True,
                hook_timeout="30s",
            )
        ],
    ).certificates
    assert (c.name, c.guest_id, c.guest_type, c.include_ca, c.allow_symlink) == ("web", "101", "lxc", True, True)
    assert c.ca_path == str(tmp_path / "ca.crt")
    assert c.hook_timeout == timedelta(seconds=30)


def test_two_certificates_may_share_a_common_name_when_named_apart(tmp_path):
    doc = [entry(1, name="server"), entry(2, common_name="svc1.example.com", name="client", cert_type="client")]
    assert [c.name for c in load_doc(tmp_path, doc).certificates] == ["server", "client"]


def test_an_empty_list_is_a_valid_manifest(tmp_path):
    assert load_doc(tmp_path, []).certificates == ()
    assert load(write(tmp_path, {"certificates": []}, "o.json")).certificates == ()


def test_step_ca_issuer_block_resolves_paths_and_a_missing_password_file_is_not_a_manifest_error(tmp_path):
    doc = {
        "issuer": {
            "type": "step-ca",
            "url": "https://ca.internal:9000/",
            "root": "step/root_ca.crt",
            "provisioner": "admin@example",
            "password_file": "step/password.txt",  # does not exist: a runtime problem for apply/doctor
        },
        "certificates": [entry(1)],
    }
    issuer = load_doc(tmp_path, doc).issuer
    assert issuer == IssuerSpec(
        type="step-ca",
        url="https://ca.internal:9000",
        root=tmp_path / "step" / "root_ca.crt",
        provisioner="admin@example",
        password_file=tmp_path / "step" / "password.txt",
    )


def test_step_ca_issuer_with_a_fingerprint_instead_of_a_root(tmp_path):
    fp = "AB" * 32
    issuer = load_doc(
        tmp_path, {"issuer": {"type": "step-ca", "url": "https://ca:9000", "fingerprint": fp}, "certificates": []}
    ).issuer
    assert issuer.fingerprint == fp.lower() and issuer.root is None


# --------------------------------------------------------------------------- reading the file


def test_a_missing_manifest_says_which_file_and_how_to_point_at_another(tmp_path):
    with pytest.raises(ManifestError) as info:
        load(tmp_path / "nope.json")
    (issue,) = info.value.issues
    assert "does not exist" in issue.message and "-m/--manifest" in issue.message and "nope.json" in issue.message


def test_a_directory_instead_of_a_file(tmp_path):
    with pytest.raises(ManifestError) as info:
        load(tmp_path)
    (issue,) = info.value.issues
    assert "is a directory" in issue.message and "JSON file inside it" in issue.message


@pytest.mark.parametrize("data", [b"", b"  \n\t\n"])
def test_an_empty_file(tmp_path, data):
    (issue,) = raw_issues(tmp_path, data)
    assert issue.path == "" and "is empty" in issue.message and "JSON array or object" in issue.message


def test_a_byte_order_mark_is_refused_with_the_fix(tmp_path):
    (issue,) = raw_issues(tmp_path, b"\xef\xbb\xbf" + json.dumps([entry(1)]).encode())
    assert "byte-order mark" in issue.message and "without BOM" in issue.message


def test_non_utf8_bytes_name_the_byte_and_line(tmp_path):
    data = b'[\n  {"common_name": "caf\xe9.example.com",\n "cert_path": "a", "key_path": "b"}\n]'
    (issue,) = raw_issues(tmp_path, data)
    assert "not UTF-8" in issue.message and "0xe9" in issue.message and "line 2" in issue.message


@pytest.mark.parametrize(
    "text, line, column",
    [
        ('[\n  {"common_name": "a.example",\n   "cert_path": "a.crt",\n  }\n]', 4, 3),
        ('{"certificates": [\n]\n', 3, 1),
        ("[\n  {'common_name': 'a'}\n]", 2, 4),
    ],
)
def test_invalid_json_reports_line_and_column(tmp_path, text, line, column):
    (issue,) = raw_issues(tmp_path, text.encode())
    assert issue.message.startswith(f"invalid JSON at line {line}, column {column}:"), issue.message


def test_a_key_given_twice_in_one_object_is_an_error_not_a_silent_last_wins(tmp_path):
    text = '[{"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key", "key_path": "b.key"}]'
    (issue,) = raw_issues(tmp_path, text.encode())
    assert "'key_path' appears twice" in issue.message and "keep one" in issue.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_refused(tmp_path, constant):
    text = f'[{{"common_name": "a.example", "cert_path": "a", "key_path": "b", "guest_id": {constant}}}]'
    (issue,) = raw_issues(tmp_path, text.encode())
    assert "is not valid JSON" in issue.message


@pytest.mark.parametrize("document, word", [("\"just a string\"", "a string"), ("42", "a number"), ("null", "null")])
def test_the_top_level_must_be_an_array_or_an_object(tmp_path, document, word):
    (issue,) = raw_issues(tmp_path, document.encode())
    assert "expected a JSON array of certificates or an object" in issue.message and word in issue.message


# --------------------------------------------------------------------------- structure (schema)


@pytest.mark.parametrize("field", ["common_name", "cert_path", "key_path"])
def test_required_fields(tmp_path, field):
    one_error(tmp_path, {"certificates": [entry(1, **{field: None})]}, "certificates[0]", f'"{field}" is required')


def test_an_object_manifest_needs_certificates(tmp_path):
    one_error(tmp_path, {"issuer": {"type": "local"}}, "", '"certificates" is required')


def test_unknown_entry_field_suggests_the_close_one(tmp_path):
    msg = one_error(
        tmp_path,
        {"certificates": [entry(1), entry(2, permisions="600")]},
        "certificates[1].permisions",
        "unknown field",
    )
    assert 'did you mean "permissions"?' in msg


def test_unknown_field_with_nothing_close_lists_the_known_fields(tmp_path):
    msg = one_error(tmp_path, [entry(1, colour="blue")], "[0].colour", "unknown field", "known fields:")
    assert "common_name" in msg and "renew_before" in msg


def test_unknown_top_level_field_suggests_the_close_one(tmp_path):
    issues = issues_of(tmp_path, {"certificates": [], "defualts": {}})
    assert error_at(issues, "defualts", 'did you mean "defaults"?')


def test_unknown_fields_in_defaults_key_and_issuer(tmp_path):
    issues = issues_of(
        tmp_path,
        {
            "issuer": {"type": "step-ca", "url": "https://ca:9000", "provisoner": "admin"},
            "defaults": {"renew_befor": "1h"},
            "certificates": [entry(1, key={"type": "EC", "curv": "P-384"})],
        },
    )
    assert len(issues) == 3
    error_at(issues, "issuer.provisoner", 'did you mean "provisioner"?')
    error_at(issues, "defaults.renew_befor", 'did you mean "renew_before"?')
    error_at(issues, "certificates[0].key.curv", 'did you mean "curve"?')


@pytest.mark.parametrize(
    "document, path, words",
    [
        ({"certificates": {"a": 1}}, "certificates", ["expected an array", "an object"]),
        ([entry(1), "svc2.example.com"], "[1]", ["expected an object", "a string"]),
        ([entry(1, sans="a.example.com")], "[0].sans", ["expected an array", "a string"]),
        ([entry(1, sans=["a.example.com", 5])], "[0].sans[1]", ["expected a string", "a number"]),
        ([entry(1, include_ca="yes")], "[0].include_ca", ["expected a boolean", "a string"]),
        ([entry(1, guest_id=True)], "[0].guest_id", ["string or integer", "a boolean"]),
        ([entry(1, permissions=644)], "[0].permissions", ["expected a string", "a number"]),
        ({"defaults": [], "certificates": []}, "defaults", ["expected an object", "an array"]),
        ({"issuer": "local", "certificates": []}, "issuer", ["expected an object", "a string"]),
    ],
)
def test_wrong_types(tmp_path, document, path, words):
    one_error(tmp_path, document, path, *words)


@pytest.mark.parametrize(
    "field, value",
    [("common_name", ""), ("cert_path", ""), ("key_path", ""), ("name", "")],
)
def test_empty_strings(tmp_path, field, value):
    one_error(tmp_path, [entry(1, **{field: value})], f"[0].{field}", "is empty")


@pytest.mark.parametrize("field", ["permissions", "cert_permissions", "key_permissions"])
@pytest.mark.parametrize("value", ["rw-r-----", "0888", "6400", "64"])
def test_malformed_modes(tmp_path, field, value):
    one_error(
        tmp_path,
        [entry(1, **{field: value})],
        f"[0].{field}",
        json.dumps(value),
        "is not valid",
        "octal file mode",
        '"640"',
    )


@pytest.mark.parametrize("owner", ["root group", "root:www:data", ":www-data", "root:", "-root"])
def test_malformed_owner(tmp_path, owner):
    one_error(tmp_path, [entry(1, owner=owner)], "[0].owner", "is not valid", "user:group")


@pytest.mark.parametrize(
    "field, value, choices",
    [
        ("cert_type", "both", ['"server"', '"client"']),
        ("key", {"type": "DSA"}, ['"EC"', '"RSA"', '"Ed25519"']),
        ("key", {"type": "EC", "curve": "P-521"}, ['"P-256"', '"P-384"']),
        ("key", {"type": "RSA", "size": 1024}, ["2048", "3072", "4096"]),
        ("key", {"type": "EC", "rotation": "sometimes"}, ['"always"', '"never"']),
    ],
)
def test_values_outside_the_allowed_set_list_the_choices(tmp_path, field, value, choices):
    issues = issues_of(tmp_path, [entry(1, **{field: value})])
    assert len(issues) == 1, [str(i) for i in issues]
    assert issues[0].path.startswith(f"[0].{field}")
    assert "is not allowed; choose one of" in issues[0].message
    for c in choices:
        assert c in issues[0].message


def test_key_needs_a_type(tmp_path):
    one_error(tmp_path, [entry(1, key={"curve": "P-384"})], "[0].key", '"type" is required')


@pytest.mark.parametrize(
    "key",
    [
        {"type": "EC", "size": 2048},
        {"type": "RSA", "curve": "P-256"},
        {"type": "Ed25519", "curve": "P-256"},
        {"type": "Ed25519", "size": 4096},
    ],
)
def test_key_fields_that_do_not_belong_together(tmp_path, key):
    one_error(tmp_path, [entry(1, key=key)], "[0].key", "do not belong together", "curve is for EC, size for RSA")


@pytest.mark.parametrize(
    "issuer, path, words",
    [
        ({"type": "local", "url": "https://ca:9000"}, "issuer.url", ["not allowed for this issuer type"]),
        ({"type": "local", "password_file": "p"}, "issuer.password_file", ["not allowed for this issuer type"]),
        ({"type": "step-ca", "dir": "ca"}, "issuer.dir", ["not allowed for this issuer type"]),
        (
            {"type": "step-ca", "url": "http://ca:9000"},
            "issuer.url",
            ["is not valid", "https://", '"https://ca.internal:9000"'],
        ),
        (
            {"type": "step-ca", "fingerprint": "abc"},
            "issuer.fingerprint",
            ["is not valid", "64 hex digits", "step certificate fingerprint"],
        ),
        ({"type": "step-ca", "provisioner": ""}, "issuer.provisioner", ["is empty"]),
        ({"type": "vault"}, "issuer.type", ["choose one of", '"local"', '"step-ca"']),
        ({"url": "https://ca:9000"}, "issuer", ['"type" is required']),
        ({"type": "step-ca", "url": 9000}, "issuer.url", ["expected a string", "a number"]),
    ],
)
def test_issuer_block_errors(tmp_path, issuer, path, words):
    issues = issues_of(tmp_path, {"issuer": issuer, "certificates": [entry(1)]})
    error_at(issues, path, *words)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize("field", ["duration", "hook_timeout"])
@pytest.mark.parametrize("value", ["24 hours", "1.5h", "12H", "h", "12"])
def test_malformed_durations(tmp_path, field, value):
    one_error(
        tmp_path, [entry(1, **{field: value})], f"[0].{field}", json.dumps(value), "is not valid", '"90m"', '"12h"'
    )


@pytest.mark.parametrize("field", ["duration", "hook_timeout"])
def test_a_zero_duration(tmp_path, field):
    one_error(tmp_path, [entry(1, **{field: "0h"})], f"[0].{field}", "is zero")


@pytest.mark.parametrize("value", ["12 hours", "-1h", "33 %"])
def test_malformed_renew_before(tmp_path, value):
    one_error(tmp_path, [entry(1, renew_before=value)], "[0].renew_before", "is not valid", '"12h"', '"33%"')


@pytest.mark.parametrize("value", ["0%", "100%", "150%"])
def test_renew_before_share_must_be_between_0_and_100(tmp_path, value):
    one_error(
        tmp_path, [entry(1, renew_before=value)], "[0].renew_before", "not a share of the lifetime", "between 0 and 100"
    )


def test_renew_before_zero(tmp_path):
    one_error(tmp_path, [entry(1, renew_before="0m")], "[0].renew_before", "is zero")


@pytest.mark.parametrize("renew, duration", [("24h", "24h"), ("2d", "24h")])
def test_renew_before_not_shorter_than_the_lifetime_would_renew_on_every_pass(tmp_path, renew, duration):
    one_error(
        tmp_path,
        [entry(1, renew_before=renew, duration=duration)],
        "[0].renew_before",
        "not shorter than the lifetime",
        "every pass would renew",
        '"33%"',
    )


# --------------------------------------------------------------------------- key exposure


def test_one_permissions_value_that_exposes_the_key_is_the_error_from_the_issue(tmp_path):
    doc = {"certificates": [entry(0), entry(1), entry(2, permissions="644")]}
    msg = one_error(tmp_path, doc, "certificates[2].permissions")
    assert msg.startswith('"644" would make the private key readable by every user; set "key_permissions": "600"')


@pytest.mark.parametrize("mode", ["604", "0644", "606", "0777"])
def test_key_permissions_readable_by_others(tmp_path, mode):
    one_error(
        tmp_path,
        [entry(1, key_permissions=mode)],
        "[0].key_permissions",
        "readable by every user",
        '"allow_world_readable_key": true',
    )


def test_cert_permissions_never_expose_the_key(tmp_path):
    (c,) = load_doc(tmp_path, [entry(1, cert_permissions="664")]).certificates
    assert (c.cert_mode, c.key_mode) == (0o664, 0o600)


@pytest.mark.parametrize(
    "field, mode", [("cert_permissions", "666"), ("cert_permissions", "0777"), ("permissions", "602")]
)
def test_a_certificate_every_user_could_replace_is_an_error(tmp_path, field, mode):
    msg = one_error(
        tmp_path,
        [entry(1, **{field: mode}, allow_world_readable_key=True)],
        f"[0].{field}",
        "every user replace the certificate",
    )
    assert msg.endswith('set "cert_permissions": "644"')


def test_a_key_override_fixes_a_shared_permissions_value(tmp_path):
    (c,) = load_doc(tmp_path, [entry(1, permissions="644", key_permissions="640")]).certificates
    assert (c.cert_mode, c.key_mode) == (0o644, 0o640)


# --------------------------------------------------------------------------- owners


def test_a_user_that_does_not_exist(tmp_path):
    one_error(
        tmp_path, [entry(1, owner=NO_SUCH_USER)], "[0].owner", f'user "{NO_SUCH_USER}" does not exist', "numeric uid"
    )


def test_a_group_that_does_not_exist(tmp_path):
    one_error(
        tmp_path,
        [entry(1, owner=f"{ROOT_USER}:{NO_SUCH_GROUP}")],
        "[0].owner",
        f'group "{NO_SUCH_GROUP}" does not exist',
        "numeric gid",
    )


def test_user_and_group_that_do_not_exist_are_both_named(tmp_path):
    one_error(
        tmp_path,
        [entry(1, owner=f"{NO_SUCH_USER}:{NO_SUCH_GROUP}")],
        "[0].owner",
        f'user "{NO_SUCH_USER}"',
        f'group "{NO_SUCH_GROUP}"',
    )


# --------------------------------------------------------------------------- SANs


@pytest.mark.parametrize(
    "san, words",
    [
        ("bad..example.com", ["neither a DNS name nor an IP address"]),
        ("exa mple.com", ["neither a DNS name nor an IP address"]),
        ("under_score.example.com", ["neither a DNS name nor an IP address"]),
        ("-lead.example.com", ["neither a DNS name nor an IP address"]),
        ("999.1.1.1", ["neither a DNS name nor a valid IP address"]),
        ("10.0.0", ["neither a DNS name nor a valid IP address"]),
        ("foo.*.example.com", ["wildcard", "left-most label", '"*.example.com"']),
        ("*foo.example.com", ["wildcard", "left-most label"]),
        ("*.com", ["wildcard", "whole top-level domain"]),
        ("fe80::1%eth0", ["zone index", "'fe80::1'"]),
        ("a" * 64 + ".example.com", ["neither a DNS name nor an IP address"]),
    ],
)
def test_a_san_that_is_neither_dns_nor_ip(tmp_path, san, words):
    one_error(
        tmp_path,
        {"certificates": [entry(1, sans=["ok.example.com", san])]},
        "certificates[0].sans[1]",
        repr(san),
        *words,
    )


def test_a_common_name_that_is_neither_dns_nor_ip(tmp_path):
    one_error(tmp_path, [entry(1, common_name="Web Server")], "[0].common_name", "neither a DNS name nor an IP address")


@pytest.mark.parametrize(
    "written, want",
    [
        (" a.example ", "a.example"),
        ("A.Example.", "a.example"),
        (" 10.0.0.5", "10.0.0.5"),
        ("[2001:DB8::1]", "2001:db8::1"),
    ],
)
def test_the_common_name_is_normalised_as_the_sans_are(tmp_path, written, want):
    """The CN went into the certificate as written: " a.example " and "A.Example." then
    never matched what the certificate was asked for."""
    (c,) = load_doc(tmp_path, [entry(1, common_name=written, name="svc")]).certificates
    assert c.common_name == want


@pytest.mark.parametrize(
    "field, value, character",
    [
        ("common_name", "\u212aelvin.example", "U+212A KELVIN SIGN"),
        ("sans", "\u212aelvin.example", "U+212A KELVIN SIGN"),
        ("sans", "\uff41.example", "U+FF41 FULLWIDTH LATIN SMALL LETTER A"),
        ("sans", "b\u00fccher.example", "U+00FC LATIN SMALL LETTER U WITH DIAERESIS"),
    ],
)
def test_a_compatibility_character_is_refused_not_folded_into_another_name(tmp_path, field, value, character):
    """The Kelvin sign lower-cases to a plain "k": "\u212aelvin.example" silently became
    "kelvin.example", a different name from the one written."""
    fields = {field: value} if field == "common_name" else {field: [value]}
    where = "[0].common_name" if field == "common_name" else "[0].sans[0]"
    message = one_error(tmp_path, [entry(1, name="svc", **fields)], where, character, "ASCII")
    assert repr(value) in message or value in message


@pytest.mark.parametrize("field", ["cert_path", "key_path", "ca_path"])
@pytest.mark.parametrize("value", ["certs/", "certs/svc.d/", "certs/.", "certs/.."])
def test_a_path_that_names_a_folder_is_an_error_not_silently_trimmed(tmp_path, field, value):
    """ "certs/svc.d/" was resolved to the file certs/svc.d: the trailing slash, the
    operator's word that this is a folder, was dropped."""
    one_error(tmp_path, [entry(1, **{field: value})], f"[0].{field}", repr(value), "names a folder")


def test_a_bad_common_name_and_bad_sans_are_all_reported(tmp_path):
    issues = issues_of(tmp_path, [entry(1, common_name="bad_cn", sans=["ok.example.com", "x..y", "*.*.example.com"])])
    assert [i.path for i in issues] == ["[0].common_name", "[0].sans[1]", "[0].sans[2]"]


# --------------------------------------------------------------------------- clashes between entries


def test_two_entries_with_the_same_cert_path(tmp_path):
    issues = issues_of(tmp_path, {"certificates": [entry(1), entry(2, cert_path="certs/svc1.crt")]})
    msg = error_at(
        issues,
        "certificates[1].cert_path",
        "is also the cert_path of certificates[0]",
        "every file belongs to one certificate",
    )
    assert str(tmp_path / "certs" / "svc1.crt") in msg


def test_two_entries_with_the_same_key_path_even_when_spelled_differently(tmp_path):
    issues = issues_of(tmp_path, [entry(1), entry(2, key_path="./private/../private/svc1.key")])
    error_at(issues, "[1].key_path", "is also the key_path of [0]")


def test_one_entrys_key_is_anothers_certificate(tmp_path):
    issues = issues_of(tmp_path, [entry(1), entry(2, key_path="certs/svc1.crt")])
    error_at(issues, "[1].key_path", "is also the cert_path of [0]")


def test_cert_path_equal_to_key_path(tmp_path):
    one_error(tmp_path, [entry(1, key_path="certs/svc1.crt")], "[0].key_path", "same file as cert_path", "its own file")


def test_duplicate_names_default_to_the_common_name(tmp_path):
    issues = issues_of(tmp_path, [entry(1), entry(2, common_name="svc1.example.com")])
    error_at(issues, "[1].name", '"svc1.example.com" is already the name of [0]', 'unique "name"')


def test_ca_path_that_is_another_certificates_file(tmp_path):
    issues = issues_of(tmp_path, [entry(1), entry(2, include_ca=True, ca_path="private/svc1.key")])
    error_at(issues, "[1].ca_path", "key_path of [0]", "its own file")


def test_a_clash_is_reported_even_when_the_entry_has_another_error(tmp_path):
    issues = issues_of(tmp_path, [entry(1), entry(2, cert_path="certs/svc1.crt", owner=NO_SUCH_USER)])
    assert {i.path for i in issues} == {"[1].owner", "[1].cert_path"}


# --------------------------------------------------------------------------- every error at once


def test_every_error_is_reported_at_once_each_with_its_path(tmp_path):
    doc = {
        "defaults": {"renew_before": "12 hours"},
        "certificates": [
            entry(0, permisions="600"),
            entry(1, permissions="644"),
            entry(2, owner=NO_SUCH_USER, sans=["x..y"]),
            entry(3, key={"type": "EC", "size": 2048}, duration="1 day"),
            entry(4, cert_path="certs/svc0.crt"),
        ],
    }
    issues = issues_of(tmp_path, doc)
    assert {i.path for i in issues} == {
        "defaults.renew_before",
        "certificates[0].permisions",
        "certificates[1].permissions",
        "certificates[2].owner",
        "certificates[2].sans[0]",
        "certificates[3].key",
        "certificates[3].duration",
        "certificates[4].cert_path",
    }
    assert len(issues) == 8
    assert str(ManifestError(Path("m.json"), issues)).startswith("m.json: 8 error(s); first: ")


def test_an_error_in_defaults_is_reported_once_at_defaults(tmp_path):
    doc = {
        "defaults": {"permissions": "644", "owner": NO_SUCH_USER},
        "certificates": [entry(1), entry(2), entry(3, key_permissions="600", owner="0")],
    }
    issues = issues_of(tmp_path, doc)
    assert [i.path for i in issues] == ["defaults.permissions", "defaults.owner"]
    assert "readable by every user" in issues[0].message


def test_a_default_of_the_wrong_type_is_an_error_not_a_crash(tmp_path):
    doc = {"defaults": {"renew_before": 12, "key": {"type": "EC", "size": 2048}}, "certificates": [entry(1), entry(2)]}
    issues = issues_of(tmp_path, doc)
    assert [i.path for i in issues] == ["defaults.key", "defaults.renew_before"]


def test_a_schema_error_in_one_entry_does_not_hide_the_checks_of_the_others(tmp_path):
    issues = issues_of(tmp_path, [entry(1, cert_type="both"), entry(2, owner=NO_SUCH_USER)])
    assert {i.path for i in issues} == {"[0].cert_type", "[1].owner"}


def test_issue_prints_as_path_colon_message():
    assert str(Issue("certificates[2].permissions", "bad")) == "certificates[2].permissions: bad"
    assert str(Issue("", "bad")) == "bad"


def test_validation_cache_does_not_hide_semantic_errors(tmp_path):
    """A digest cached as schema-valid only skips jsonschema; the other checks still run."""
    state = tmp_path / "state"
    good = [entry(1, owner="0")]
    cache = ValidationCache(state)
    load(write(tmp_path, good), cache=cache)
    cache.save()
    assert list((state / "cache").glob("valid-entries-*.txt"))
    issues = issues_of(tmp_path, [entry(1, owner="0"), entry(2, cert_path="certs/svc1.crt")])
    error_at(issues, "[1].cert_path", "is also the cert_path of [0]")


def test_loading_without_a_state_dir_writes_nothing(tmp_path):
    path = write(tmp_path, [entry(1)])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load(path)
    load(path, cache=ValidationCache(tmp_path / "state"))  # only its save() writes
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert os.listdir(tmp_path) == ["certificate-manifest.json"]


def load_remembering(path: Path, state: Path):
    """One load as a pass does it: with the state folder's validation cache, saved after."""
    cache = ValidationCache(state, repair=True)
    desired = load(path, cache=cache)
    cache.save()
    return desired


def test_a_byte_identical_manifest_reuses_what_it_derived_and_gives_the_same_desired(tmp_path):
    state = tmp_path / "state"
    path = write(
        tmp_path,
        {
            "defaults": {"owner": "0"},
            "certificates": [
                entry(1, sans=["Alt.Example.", "[::FFFF:1]", "::0:1"], common_name=" Svc1.Example.com "),
                entry(2, ca_path="ca/root.crt", cert_path="./certs//svc2.crt"),
            ],
        },
    )
    first = load_remembering(path, state)
    assert list((state / "cache").glob("derived-*.json"))
    again = load_remembering(path, state)
    assert again == first
    assert [(c.fields, c.where, c.sans, c.common_name) for c in again.certificates] == [
        (c.fields, c.where, c.sans, c.common_name) for c in first.certificates
    ]
    assert first.certificates[0].common_name == "svc1.example.com"
    assert first.certificates[1].cert_path == str(tmp_path / "certs" / "svc2.crt")


def test_a_changed_manifest_is_not_given_what_the_old_one_derived(tmp_path):
    state = tmp_path / "state"
    load_remembering(write(tmp_path, [entry(1, sans=["a.example"])]), state)
    changed = load_remembering(write(tmp_path, [entry(1, sans=["b.example"])]), state)
    assert changed.certificates[0].sans == {"svc1.example.com", "b.example"}


def test_the_same_bytes_in_another_folder_resolve_against_that_folder(tmp_path):
    state = tmp_path / "state"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    load_remembering(write(tmp_path / "one", [entry(1)]), state)
    moved = load_remembering(write(tmp_path / "two", [entry(1)]), state)
    assert moved.certificates[0].cert_path == str(tmp_path / "two" / "certs" / "svc1.crt")


def test_a_byte_identical_manifest_still_finds_a_folder_that_became_a_link(tmp_path):
    """What depends on this host, not on the bytes, is checked on every load: a folder
    replaced by a link to another makes two entries write one file."""
    state = tmp_path / "state"
    (tmp_path / "certs").mkdir()
    (tmp_path / "other").mkdir()
    path = write(tmp_path, [entry(1), entry(2, cert_path="other/svc1.crt")])
    load_remembering(path, state)
    (tmp_path / "other").rmdir()
    (tmp_path / "other").symlink_to(tmp_path / "certs")
    with pytest.raises(ManifestError) as info:
        load_remembering(path, state)
    error_at(info.value.issues, "[1].cert_path", "through a linked folder")


@pytest.mark.parametrize(
    "damage",
    [
        b"{not json",
        b'{"version": %d, "manifest": "m", "digest": "x", "entries": []}' % DERIVED_VERSION,
        b'{"version": %d, "manifest": "m", "digest": "%s", "entries": [["a", "b", "c", "d", null]]}'
        % (DERIVED_VERSION, b"a" * 64),
    ],
)
def test_damaged_derived_values_are_set_aside_and_worked_out_again(tmp_path, damage, caplog):
    state = tmp_path / "state"
    path = write(tmp_path, [entry(1)])
    first = load_remembering(path, state)
    [derived] = (state / "cache").glob("derived-*.json")
    derived.write_bytes(damage)
    assert load_remembering(path, state) == first
    assert [p.name for p in (state / "cache").glob("derived-*.bad-*")], "the damaged file is kept aside for a look"
    assert "validation cache" in caplog.text and "damaged" in caplog.text
    assert load_remembering(path, state) == first


# --------------------------------------------------------------------------- editors and whole numbers


def test_an_object_manifest_may_name_its_schema_for_editors(tmp_path):
    desired = load_doc(tmp_path, {"$schema": "./certificate-manifest.schema.json", "certificates": [entry(1)]})
    assert [c.common_name for c in desired.certificates] == ["svc1.example.com"]


def test_schema_must_be_a_string(tmp_path):
    one_error(tmp_path, {"$schema": 5, "certificates": []}, "$schema", "expected a string", "a number")


def test_an_entry_cannot_carry_schema(tmp_path):
    # only the document names its schema; in an entry it is a typo like any unknown field
    one_error(tmp_path, [entry(1, **{"$schema": "x.json"})], "[0].$schema", "unknown field")


@pytest.mark.parametrize(
    "number, suggestion",
    [
        ("101.0", '101 (or the string "101")'),
        ("1e3", '1000 (or the string "1000")'),
        ("1.01e2", "101"),
        ("101.5", None),
        ("-0.0", '0 (or the string "0")'),
    ],
)
def test_a_guest_id_written_with_a_fraction_or_exponent_is_an_error(tmp_path, number, suggestion):
    text = f'[{{"common_name": "a.example", "cert_path": "a", "key_path": "b", "guest_id": {number}}}]'
    (issue,) = raw_issues(tmp_path, text.encode())
    assert issue.path == "[0].guest_id", str(issue)
    # quoted as written, not as Python reads it back (1e3, not 1000.0)
    assert issue.message.startswith(f"{number} is written with a fraction or exponent; write a whole number"), (
        issue.message
    )
    assert (suggestion in issue.message) if suggestion else "e.g." not in issue.message, issue.message


def test_a_guest_id_string_must_be_digits(tmp_path):
    one_error(tmp_path, [entry(1, guest_id="vm-101")], "[0].guest_id", '"vm-101" is not valid', "(101)", '("101")')


def test_key_size_written_as_a_float_is_an_error(tmp_path):
    text = '[{"common_name": "a.example", "cert_path": "a", "key_path": "b", "key": {"type": "RSA", "size": 2048.0}}]'
    (issue,) = raw_issues(tmp_path, text.encode())
    assert issue.path == "[0].key.size" and "2048.0" in issue.message, str(issue)


def _properties(node, where=""):
    """Every named property of the schema, outside the if/then branches (which only forbid)."""
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{where}.{name}", sub
        for key, sub in node.items():
            if key not in ("allOf", "properties"):
                yield from _properties(sub, f"{where}/{key}")
        for name, sub in node.get("properties", {}).items():
            yield from _properties(sub, f"{where}.{name}")


def test_the_schema_is_valid_draft_2020_12_and_every_property_explains_itself_on_hover():
    from jsonschema import Draft202012Validator

    from reconciler.manifest_schema import schema_bytes

    schema = json.loads(schema_bytes())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    described = list(_properties(schema))
    assert len(described) > 30
    for where, sub in described:
        text = sub.get("description", "")
        assert len(text) > 40 and "Example" in text, f"{where}: {text!r}"
        assert "Required." in text or "Default" in text or where.endswith("$schema"), f"{where}: {text!r}"


def test_reconcile_schema_prints_the_schema_it_validates_with(tmp_path):
    from helpers import REPO, reconcile

    proc = reconcile("schema", check=0, cwd=tmp_path)
    assert proc.stdout.encode() == (REPO / "reconciler" / "schema" / "certificate-manifest.schema.json").read_bytes()
    assert "reconcile schema" in reconcile("--help", check=0).stdout


# --------------------------------------------------------------------------- the schema gate

# for each field, values the schema takes and values it refuses, the edge cases of both
# implementations among them (a float where an integer belongs, "$" before a newline, NUL)
CANDIDATES: dict[str, list] = {
    "common_name": ["a.example", "", 7, "é" * 253, "é" * 254],
    "sans": [["b.example", "10.0.0.1"], [], [""], ["x" * 254], "b.example", [7]],
    "cert_path": ["a.crt", "", "x\0y", "/abs/a.crt", 1],
    "ca_path": ["ca.crt", "", None],
    "owner": ["root:root", "0", "a b", "www-data$", "", 0],
    "permissions": ["644", "0600", "9999", "777", 644],
    "key_permissions": ["600", "0640", "8", "6000"],
    "renew_before": ["12h", "33%", "12.5%", "24h\n", "12", "1h30m", 12],
    "duration": ["24h", "1h30m", "24H", "\u0663h", "24h\n", ""],
    "hook_timeout": ["5m", "5", None],
    "key": [
        {"type": "EC"},
        {"type": "EC", "curve": "P-384"},
        {"type": "RSA", "size": 3072},
        {"type": "RSA", "size": 2048.0},
        {"type": "RSA", "size": 1e3},
        {"type": "RSA", "curve": "P-256"},
        {"type": "EC", "size": 2048},
        {"type": "Ed25519", "rotation": "never"},
        {"type": "Ed25519", "curve": "P-256"},
        {"type": "DSA"},
        {},
        "EC",
    ],
    "include_ca": [True, False, 1, "true"],
    "cert_type": ["server", "client", "both"],
    "guest_id": [101, "101", 101.0, -0.0, 2**64, -1, True, "1e3", "10a"],
    "guest_type": ["lxc", 3],
    "name": ["svc", "", "n" * 254],
    "post_renewal_command": ["systemctl reload nginx", "", "a\0b"],
    "allow_symlink": [True, "yes"],
    "allow_world_readable_key": [False, 0],
    "comon_name": ["typo"],
}


def test_the_fast_schema_gate_passes_nothing_the_python_jsonschema_refuses():
    """The gate (jsonschema-rs) only skips work: every entry it passes, the Python
    jsonschema passes too, so the errors an operator sees never depend on which ran."""
    from hypothesis import given, settings, strategies as st

    from reconciler.manifest_schema import _explainer, schema_issues

    # a valid entry with a few fields set, each to a value the schema takes or refuses
    fields = st.sampled_from(sorted(CANDIDATES)).flatmap(
        lambda f: st.tuples(st.just(f), st.sampled_from(CANDIDATES[f]))
    )
    entries = st.lists(fields, max_size=4).map(
        lambda changes: {"common_name": "a.example", "cert_path": "a.crt", "key_path": "a.key", **dict(changes)}
    )

    @settings(max_examples=600, deadline=None, database=None)
    @given(entries)
    def gate_agrees(e):
        refused_by_python = any(True for _ in _explainer("entry").iter_errors(e))
        assert bool(schema_issues("entry", e, "")) == refused_by_python, e

    gate_agrees()


@pytest.mark.parametrize(
    "text", ["/srv/tls/a.crt", "/a.crt", "a.crt", "tls/a.crt", "/srv/../tls/a", "/srv//a", "tls/./a.crt", "a b/ c"]
)
def test_a_path_is_kept_as_the_text_its_path_prints(tmp_path, text):
    # model.DesiredCert keeps paths as text: absolute and normalised, as a Path of them prints
    (c,) = load(write(tmp_path, [entry(1, cert_path=text)])).certificates
    assert c.cert_path == str(Path(os.path.normpath(tmp_path / text)))
