"""The observation cache on a real host: a pass rebuilds one that is missing or stale even
when it changes nothing else, the steady state writes nothing, `--plan` never writes, and a
row saved by a pass reads back as the same facts (docs/design.md, "Caches")."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import reconcile, tree_snapshot, write_manifest
from reconciler.managed import XATTR, identity
from reconciler.manifest import build
from reconciler.observation_cache import CACHE_VERSION, ObservationCache
from reconciler.observe import observe_all
from reconciler.parse import Trust
from reconciler.issuers.local import LocalCA
from reconciler.plan import make_plan


@pytest.fixture
def host(tmp_path):
    """Three converged certificates (one with a ca_path) and their state folder."""
    entries = [
        {"name": f"c{i}", "common_name": f"c{i}.example.com", "cert_path": f"tls/c{i}.crt", "key_path": f"tls/c{i}.key"}
        for i in range(3)
    ]
    entries[0]["ca_path"] = "tls/ca.crt"
    manifest = write_manifest(tmp_path / "certificate-manifest.json", entries)
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)
    return manifest, state


def cache_file(state: Path) -> Path:
    return state / "cache" / "observed.json"


def test_a_pass_rebuilds_a_missing_cache_though_nothing_else_changes(host):
    manifest, state = host
    cache_file(state).unlink()
    before = tree_snapshot(manifest.parent / "tls")
    out = reconcile("-m", str(manifest), state_dir=state, check=0)
    assert "No changes" in out.stdout
    assert tree_snapshot(manifest.parent / "tls") == before
    rows = json.loads(cache_file(state).read_bytes())["entries"]
    assert len([k for k in rows if not k.startswith("ca\0")]) == 3 and any(k.startswith("ca\0") for k in rows)


def test_a_pass_rewrites_a_stale_cache_though_nothing_else_changes(host):
    manifest, state = host
    doc = json.loads(cache_file(state).read_bytes())
    doc["version"] = CACHE_VERSION - 1  # an older format: every row is stale
    cache_file(state).write_text(json.dumps(doc))
    reconcile("-m", str(manifest), state_dir=state, check=0)
    again = json.loads(cache_file(state).read_bytes())
    assert again["version"] == CACHE_VERSION and len(again["entries"]) == len(doc["entries"])


def test_the_steady_state_writes_nothing_and_plan_never_writes(host):
    manifest, state = host
    reconcile("-m", str(manifest), state_dir=state, check=0)
    settled = tree_snapshot(state)
    reconcile("-m", str(manifest), state_dir=state, check=0)
    assert tree_snapshot(state) == settled
    cache_file(state).unlink()
    gone = tree_snapshot(state)
    reconcile("-m", str(manifest), "--plan", state_dir=state, check=0)
    assert tree_snapshot(state) == gone  # --plan reads around a missing cache, saves nothing


def test_a_saved_row_reads_back_as_the_facts_observed(host):
    """What a pass keeps as values until it saves must be what a later run reads."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    trust = Trust.of(LocalCA(state / "ca").trust_pems(), authoritative=True)
    fresh = ObservationCache(None)
    observed = observe_all(desired.certificates, trust, fresh)
    # kept as values until a pass saves: --plan never pays for turning them into rows
    assert fresh.dirty and len(fresh.fresh) == 3 and all(k.startswith("ca\0") for k in fresh.entries)
    cached = ObservationCache(state)
    assert not cached.dirty
    hits = observe_all(desired.certificates, trust, cached)
    assert not cached.dirty  # every row was a hit
    assert hits == observed
    now = datetime.now(timezone.utc)
    assert make_plan(desired, hits, now) == make_plan(desired, observed, now)


def test_a_read_only_run_keeps_nothing_it_observed(host):
    """--plan and status never save: they read the rows, and what they observe beyond them is
    not kept (values and keys of 50,000 certificates are a sixth of a --plan's memory)."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    trust = Trust.of(LocalCA(state / "ca").trust_pems(), authoritative=True)
    cache = ObservationCache(None, keep=False)
    observed = observe_all(desired.certificates, trust, cache)
    assert not cache.fresh and not cache.used
    assert observed == observe_all(desired.certificates, trust, ObservationCache(None))


def test_a_cache_kept_across_passes_answers_from_what_it_observed_until_a_file_changes(host):
    """--watch keeps one cache: a second observation of unchanged files is a hit from the
    values kept, and a changed file is read again."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    trust = Trust.of(LocalCA(state / "ca").trust_pems(), authoritative=True)
    cache = ObservationCache(None)
    first = observe_all(desired.certificates, trust, cache)
    assert observe_all(desired.certificates, trust, cache) == first
    c0 = desired.certificates[0]
    Path(c0.key_path).write_bytes(b"not a key")
    os.utime(c0.key_path, ns=(1, 1))
    again = observe_all(desired.certificates, trust, cache)
    assert again["c0"].key_public_id is None and "not a PEM private key" in again["c0"].key_error
    assert again["c1"] == first["c1"]


def test_rows_of_certificates_gone_from_the_manifest_are_dropped_once(host):
    """A renamed or removed entry's row is never read again: kept, it would be read (and
    checked) by every later run forever. Dropping it is one write; then nothing is."""
    manifest, state = host
    entries = json.loads(manifest.read_bytes())
    write_manifest(manifest, entries[1:])  # c0 (with the ca_path) is no longer managed
    reconcile("-m", str(manifest), state_dir=state, check=0)
    rows = json.loads(cache_file(state).read_bytes())["entries"]
    assert sorted(k.split("\0")[0].rsplit("/", 1)[-1] for k in rows) == ["c1.crt", "c2.crt"]
    settled = tree_snapshot(state)
    reconcile("-m", str(manifest), state_dir=state, check=0)
    assert tree_snapshot(state) == settled


def test_a_hit_takes_the_files_marks_from_its_row_and_a_new_mark_is_seen(host, tmp_path, monkeypatch):
    """The state folder marked on each file (managed.py) is kept in the row when it is the
    file's extended attribute: a hit reads no attribute, and setting one changes the file's
    ctime, so a file another state folder marks since is observed again and refused."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    trust = Trust.of(LocalCA(state / "ca").trust_pems(), authoritative=True)
    ours = identity(state)
    reads = []
    real_getxattr = os.getxattr
    monkeypatch.setattr(os, "getxattr", lambda *a, **k: reads.append(a[0]) or real_getxattr(*a, **k))
    hits = observe_all(desired.certificates, trust, ObservationCache(state), manager=ours)
    assert reads == [] and all(o.folder_problem is None for o in hits.values())
    other = tmp_path / "other-state"
    other.mkdir()
    c1 = desired.certificates[1]
    os.setxattr(c1.cert_path, XATTR, str(other).encode())
    again = observe_all(desired.certificates, trust, ObservationCache(state), manager=ours)
    assert f"is managed by the reconciler with state folder {other}" in again["c1"].folder_problem
    assert again["c0"] == hits["c0"] and again["c2"] == hits["c2"]
    assert reads == [c1.cert_path, c1.key_path]  # only the changed files' marks were read


def test_a_converged_plan_parses_nothing_and_never_loads_cryptography(tmp_path):
    """The observation cache answers for every certificate and the issuer's anchors are known
    by their PEM's fingerprints (parse.Trust): a converged --plan imports no cryptography
    (~50 ms of a warm 10,000-entry plan). A changed certificate is parsed, and loads it."""
    entries = [
        {"name": f"c{i}", "common_name": f"c{i}.example.com", "cert_path": f"tls/c{i}.crt", "key_path": f"tls/c{i}.key"}
        for i in range(2)
    ]
    manifest = write_manifest(tmp_path / "certificate-manifest.json", entries)
    state = tmp_path / "state"
    reconcile("-m", str(manifest), state_dir=state, check=0)

    def plan() -> tuple[str, bool]:
        """(the plan's last line, whether cryptography was imported): Python lists every
        module it imports on stderr under PYTHONPROFILEIMPORTTIME."""
        out = reconcile(
            "-m", str(manifest), "--plan", "--detailed-exitcode", state_dir=state, env={"PYTHONPROFILEIMPORTTIME": "1"}
        )
        assert out.returncode == 0, out.stderr
        imported = {
            line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
        }
        assert "reconciler.cli" in imported  # the listing is there
        return out.stdout.splitlines()[-1], "cryptography" in imported

    last, loaded = plan()
    assert "No changes" in last and not loaded
    cert = tmp_path / "tls" / "c0.crt"
    cert.write_bytes(cert.read_bytes() + b"\n")  # same certificate, new stamp: read and checked again
    last, loaded = plan()
    assert "No changes" in last and loaded


def _junk_character(pem: bytes) -> bytes:
    lines = pem.split(b"\n")
    lines[2] = lines[2][:10] + b"!" + lines[2][10:]  # a stray character a decoder might skip
    return b"\n".join(lines)


def _blank_line(pem: bytes) -> bytes:
    lines = pem.split(b"\n")
    lines[2] += b"\n"
    return b"\n".join(lines)


@pytest.mark.parametrize("damage", [_junk_character, _blank_line], ids=["junk-character", "blank-line"])
def test_a_ca_file_damaged_around_an_intact_certificate_is_no_anchor_cached_or_not(host, damage):
    """The cache key's trust digest must change with what is trusted: a CA file that does
    not parse is no anchor, even when the base64 in its armour still decodes to the root's
    DER (a stray character or a blank line in it). A cache filled before the damage must
    not answer as if the root were still trusted."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    ca = LocalCA(state / "ca")
    cache = ObservationCache(None)
    assert all(
        o.chains_to_issuer for o in observe_all(desired.certificates, Trust.of(ca.trust_pems(), True), cache).values()
    )
    root = state / "ca" / "root_ca.crt"
    root.write_bytes(damage(root.read_bytes()))
    damaged = Trust.of(ca.trust_pems(), authoritative=True)
    assert damaged.anchors == ()
    cold = observe_all(desired.certificates, damaged, ObservationCache(None))
    assert not any(o.chains_to_issuer for o in cold.values())
    assert observe_all(desired.certificates, damaged, cache) == cold


def test_rows_observed_when_the_issuer_could_not_be_checked_do_not_answer_for_an_embedded_ca_not_made_yet(host):
    """No anchors means "cannot tell" for a step-ca whose root is not known (chains_to_issuer
    None: the CA was down when the manifest still named it) but "nothing chains to it" for an
    embedded CA not created yet (False: every certificate is issued from it). Both have no
    fingerprints: the cache key must still tell them apart, or switching such a manifest to
    the embedded CA, its old folder moved away, plans nothing (reproduced with real passes)."""
    manifest, state = host
    desired = build(json.loads(manifest.read_bytes()), manifest)
    cache = ObservationCache(None)
    unknown = observe_all(desired.certificates, Trust.of([], authoritative=False), cache)
    assert {o.chains_to_issuer for o in unknown.values()} == {None}
    not_yet = Trust.of([], authoritative=True)
    cold = observe_all(desired.certificates, not_yet, ObservationCache(None))
    assert {o.chains_to_issuer for o in cold.values()} == {False}
    assert observe_all(desired.certificates, not_yet, cache) == cold
