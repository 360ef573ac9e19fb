"""Hostile manifests: a hand-written corpus plus hypothesis-generated ones.

`validate`, `--plan` and a pass must each end with exit 1 and a clear message (an `error:`
line naming the manifest, short enough to read), never a traceback, and change nothing on
disk: the certificate folder, the state folder and the manifest are byte-for-byte and
inode-for-inode the same afterwards (a pass only takes its lock: `state/lock`, empty).

The corpus runs through real subprocesses. The generated manifests run through
`reconciler.cli.main` in-process (same code, no interpreter start-up), where any exception
escaping `main` counts as a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import figure, reconcile

MAX_MESSAGE = 20_000  # a message that quotes a 10 MB value back is not "clear"
COMMANDS = (("validate",), ("--plan",), ())


def tree(*roots: Path) -> dict:
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
            continue
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath) / name
                if p.name == "lock" and p.parent.name == "state":
                    continue  # the pass lock: an empty file, the one thing a refused pass creates
                st_ = os.lstat(p)
                out[str(p)] = (
                    st_.st_ino,
                    st_.st_mode,
                    st_.st_size,
                    st_.st_mtime_ns,
                    p.read_bytes() if p.is_file() else None,
                )
    return out


@pytest.fixture
def world(tmp_path):
    """A converged certificate beside the manifest: a hostile manifest must not touch it."""
    out, state = tmp_path / "out", tmp_path / "state"
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            [{"common_name": "keep.test", "cert_path": str(out / "keep.crt"), "key_path": str(out / "keep.key")}]
        )
    )
    reconcile("-m", str(good), state_dir=state, check=0)
    return tmp_path, out, state


def check_refused(proc_rc: int, stdout: str, stderr: str, what: str) -> None:
    assert proc_rc == 1, f"{what}: exit {proc_rc}\nstdout: {stdout[:2000]}\nstderr: {stderr[:2000]}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, f"{what}: {stderr[-3000:]}"
    assert stderr.startswith("error: "), f"{what}: {stderr[:500]}"
    assert len(stderr) < MAX_MESSAGE, f"{what}: a {len(stderr)}-character message"


# --------------------------------------------------------------------------- the corpus


def deep(n: int) -> str:
    return "[" * n + "]" * n


BIG = "a" * (10 * 1024 * 1024)


def corpus(out: Path) -> dict[str, bytes | str]:
    ok = {"common_name": "x.test", "cert_path": str(out / "x.crt"), "key_path": str(out / "x.key")}

    def with_(**changes) -> bytes:
        return json.dumps([{**ok, **changes}]).encode()

    items: dict[str, bytes | str] = {
        "non-UTF-8 bytes": b'[{"common_name": "\xff\xfe.test", "cert_path": "a", "key_path": "b"}]',
        "Latin-1 file": '[{"common_name": "café.test", "cert_path": "a", "key_path": "b"}]'.encode("latin-1"),
        "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps([ok]).encode(),
        "UTF-16 file": json.dumps([ok]).encode("utf-16"),
        "duplicate keys": b'[{"common_name": "a.test", "common_name": "b.test", "cert_path": "a", "key_path": "b"}]',
        "duplicate top-level keys": b'{"certificates": [], "certificates": []}',
        "NUL in a path (escaped)": with_(cert_path=str(out / "a\u0000.crt")),
        "NUL in a key path (escaped)": with_(key_path="\u0000"),
        "NUL in the common name": with_(common_name="a\u0000.test"),
        "NUL in a SAN": with_(sans=["b\u0000.test"]),
        "NUL in the hook": with_(post_renewal_command="echo \u0000"),
        "NUL in the owner": with_(owner="root\u0000"),
        "raw NUL byte": b"[\x00]",
        "10 MB common name": with_(common_name=BIG),
        "10 MB SAN": with_(sans=[BIG]),
        "10 MB cert path": with_(cert_path=str(out / BIG)),
        "10 MB folder path": with_(cert_path="/".join(["a" * 250] * 40000)[: 10 * 1024 * 1024] + "/x.crt"),
        "10 MB key of an object": ("[{" + json.dumps(BIG) + ": 1}]").encode(),
        "10 MB name": with_(name=BIG),
        "10 MB duration": with_(duration="1" * (10 * 1024 * 1024) + "h"),
        "10 MB hook": with_(post_renewal_command="x", owner="a" * (10 * 1024 * 1024)),
        "10,000-deep arrays": deep(10_000).encode(),
        "10,000-deep objects": ('{"a":' * 10_000 + "1" + "}" * 10_000).encode(),
        "900-deep value in an entry": with_(sans=json.loads(deep(900))),
        "10,000-deep value in an entry": (
            '[{"common_name": "x.test", "cert_path": "a", "key_path": "b", "sans": ' + deep(10_000) + "}]"
        ).encode(),
        "huge integer": ("[" + "9" * 5000 + "]").encode(),
        "huge integer as RSA size": (
            '[{"common_name":"x.test","cert_path":"a","key_path":"b","key":{"type":"RSA","size":' + "9" * 4000 + "}}]"
        ).encode(),
        "1e999 as a duration": b'[{"common_name":"x.test","cert_path":"a","key_path":"b","duration":1e999}]',
        "-1e999 as a guest id": b'[{"common_name":"x.test","cert_path":"a","key_path":"b","guest_id":-1e999}]',
        "huge guest id": (
            '[{"common_name":"x.test","cert_path":"a","key_path":"b","guest_id":' + "9" * 4000 + "}]"
        ).encode(),
        "huge duration": with_(duration="99999999999999999999999999999999w"),
        "huge renew_before": with_(renew_before="99999999999999999999999999999999s"),
        "huge hook timeout": with_(hook_timeout="9999999999999999999999d"),
        "huge percentage": with_(renew_before="99999999999999999999999999999999999%"),
        "huge permissions": with_(key_permissions="77777777777777777777"),
        "huge numeric owner": with_(owner="99999999999999999999999:99999999999999999999"),
        "NaN": b'[{"common_name":"x.test","cert_path":"a","key_path":"b","guest_id":NaN}]',
        "Infinity": b"[Infinity]",
        "empty file": b"",
        "whitespace only": b" \n\t\n",
        "truncated JSON": json.dumps([ok]).encode()[:-7],
        "a JSON number": b"42",
        "a JSON string": b'"certificates"',
        "null": b"null",
        "true": b"true",
        "an entry that is a string": b'["x.test"]',
        "an entry that is null": b"[null]",
        "an entry that is an array": b"[[1, 2]]",
        "certificates is an object": b'{"certificates": {"a": 1}}',
        "certificates is null": b'{"certificates": null}',
        "defaults is a list": b'{"certificates": [], "defaults": []}',
        "issuer is a string": b'{"certificates": [], "issuer": "step-ca"}',
        "issuer of unknown type": b'{"certificates": [], "issuer": {"type": "letsencrypt"}}',
        "issuer type is a number": b'{"certificates": [], "issuer": {"type": 1}}',
        "issuer url is not https": (
            b'{"certificates": [], "issuer": {"type": "step-ca", "url": "ftp://ca", "fingerprint": "00"}}'
        ),
        "sans is a string": with_(sans="a.test"),
        "sans holds a number": with_(sans=[1]),
        "sans holds an object": with_(sans=[{}]),
        "common name is a number": with_(common_name=1),
        "common name is a list": with_(common_name=["a"]),
        "common name is empty": with_(common_name=""),
        "common name is not a name": with_(common_name="not a host name!"),
        "wildcard in the middle": with_(sans=["a.*.test"]),
        "bad IP": with_(sans=["999.1.1.1"]),
        "cert path is a number": with_(cert_path=5),
        "cert path is empty": with_(cert_path=""),
        "cert and key the same file": with_(key_path=ok["cert_path"]),
        "key is a string": with_(key="EC"),
        "key type unknown": with_(key={"type": "DSA"}),
        "key size for EC": with_(key={"type": "EC", "size": 2048}),
        "permissions is a number": with_(permissions=600),
        "permissions not octal": with_(key_permissions="999"),
        "world-readable key": with_(key_permissions="644"),
        "owner is a list": with_(owner=["root"]),
        "owner does not exist": with_(owner="no-such-user-here"),
        "duration is a list": with_(duration=["1h"]),
        "duration unparsable": with_(duration="1 hour"),
        "renew_before longer than lifetime": with_(duration="1h", renew_before="2h"),
        "include_ca is a string": with_(include_ca="yes"),
        "hook is a list": with_(post_renewal_command=["systemctl", "reload"]),
        "hook is empty": with_(post_renewal_command=""),
        "unknown field": with_(permisions="600"),
        "two entries one name": json.dumps([ok, {**ok, "cert_path": "c", "key_path": "d"}]).encode(),
        "two entries one key path": json.dumps([ok, {**ok, "name": "y", "cert_path": "c"}]).encode(),
        "a directory instead of a file": "DIRECTORY",
        "a FIFO instead of a file": "FIFO",
        "a missing file": "MISSING",
        "a symlink loop": "LOOP",
    }
    return items


def place(tmp: Path, name: str, content: bytes | str) -> Path:
    m = tmp / "hostile.json"
    if m.is_dir():
        os.rmdir(m)
    elif m.exists() or m.is_symlink():
        m.unlink()
    if content == "DIRECTORY":
        m.mkdir()
    elif content == "FIFO":
        os.mkfifo(m)
    elif content == "LOOP":
        os.symlink(m, m)
    elif content != "MISSING":
        m.write_bytes(content)
    return m


def run_corpus(tmp: Path, out: Path, state: Path, names, runner) -> int:
    before = tree(out, state)
    items = corpus(out)
    runs = 0
    for name in names:
        m = place(tmp, name, items[name])
        manifest_before = tree(m) if m.is_file() and not m.is_symlink() else None
        for cmd in (["validate", "-m", str(m)], ["-m", str(m), "--plan"], ["-m", str(m)]):
            rc, so, se = runner(cmd, state)
            check_refused(rc, so, se, f"{name} / {cmd[0] if cmd[0] == 'validate' else ' '.join(cmd[2:]) or 'pass'}")
            runs += 1
        assert tree(out, state) == before, f"{name}: something on disk changed"
        if manifest_before is not None:
            assert tree(m) == manifest_before
    return runs


def in_process(cmd: list[str], state: Path) -> tuple[int, str, str]:
    return run_main(cmd + ["--state-dir", str(state)])


def subprocess_run(cmd: list[str], state: Path) -> tuple[int, str, str]:
    proc = reconcile(*cmd, state_dir=state, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_hand_written_corpus_is_refused_cleanly_by_every_command(world):
    tmp, out, state = world
    names = list(corpus(out))
    runs = run_corpus(tmp, out, state, names, in_process)
    figure(f"hostile corpus: {len(names)} manifests x 3 commands = {runs} runs (in-process)")


SUBPROCESS_SAMPLE = [
    "non-UTF-8 bytes",
    "UTF-8 BOM",
    "duplicate keys",
    "NUL in a path (escaped)",
    "raw NUL byte",
    "10 MB common name",
    "10 MB cert path",
    "10,000-deep arrays",
    "10,000-deep value in an entry",
    "huge integer",
    "1e999 as a duration",
    "huge duration",
    "empty file",
    "a directory instead of a file",
    "a FIFO instead of a file",
    "10 MB hook",
]


def test_a_sample_of_the_corpus_through_real_processes(world):
    """The same, as separate processes: what an operator runs (tracebacks print for real here)."""
    tmp, out, state = world
    names = [n for n in SUBPROCESS_SAMPLE if n in corpus(out)]
    runs = run_corpus(tmp, out, state, names, subprocess_run)
    figure(f"hostile corpus through subprocesses: {len(names)} manifests x 3 commands = {runs} runs")


def test_messages_name_the_problem(world):
    """Spot checks that the refusals say what is wrong, where."""
    tmp, out, state = world
    expect = {
        "non-UTF-8 bytes": "is not UTF-8: invalid byte 0xff at line 1",
        "UTF-8 BOM": "byte-order mark",
        "duplicate keys": "key 'common_name' appears twice",
        "NUL in a path (escaped)": "[0].cert_path",
        "10,000-deep arrays": "nested too deeply",
        "huge integer": "Python's JSON reader refuses",
        "empty file": "is empty",
        "a directory instead of a file": "is a directory",
        "a FIFO instead of a file": "is not a regular file",
        "10 MB cert path": "[0].cert_path",
        "10 MB common name": "[0].common_name",
        "huge duration": "[0].duration",
    }
    items = corpus(out)
    for name, words in expect.items():
        m = place(tmp, name, items[name])
        proc = reconcile("validate", "-m", str(m), state_dir=state, timeout=60)
        assert words in proc.stderr, f"{name}: {proc.stderr[:1000]}"


# --------------------------------------------------------------------------- generated manifests


def run_main(argv: list[str]) -> tuple[int, str, str]:
    from reconciler.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # what would have been a traceback
            import traceback

            return 99, out.getvalue(), "Traceback (in-process)\n" + "".join(traceback.format_exception(exc))
    return rc, out.getvalue(), err.getvalue()


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)

FIELD_TYPES = {
    "name": "string",
    "common_name": "string",
    "sans": "array",
    "cert_path": "string",
    "key_path": "string",
    "ca_path": "string",
    "owner": "string",
    "permissions": "string",
    "cert_permissions": "string",
    "key_permissions": "string",
    "allow_world_readable_key": "boolean",
    "allow_symlink": "boolean",
    "renew_before": "string",
    "duration": "string",
    "key": "object",
    "post_renewal_command": "string",
    "hook_timeout": "string",
    "include_ca": "boolean",
    "cert_type": "string",
    "guest_id": "string|integer",
    "guest_type": "string",
}


def json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


BAD_CHARS = st.sampled_from([" ", "!", "/", "\\", "@", ",", "\u0000", "\n", "é", "\ufeff"])


@st.composite
def invalid_entry(draw, out: Path):
    """A valid entry with at least one change that makes it invalid, plus random noise."""
    i = draw(st.integers(0, 10_000))
    e = {"common_name": f"e{i}.test", "cert_path": str(out / f"e{i}.crt"), "key_path": str(out / f"e{i}.key")}
    # noise that keeps it valid
    if draw(st.booleans()):
        e["sans"] = draw(st.lists(st.sampled_from(["a.test", "*.b.test", "10.0.0.1", "::1", "C.TEST"]), max_size=3))
    if draw(st.booleans()):
        e["key"] = draw(st.sampled_from([{"type": "EC"}, {"type": "RSA", "size": 2048}, {"type": "Ed25519"}]))
    how = draw(
        st.sampled_from(
            [
                "wrong type",
                "unknown field",
                "missing field",
                "not an object",
                "bad SAN",
                "bad duration",
                "bad mode",
                "bad owner",
                "bad enum",
                "NUL path",
            ]
        )
    )
    if how == "wrong type":
        field = draw(st.sampled_from(sorted(FIELD_TYPES)))
        allowed = FIELD_TYPES[field].split("|")
        e[field] = draw(
            json_values.filter(
                lambda v: json_type(v) not in allowed and not (json_type(v) == "integer" and "number" in allowed)
            )
        )
    elif how == "unknown field":
        e[draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELD_TYPES))] = draw(json_values)
    elif how == "missing field":
        del e[draw(st.sampled_from(["common_name", "cert_path", "key_path"]))]
    elif how == "not an object":
        return draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif how == "bad SAN":
        e["sans"] = [draw(st.text(max_size=20)) + draw(BAD_CHARS) + draw(st.text(max_size=20))]
    elif how == "bad duration":
        field = draw(st.sampled_from(["duration", "renew_before", "hook_timeout"]))
        e[field] = draw(st.text(max_size=10)) + draw(st.sampled_from(["x", " ", "-1h", "h1", "1.5h", "%%"]))
    elif how == "bad mode":
        e[draw(st.sampled_from(["permissions", "cert_permissions", "key_permissions"]))] = draw(
            st.sampled_from(["8", "999", "-600", "0x1ff", "rw-r--r--", "60O", "777", "666"])
        )
    elif how == "bad owner":
        e["owner"] = draw(st.sampled_from(["no-such-user-xyz", "root:no-such-group-xyz", ":", "a b", "root::root", ""]))
    elif how == "bad enum":
        field, value = draw(
            st.sampled_from(
                [
                    ("cert_type", "peer"),
                    ("key", {"type": "DSA"}),
                    ("key", {"type": "EC", "curve": "P-521"}),
                    ("key", {"type": "RSA", "size": 1024}),
                    ("key", {"type": "EC", "rotation": "sometimes"}),
                    ("key", {}),
                ]
            )
        )
        e[field] = value
    else:
        e[draw(st.sampled_from(["cert_path", "key_path", "ca_path"]))] = (
            str(out / "a") + "\u0000" + draw(st.text(max_size=5))
        )
    return e


@st.composite
def invalid_document(draw, out: Path):
    bad = draw(invalid_entry(out))
    others = [
        {"common_name": f"ok{j}.test", "cert_path": str(out / f"ok{j}.crt"), "key_path": str(out / f"ok{j}.key")}
        for j in range(draw(st.integers(0, 3)))
    ]
    entries = others[:]
    entries.insert(draw(st.integers(0, len(others))), bad)
    shape = draw(st.sampled_from(["bare", "object", "object with junk", "object with bad defaults"]))
    if shape == "bare":
        return entries
    doc = {"certificates": entries}
    if shape == "object with junk":
        doc[
            draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in ("certificates", "defaults", "issuer")))
        ] = draw(json_values)
    elif shape == "object with bad defaults":
        doc["certificates"] = others or [
            {"common_name": "d.test", "cert_path": str(out / "d.crt"), "key_path": str(out / "d.key")}
        ]
        field = draw(st.sampled_from(sorted(set(FIELD_TYPES) - {"common_name", "cert_path", "key_path", "name"})))
        allowed = FIELD_TYPES[field].split("|")
        doc["defaults"] = {field: draw(json_values.filter(lambda v: json_type(v) not in allowed))}
    return doc


def test_generated_manifests_are_refused_cleanly_and_change_nothing(world):
    tmp, out, state = world
    m = tmp / "generated.json"
    before = tree(out, state)
    counts = {"documents": 0, "bytes": 0, "json": 0}

    def check(raw: bytes, kind: str) -> None:
        counts[kind] += 1
        m.write_bytes(raw)
        for cmd in (["validate", "-m", str(m)], ["-m", str(m), "--plan"], ["-m", str(m)]):
            rc, so, se = run_main(cmd + ["--state-dir", str(state)])
            check_refused(rc, so, se, f"{kind} {raw[:300]!r} / {cmd[0]}")

    common = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)

    @common
    @given(invalid_document(out))
    def documents(doc):
        check(json.dumps(doc).encode(), "documents")

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(max_size=200))
    def raw_bytes(raw):
        try:
            doc = json.loads(raw)
            if isinstance(doc, (list, dict)):
                return  # JSON that may well be a valid manifest: the structured strategies cover these
        except ValueError:
            pass
        check(raw, "bytes")

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        json_values.filter(
            lambda v: not isinstance(v, list) and not (isinstance(v, dict) and "certificates" in v and len(v) == 1)
        )
    )
    def any_json(doc):
        # a JSON value that is not a list: a scalar, or an object without a valid "certificates"
        if (
            isinstance(doc, dict)
            and isinstance(doc.get("certificates"), list)
            and not (set(doc) - {"certificates", "defaults", "issuer"})
        ):
            return
        check(json.dumps(doc).encode(), "json")

    documents()
    raw_bytes()
    any_json()
    assert tree(out, state) == before, "a refused manifest changed something on disk"
    figure(f"generated manifests: {json.dumps(counts)} (x3 commands each)")
    assert counts["documents"] >= 100 and counts["bytes"] >= 50 and counts["json"] >= 50


def test_a_path_too_long_to_exist_is_refused_without_resolving_it_on_disk(world, monkeypatch):
    """A 10 MB path of 40,000 folder names cannot exist (PATH_MAX), so nothing may walk it:
    resolving it name by name lstat-ed a longer path each time, and refusing that one manifest
    took 40-60 s of CPU."""
    tmp, out, state = world
    m = place(tmp, "10 MB folder path", corpus(out)["10 MB folder path"])
    walked = []
    real_realpath = os.path.realpath

    def realpath(p, *a, **k):
        if len(os.fsencode(p)) >= 4096:
            walked.append(len(p))
        return real_realpath(p, *a, **k)

    monkeypatch.setattr(os.path, "realpath", realpath)
    for cmd in (["validate", "-m", str(m)], ["-m", str(m), "--plan"]):
        rc, so, se = in_process(cmd, state)
        check_refused(rc, so, se, "10 MB folder path")
        assert "PATH_MAX" in so + se
    assert walked == [], f"resolved paths of {walked} bytes on disk"
