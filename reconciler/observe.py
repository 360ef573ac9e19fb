"""observe: what is on disk for each desired certificate. Reads only; never writes.

An unreadable or garbage file is an observation, never a crash. Parsed results are
cached (observation_cache.py), so a steady-state pass costs a `stat` per file; the cache
file is written by passes, never by `--plan`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.crypto import fingerprint
from reconciler.folder_checks import folders_problem
from reconciler.managed import foreign_mark, mark_of, refusal
from reconciler.model import CertFacts, DesiredCert, FileState, Observed, Written
from reconciler.observation_cache import Marks, ObservationCache
from reconciler.parse import LIMIT, ParsedCert, Trust, content_digest, parse_key, parse_leaf, pem_certificates


def observe_all(
    certs,
    trust: Trust,
    cache: ObservationCache | None = None,
    manager: str | None = None,
    written: dict[str, Written] | None = None,
) -> dict[str, Observed]:
    """`written`: by certificate name, what this pass's apply wrote (see observe).
    Two rounds: every certificate is looked up (stats, checks, the cache's answer), then the
    files the cache does not answer for are read, parsed and checked (`_parse_all`). Each
    round runs one kind of work in a tight loop: a cold 10,000-entry --plan took 3.25-3.31 s
    this way and 3.44 s observing one certificate at a time (same answers, measured side by side)."""
    folders: dict = {}
    written = written or {}
    found: dict[str, Observed] = {}
    misses = []
    for c in certs:
        seen = _look(c, trust, cache, folders, manager)
        if isinstance(seen, Observed):
            found[c.name] = seen
        else:
            misses.append((c, seen, written.get(c.name)))
    for (c, seen, _), observed in zip(misses, _parse_all(misses, trust), strict=True):
        if cache is not None:
            cache.put(c, observed, trust, seen.marks)
        found[c.name] = observed
    return {c.name: found[c.name] for c in certs}  # in the manifest's order


def observe(
    cert: DesiredCert,
    trust: Trust,
    cache: ObservationCache | None = None,
    folders: dict | None = None,
    manager: str | None = None,
    written: Written | None = None,
) -> Observed:
    """`folders`: a memo of folder checks shared by the certificates of one pass.
    `manager`: our state folder's identity; files another one manages are a problem.
    `written`: what apply just wrote there (files still holding it are not parsed again)."""
    seen = _look(cert, trust, cache, folders, manager)
    if isinstance(seen, Observed):
        return seen
    observed = _check(cert, _read_files(cert, seen, written), trust)
    if cache is not None:
        cache.put(cert, observed, trust, seen.marks)
    return observed


@dataclass(frozen=True, slots=True)
class _Seen:
    """What `_look` found of a certificate the cache does not answer for: its files' states,
    the folder problem and the `ca_path` fields of its Observed, and the marks for its cache
    row (None: not the files' own attributes, which their stamps vouch for)."""

    cert_file: FileState
    key_file: FileState
    problem: str | None
    ca: dict
    marks: Marks | None


def _look(cert: DesiredCert, trust: Trust, cache: ObservationCache | None, folders: dict | None, manager: str | None):
    """The stats and checks every pass makes, and the cache's answer (an Observed); or, when
    the cache has none, what is needed to read and parse the files (a _Seen)."""
    follow = cert.allow_symlink
    cert_file = stat_file(cert.cert_path, follow)
    key_file = stat_file(cert.key_path, follow)
    found = cache.get(cert, cert_file, key_file, trust) if cache is not None else None
    hit, marks = found if found is not None else (None, None)
    vouched = marks is not None
    if marks is None:  # no marks the files' stamps vouch for: read them
        marks, vouched = _read_marks(cert, cert_file, key_file)
    problem = folders_problem(cert, folders) or _foreign_problem(cert, marks, manager)
    ca = _observe_ca(cert.ca_path, follow, cache) if cert.ca_path is not None else {}
    if hit is not None:
        return replace(hit, folder_problem=problem, **ca) if problem or ca else hit
    return _Seen(cert_file, key_file, problem, ca, marks if vouched else None)


@dataclass(frozen=True, slots=True)
class _Read:
    """A certificate the cache did not answer for, its files read and parsed: its Observed
    but for what the leaf's signature check gives."""

    seen: _Seen
    cert_file: FileState
    cert: ParsedCert | None
    cert_error: str | None
    key_file: FileState
    key_id: str | None
    key_error: str | None


def _read_files(cert: DesiredCert, seen: _Seen, written: Written | None) -> _Read:
    cert_file, parsed, cert_error = _read_parsed(cert.cert_path, seen.cert_file, lambda data: parse_leaf(data, written))
    key_file, key_id, key_error = _read_parsed(cert.key_path, seen.key_file, lambda data: _parse_key(data, written))
    return _Read(seen, cert_file, parsed, cert_error, key_file, key_id, key_error)


def _check(cert: DesiredCert, read: _Read, trust: Trust) -> Observed:
    """The leaf's signature check (ParsedCert.checked), and so the certificate's Observed."""
    parsed = read.cert
    facts, error = parsed.checked(trust, **_shared(cert, parsed.facts)) if parsed is not None else (None, None)
    # a matching key's id as the very string the certificate's facts hold
    key_id = facts.public_key_id if facts is not None and read.key_id == facts.public_key_id else read.key_id
    return Observed(
        read.cert_file,
        read.key_file,
        facts,
        read.cert_error or error,
        key_id,
        read.key_error,
        _chains(facts, trust),
        read.seen.problem,
        issuer_root=trust.root_for(cert),
        **read.seen.ca,
    )


def _parse_all(misses: list, trust: Trust) -> list[Observed]:
    """The Observed of each (cert, _Seen, Written | None), in order.

    On one thread: checking a leaf's signature releases the GIL, but a thread checking
    while this one parsed the next files (tried) handed the GIL back and forth for every
    file, and on an idle 2-CPU machine a cold 10,000-entry --plan took longer with it
    (4.1-5.4 s) than without (3.8-4.4 s), with twice the system time."""
    return [_check(c, _read_files(c, seen, w), trust) for c, seen, w in misses]


def _read_parsed(path: str | Path, state: FileState, parse):
    """(the file's state, parse(its bytes)) for a present file; an unreadable one is a state."""
    if not state.present:
        return state, None, None
    data, err = read(path)
    if err is not None or data is None:
        return FileState("unreadable", state.uid, state.gid, state.mode, err or "", state.stamp), None, None
    return (state, *parse(data))


def _shared(cert: DesiredCert, facts: dict) -> dict:
    """Equal values kept as one object: a converged certificate's names are the manifest's.
    Kept as copies (with its key's id), they cost a 50,000-entry --plan 30 MB."""
    if facts["sans"] != cert.sans:
        return {}
    if facts["common_name"] != cert.common_name:
        return {"sans": cert.sans}
    return {"sans": cert.sans, "common_name": cert.common_name}


def _parse_key(data: bytes, written: Written | None) -> tuple[str | None, str | None]:
    if written is not None and written.key_digest is not None and content_digest(data) == written.key_digest:
        return written.key_id, None  # the key apply just wrote, parsed there
    return parse_key(data)


def _chains(facts: CertFacts | None, trust: Trust) -> bool | None:
    """Whether the certificate chains to the issuer; None: we cannot tell (no anchors known
    for a remote CA)."""
    if facts is None:
        return None
    if facts.issued_by is not None:
        return True
    return False if trust.fingerprints or trust.authoritative else None


def _read_marks(cert: DesiredCert, cert_file: FileState, key_file: FileState) -> tuple[Marks, bool]:
    """(the state folder marked on the cert and the key file, whether both answers are the
    files' own extended attributes, which their stamps vouch for); a file not there has none."""
    found = [
        mark_of(path, cert.allow_symlink) if state.present else (None, False)
        for path, state in ((cert.cert_path, cert_file), (cert.key_path, key_file))
    ]
    return (found[0][0], found[1][0]), found[0][1] and found[1][1]


def _foreign_problem(cert: DesiredCert, marks: Marks, manager: str | None) -> str | None:
    if manager is None:
        return None
    for label, path, mark in (("cert", cert.cert_path, marks[0]), ("key", cert.key_path, marks[1])):
        other = foreign_mark(mark, manager)
        if other:
            return refusal(label, path, other, manager)
    return None


def _observe_ca(path: str | Path, follow: bool, cache: ObservationCache | None) -> dict:
    """The `ca_file` and `ca_certs` of an Observed. Entries often share one `ca_path`: the
    parsed fingerprints are cached by the file's stamp like a certificate's facts."""
    state = stat_file(path, follow)
    if not state.present:
        return {"ca_file": state}
    hit = cache.get_ca(path, state) if cache is not None else None
    if hit is not None:
        return {"ca_file": state, "ca_certs": hit}
    data, err = read(path)
    if err is not None or data is None:
        return {"ca_file": FileState("unreadable", state.uid, state.gid, state.mode, err or "", state.stamp)}
    found = pem_certificates(data)
    certs = tuple(fingerprint(c) for c in found) if found is not None else None
    if cache is not None and certs is not None:
        cache.put_ca(path, state, certs)
    return {"ca_file": state, "ca_certs": certs}


def unknown_chain_certificates(certs, observed: dict[str, Observed], trust: Trust) -> list:
    """The certificates after the leaf in the files whose chain holds one the issuer does not
    know yet (an intermediate the old `step ca certificate` bundled in): candidates for the
    issuer to verify and learn. Reads only those files, so a converged host reads none."""
    known = set(trust.fingerprints)
    found: dict[str, object] = {}
    for cert in certs:
        o = observed.get(cert.name)
        if o is None or o.cert is None or not o.cert_file.present or all(fp in known for fp in o.cert.chain):
            continue
        data, err = read(cert.cert_path)
        chain = pem_certificates(data) if err is None and data is not None else None
        for c in (chain or [])[1:]:
            found.setdefault(fingerprint(c), c)
    return [c for fp, c in found.items() if fp not in known]


# --------------------------------------------------------------------------- files


# owners, modes and devices: a handful of values, yet each stat makes an int object of its
# own for each (above 256); as one object each, 100,000 files hold 5-10 MB less
_INTS: dict[int, int] = {}


def _one(n: int) -> int:
    return _INTS.setdefault(n, n)


def stat_file(path: str | Path, follow_symlink: bool = False) -> FileState:
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
        _one(st.st_uid),
        _one(st.st_gid),
        _one(stat.S_IMODE(st.st_mode)),
        detail,
        (_one(st.st_dev), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
    )


FIRST_READ = 16 * 1024  # more than a certificate with its chain, or a key; a heap buffer, not an mmap


def read(path: str | Path) -> tuple[bytes | None, str | None]:
    """(up to LIMIT + 1 bytes of the file, None) or (None, the OS error). Never blocks on a
    FIFO swapped in after the stat (O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc.strerror or str(exc)
    try:
        # one read holds any certificate or key file (no fstat to size it); only a larger file
        # is read on, sized by the file: a read buffer of LIMIT for a 1 kB certificate is an
        # mmap and munmap of 1 MiB per file, the slowest part of reading 10,000 of them
        chunks = [os.read(fd, FIRST_READ)]
        want = min(os.fstat(fd).st_size, LIMIT) + 1 - FIRST_READ if len(chunks[0]) == FIRST_READ else 0
        while want > 0:
            chunk = os.read(fd, want)
            chunks.append(chunk)
            if len(chunk) < want:  # the end of the file (a regular file never reads short)
                break
            want -= len(chunk)
        return b"".join(chunks), None
    except OSError as exc:
        return None, exc.strerror or str(exc)
    finally:
        os.close(fd)
