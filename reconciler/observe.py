"""observe: what is on disk for each desired certificate. Reads only; never writes.

An unreadable or garbage file is an observation, never a crash. Parsed results are
cached by (device, inode, size, mtime, ctime) of both files and the digest of the trust
anchors, so a steady-state pass costs a `stat` per file; the cache file is written by
the passes that write anyway (`save`), never by `--plan`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reconciler.model import CertFacts, DesiredCert, FileState, Observed, Written

CACHE_VERSION = 4  # 3: SANs read typed (a dNSName that spells an address is no IP SAN); 4: usages, chains, CA files


# --------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class Trust:
    """The issuer's trust anchors as fingerprint → certificate, plus whether absence means "no"."""

    certs: tuple  # tuple[x509.Certificate, ...]
    fingerprints: tuple[str, ...]
    authoritative: bool  # an empty set means "nothing chains to it" (embedded CA) vs "unknown"
    digest: str = ""  # of the fingerprints: part of every observation cache key
    root: str | None = None  # fingerprint of the self-signed one: what `ca_path` should hold
    # anchor fingerprint → its intermediates up to the root: the same for every leaf it signed,
    # so worked out once (two signature checks per certificate, two thirds of a cold plan)
    paths: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, certs: list, authoritative: bool) -> "Trust":
        from reconciler.crypto import fingerprint, issued_by

        fingerprints = tuple(fingerprint(c) for c in certs)
        digest = hashlib.sha256(",".join(sorted(fingerprints)).encode()).hexdigest()[:16]
        root = next((fp for c, fp in zip(certs, fingerprints) if issued_by(c, c)), None)
        return cls(tuple(certs), fingerprints, authoritative, digest, root)


# --------------------------------------------------------------------------- files


def stat_file(path: Path, follow_symlink: bool = False) -> FileState:
    try:
        st = os.stat(path) if follow_symlink else os.lstat(path)
    except FileNotFoundError:
        return FileState("missing")
    except NotADirectoryError:
        return FileState("unreadable", detail="a parent of the path is not a directory")
    except OSError as exc:
        return FileState("unreadable", detail=exc.strerror or str(exc))
    kind = "file"
    detail = ""
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
        try:
            detail = os.readlink(path)
        except OSError:
            pass
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif not stat.S_ISREG(st.st_mode):
        kind = "special"
    return FileState(
        kind,
        st.st_uid,
        st.st_gid,
        stat.S_IMODE(st.st_mode),
        detail,
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
    )


def _read(path: Path) -> tuple[bytes | None, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc.strerror or str(exc)
    try:
        with os.fdopen(fd, "rb") as fh:
            return fh.read(1024 * 1024 + 1), None
    except OSError as exc:
        return None, exc.strerror or str(exc)


# --------------------------------------------------------------------------- parsing


def key_type_of(public_key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384", "secp521r1": "EC P-521"}.get(
            public_key.curve.name, f"EC {public_key.curve.name}"
        )
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def public_key_id(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def parse_cert(data: bytes, trust: Trust, written: Written | None = None) -> tuple[CertFacts | None, str | None]:
    """`written`: what apply just wrote; bytes equal to it are not parsed again."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.x509.oid import NameOID

    from reconciler.crypto import cert_sans, fingerprint

    if len(data) > 1024 * 1024:
        return None, "file is larger than 1 MiB; not a certificate"
    ours = written is not None and data == written.cert_pem
    try:
        certs = list(written.certs) if ours else x509.load_pem_x509_certificates(data)  # type: ignore[union-attr]
    except ValueError:
        return None, "not a PEM X.509 certificate"
    leaf = certs[0]
    try:
        cn_attrs = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cn_attrs[0].value) if cn_attrs else None
        public_key = leaf.public_key()
        issued_by, issuer_chain, signer_not_after = _issuer_path(leaf, certs[1:], trust, written.signer if ours else None)  # type: ignore[union-attr]
        facts = CertFacts(
            common_name=cn,
            sans=cert_sans(leaf),  # the same canonical form as a desired SAN set
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            key_type=key_type_of(public_key),
            public_key_id=public_key_id(public_key),
            issued_by=issued_by,
            serial=format(leaf.serial_number, "x"),
            usages=_usages(leaf),
            chain=tuple(fingerprint(c) for c in certs[1:]),
            issuer_chain=issuer_chain,
            signer_not_after=signer_not_after,
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # UnsupportedAlgorithm: a public key type cryptography cannot load (a foreign file)
        return None, f"certificate does not parse: {exc}"
    return facts, None




def _usages(leaf) -> frozenset[str]:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return frozenset({"any"})  # no EKU: usable for anything
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "any"}
    return frozenset(names[u] for u in ekus if u in names)


def _issuer_path(leaf, chain: list, trust: Trust, signer: str | None = None) -> tuple[str | None, tuple[str, ...] | None, datetime | None]:
    """(fingerprint of the trust certificate `leaf` chains to, directly or through `chain`;
    the issuer's intermediates from the leaf up to its root, as fingerprints; when the
    certificate that signed the leaf expires). The chain is built from the issuer's own
    certificates, never from the file: it is what the file should hold with include_ca.
    `signer`: the anchor whose signature on `leaf` the issuer already verified."""
    from reconciler.crypto import issued_by

    anchors = list(zip(trust.certs, trust.fingerprints))
    for anchor, fp in anchors:
        if (fp == signer and leaf.issuer == anchor.subject) or issued_by(leaf, anchor):
            if fp not in trust.paths:
                trust.paths[fp] = _up_to_root(anchor, fp, anchors)
            return fp, trust.paths[fp], anchor.not_valid_after_utc
    for intermediate in chain:
        if issued_by(leaf, intermediate):
            for anchor, fp in anchors:
                if issued_by(intermediate, anchor):
                    return fp, None, intermediate.not_valid_after_utc
    return None, None, None


def _up_to_root(cert, fp: str, anchors: list) -> tuple[str, ...] | None:
    from reconciler.crypto import issued_by

    path: list[str] = []
    for _ in range(len(anchors) + 1):  # a loop among the anchors cannot run forever
        if issued_by(cert, cert):
            return tuple(path)
        path.append(fp)
        parent = next(((a, f) for a, f in anchors if a is not cert and issued_by(cert, a)), None)
        if parent is None:
            return None
        cert, fp = parent
    return None


def parse_key(data: bytes) -> tuple[str | None, str | None]:
    from cryptography.hazmat.primitives import serialization

    if len(data) > 1024 * 1024:
        return None, "file is larger than 1 MiB; not a private key"
    try:
        key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        return None, "private key is encrypted; the reconciler manages unencrypted keys only"
    except (ValueError, Exception) as exc:  # cryptography raises several types for garbage
        return None, "not a PEM private key" if "PEM" in str(exc) or "Could not deserialize" in str(exc) else "not a usable private key"
    return public_key_id(key.public_key()), None


# --------------------------------------------------------------------------- folders


def folder_problem(path: Path, owner_uid: int | None, memo: dict | None = None) -> str | None:
    """sshd's StrictModes for the folders above a file we write as root: each existing folder
    from the file's up to / must belong to root (or to the reconciler's user, or to the
    certificate's owner) and be writable by no group and no other user, unless it is sticky
    like /tmp (then others cannot rename or delete what is not theirs). Otherwise whoever can
    write there can swap the files, or a folder, for a symlink between our check and our write.
    Checked along the path as written and along its resolved form. `memo`: per pass, by folder."""
    if memo is not None:
        # files share folders: resolving the path above each one (realpath, a stat per
        # level) once per folder instead of once per file is most of a 10k-file pass
        whole = ("file-folder", os.path.dirname(os.fspath(path)), owner_uid)
        if whole not in memo:
            memo[whole] = _folder_problem(path, owner_uid, memo)
        return memo[whole]
    return _folder_problem(path, owner_uid, None)


def _folder_problem(path: Path, owner_uid: int | None, memo: dict | None) -> str | None:
    allowed = {0, os.geteuid()} | ({owner_uid} if owner_uid is not None else set())
    for f in _folders_above(path):
        key = (str(f), owner_uid)
        if memo is not None and key in memo:
            found = memo[key]
        else:
            found = _writable_by_others(f, allowed)
            if memo is not None:
                memo[key] = found
        if found:
            return (
                f"{found[0]}, not only root and the certificate's owner; refusing to write keys there, "
                f"as sshd's StrictModes would. Fix: {found[1]}"
            )
    return None


def manifest_trust_problem(path: Path) -> str | None:
    """Running as root, a manifest (or a folder above it) that another user can write hands
    that user root: its post-renewal commands run as root. None when it is safe (or when we
    are not root, and commands run as our own user anyway)."""
    if os.geteuid() != 0:
        return None
    for f in (Path(os.path.realpath(path)), *_folders_above(path)):
        found = _writable_by_others(f, {0})
        if found:
            return (
                f"the manifest is not trusted: {found[0]}, and its post_renewal_commands would run as root; "
                f"refusing to run them. Fix: {found[1]}; or pass --allow-untrusted-manifest "
                "(env RECONCILER_ALLOW_UNTRUSTED_MANIFEST=1) if everyone who can write it may run commands as root"
            )
    return None


def _folders_above(path: Path) -> list[Path]:
    """The folders above `path`, along the path as written and along its resolved form."""
    folder = Path(os.path.abspath(path)).parent
    out = [folder, *folder.parents]
    real = Path(os.path.realpath(folder))
    if real != folder:
        out += [real, *real.parents]
    return out


def _writable_by_others(target: Path, allowed: set[int]) -> tuple[str, str] | None:
    """(what is wrong, the fix) when someone outside `allowed` (uids) can write `target`."""
    from reconciler.folders import unsafe

    try:
        st = os.stat(target)
    except OSError:
        return None  # not there yet (created when written) or not reachable: the write says so
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISREG(st.st_mode):
        return None  # a file where a folder should be: the write fails with its own error
    return unsafe(st, target, allowed)


def _folders_problem(cert: DesiredCert, memo: dict | None) -> str | None:
    paths = [cert.cert_path, cert.key_path] + ([cert.ca_path] if cert.ca_path is not None else [])
    if cert.allow_symlink:  # the writes land beside the link's final target
        paths += [Path(os.path.realpath(p)) for p in (cert.cert_path, cert.key_path)]
    for p in paths:
        problem = folder_problem(p, cert.uid, memo)
        if problem:
            return problem
    return None


# --------------------------------------------------------------------------- observe


def observe(
    cert: DesiredCert, trust: Trust, cache: "ObservationCache | None" = None, folders: dict | None = None, manager: str | None = None,
    written: Written | None = None,
) -> Observed:
    """`folders`: a memo of folder checks shared by the certificates of one pass.
    `manager`: our state folder's identity; files another one manages are a problem.
    `written`: what apply just wrote there (files still holding it are not parsed again)."""
    follow = cert.allow_symlink
    cert_file = stat_file(cert.cert_path, follow)
    key_file = stat_file(cert.key_path, follow)
    problem = _folders_problem(cert, folders) or _foreign_problem(cert, cert_file, key_file, manager)
    ca = _observe_ca(cert.ca_path, follow, cache) if cert.ca_path is not None else {}
    if cache is not None:
        hit = cache.get(cert, cert_file, key_file, trust)
        if hit is not None:
            return replace(hit, folder_problem=problem, **ca) if problem or ca else hit
    facts = cert_error = key_id = key_error = None
    if cert_file.present:
        data, err = _read(cert.cert_path)
        if err:
            cert_file = FileState("unreadable", cert_file.uid, cert_file.gid, cert_file.mode, err, cert_file.stamp)
        else:
            facts, cert_error = parse_cert(data, trust, written)
    if key_file.present:
        data, err = _read(cert.key_path)
        if err:
            key_file = FileState("unreadable", key_file.uid, key_file.gid, key_file.mode, err, key_file.stamp)
        else:
            ours = written is not None and written.key_pem == data
            key_id, key_error = (written.key_id, None) if ours else parse_key(data)  # type: ignore[union-attr]
    chains = None
    if facts is not None:
        if facts.issued_by is not None:
            chains = True
        elif trust.fingerprints or trust.authoritative:
            chains = False
    observed = Observed(cert_file, key_file, facts, cert_error, key_id, key_error, chains, problem, issuer_root=trust.root, **ca)
    if cache is not None:
        cache.put(cert, observed, trust)
    return observed


def _observe_ca(path: Path, follow: bool, cache: "ObservationCache | None") -> dict:
    """The `ca_file` and `ca_certs` of an Observed. Entries often share one `ca_path`: the
    parsed fingerprints are cached by the file's stamp like a certificate's facts."""
    from cryptography import x509

    from reconciler.crypto import fingerprint

    state = stat_file(path, follow)
    if not state.present:
        return {"ca_file": state}
    hit = cache.get_ca(path, state) if cache is not None else None
    if hit is not None:
        return {"ca_file": state, "ca_certs": hit}
    data, err = _read(path)
    if err:
        return {"ca_file": FileState("unreadable", state.uid, state.gid, state.mode, err, state.stamp)}
    try:
        certs = tuple(fingerprint(c) for c in x509.load_pem_x509_certificates(data)) if len(data) <= 1024 * 1024 else None
    except ValueError:
        certs = None
    if cache is not None and certs is not None:
        cache.put_ca(path, state, certs)
    return {"ca_file": state, "ca_certs": certs}


def unknown_chain_certificates(certs, observed: dict[str, Observed], trust: Trust) -> list:
    """The certificates after the leaf in the files whose chain holds one the issuer does not
    know yet (an intermediate the old `step ca certificate` bundled in): candidates for the
    issuer to verify and learn. Reads only those files, so a converged host reads none."""
    from cryptography import x509

    from reconciler.crypto import fingerprint

    known = set(trust.fingerprints)
    found: dict[str, Any] = {}
    for cert in certs:
        o = observed.get(cert.name)
        if o is None or o.cert is None or not o.cert_file.present or all(fp in known for fp in o.cert.chain):
            continue
        data, err = _read(cert.cert_path)
        if err or data is None or len(data) > 1024 * 1024:
            continue
        try:
            chain = x509.load_pem_x509_certificates(data)[1:]
        except ValueError:
            continue
        for c in chain:
            found.setdefault(fingerprint(c), c)
    return [c for fp, c in found.items() if fp not in known]


def observe_all(
    certs, trust: Trust, cache: "ObservationCache | None" = None, manager: str | None = None, written: dict[str, Written] | None = None
) -> dict[str, Observed]:
    """`written`: by certificate name, what this pass's apply wrote (see observe)."""
    folders: dict = {}
    written = written or {}
    return {c.name: observe(c, trust, cache, folders, manager, written.get(c.name)) for c in certs}


def _foreign_problem(cert: DesiredCert, cert_file: FileState, key_file: FileState, manager: str | None) -> str | None:
    if manager is None:
        return None
    from reconciler.managed import foreign, refusal

    for label, path, state in (("cert", cert.cert_path, cert_file), ("key", cert.key_path, key_file)):
        if state.present:
            other = foreign(path, manager, cert.allow_symlink)
            if other:
                return refusal(label, path, other, manager)
    return None


# --------------------------------------------------------------------------- cache


def _parse_cache(data: bytes) -> dict[str, Any]:
    """The cache's entries, each checked so that get() cannot trip over a wrong shape."""
    from reconciler.statefiles import StateFileDamaged

    raw = json.loads(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
        raise StateFileDamaged("not an observation cache (no 'entries' object)")
    if raw.get("version") != CACHE_VERSION:
        return {}  # another version's format: rebuilt, not damaged
    for key, row in raw["entries"].items():
        problem = _ca_row_problem(row) if key.startswith("ca\0") else _row_problem(row)
        if problem:
            raise StateFileDamaged(f"entry {key.replace(chr(0), ' + ')!r}: {problem}")
    return raw["entries"]


def _ca_row_problem(row: Any) -> str | None:
    """A `ca_path` file's row (put_ca): its stamp and the fingerprints it holds."""
    if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], list) and isinstance(row[1], list)):
        return "not a list of a file stamp and fingerprints"
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in row[0]) or not all(isinstance(x, str) for x in row[1]):
        return "file stamp or fingerprints of the wrong type"
    return None


def _row_problem(row: Any) -> str | None:
    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    def text(v: Any, optional: bool = False) -> bool:
        return isinstance(v, str) or (optional and v is None)

    if not isinstance(row, list) or len(row) != 6:
        return "not a list of 6 fields"
    if not (ints(row[0]) and ints(row[1]) and text(row[2], True) and text(row[4], True) and row[5] in (True, False, None)):
        return "file stamps, trust, key id or chain flag of the wrong type"
    f = row[3]
    if not isinstance(f, dict):
        return "certificate facts are not an object"
    if not (text(f.get("common_name"), True) and text(f.get("key_type")) and text(f.get("public_key_id"))
            and text(f.get("issued_by"), True) and text(f.get("serial"))):
        return "certificate facts of the wrong type"
    if not isinstance(f.get("sans"), list) or not all(isinstance(x, str) for x in f["sans"]):
        return "SANs are not a list of names"
    for name in ("not_before", "not_after"):
        value = f.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name} is not a time"
        try:
            datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            return f"{name} {value!r} is out of range"
    return None


class ObservationCache:
    """Parsed facts keyed by the files' identity; stale or damaged entries are simply re-read."""

    def __init__(self, state_dir: Path | None, repair: bool = True):
        self.path = state_dir / "cache" / "observed.json" if state_dir else None
        self.entries: dict[str, Any] = {}
        self.dirty = False
        if self.path:
            from reconciler.statefiles import read_state_file

            # `repair`: only passes that may write set a damaged cache aside (--plan never writes)
            found = read_state_file(self.path, _parse_cache, "observation cache", repair=repair, consequence="re-reading the certificates", state_dir=state_dir)
            self.entries = found.value or {}

    @staticmethod
    def _key(cert: DesiredCert) -> str:
        return f"{cert.cert_path}\0{cert.key_path}"

    def get(self, cert: DesiredCert, cert_file: FileState, key_file: FileState, trust: Trust) -> Observed | None:
        row = self.entries.get(self._key(cert))
        if not row or not cert_file.present or not key_file.present:
            return None
        if row[0] != list(cert_file.stamp) or row[1] != list(key_file.stamp) or row[2] != trust.digest:
            return None
        try:
            f = row[3]
            facts = CertFacts(
                f["common_name"],
                frozenset(f["sans"]),
                datetime.fromtimestamp(f["not_before"], timezone.utc),
                datetime.fromtimestamp(f["not_after"], timezone.utc),
                f["key_type"],
                f["public_key_id"],
                f["issued_by"],
                f["serial"],
                frozenset(f["usages"]),
                tuple(f["chain"]),
                None if f["issuer_chain"] is None else tuple(f["issuer_chain"]),
                None if f["signer_not_after"] is None else datetime.fromtimestamp(f["signer_not_after"], timezone.utc),
            )
            return Observed(cert_file, key_file, facts, None, row[4], None, row[5], issuer_root=trust.root)
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def put(self, cert: DesiredCert, observed: Observed, trust: Trust) -> None:
        key = self._key(cert)
        if observed.cert is None or observed.key_public_id is None:
            if self.entries.pop(key, None) is not None:
                self.dirty = True
            return
        facts = asdict(observed.cert)
        facts["sans"] = sorted(facts["sans"])
        facts["not_before"] = observed.cert.not_before.timestamp()
        facts["not_after"] = observed.cert.not_after.timestamp()
        facts["usages"] = sorted(facts["usages"])
        if observed.cert.signer_not_after is not None:
            facts["signer_not_after"] = observed.cert.signer_not_after.timestamp()
        self.entries[key] = [
            list(observed.cert_file.stamp),
            list(observed.key_file.stamp),
            trust.digest,
            facts,
            observed.key_public_id,
            observed.chains_to_issuer,
        ]
        self.dirty = True

    def get_ca(self, path: Path, state: FileState) -> tuple[str, ...] | None:
        row = self.entries.get(f"ca\0{path}")
        if not isinstance(row, list) or len(row) != 2 or row[0] != list(state.stamp) or not isinstance(row[1], list):
            return None
        return tuple(row[1])

    def put_ca(self, path: Path, state: FileState, certs: tuple[str, ...]) -> None:
        row = [list(state.stamp), list(certs)]
        if self.entries.get(f"ca\0{path}") != row:
            self.entries[f"ca\0{path}"] = row
            self.dirty = True

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache (only from passes that may write). `keep`: names of live entries."""
        if not self.path or not self.dirty:
            return
        from reconciler.atomic import write_atomic

        try:
            data = json.dumps({"version": CACHE_VERSION, "entries": self.entries}, separators=(",", ":")).encode()
            write_atomic(self.path, data, mode=0o600, make_parents=True)
            self.dirty = False  # a cache kept across passes (--watch) is written only when it changed
        except OSError:
            pass
