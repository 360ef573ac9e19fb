"""Checks across entries: what each entry claims on this host (its name, its files) against
the others. Run on every entry whose paths are at least strings, so an entry with another
problem still has its clashes reported in the same run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from reconciler.manifest_entry import path_problem, resolve_owner
from reconciler.manifest_issues import Issue


@dataclass(frozen=True)
class Claim:
    """What one entry claims on this host: its name and its files."""

    where: str
    name: str | None  # None: not a usable string, already reported by the schema
    # normalised path strings: comparing them is all the cross-checks need, and a Path
    # object per file costs more than the rest of the check for a 10k-entry manifest
    cert_path: str
    key_path: str
    ca_path: str | None
    owner: str | None = None  # as written; only compared between entries sharing a ca_path

    def paths(self) -> dict[str, str | None]:
        return {"cert_path": self.cert_path, "key_path": self.key_path, "ca_path": self.ca_path}


def claim(e: Any, where: str, base: Path, paths: dict[str, str | None] | None = None) -> Claim | None:
    """The entry's claim, when its paths are at least strings (even if it has other errors).
    `paths`: its paths as an earlier load of the same bytes resolved them."""
    if not isinstance(e, dict):
        return None
    paths = paths or entry_paths(e, base)
    cert_path, key_path = paths["cert_path"], paths["key_path"]
    if cert_path is None or key_path is None:
        return None
    name = e.get("name", e.get("common_name"))
    owner = e.get("owner")
    return Claim(
        where,
        name if isinstance(name, str) and name else None,
        cert_path,
        key_path,
        paths["ca_path"],
        owner if isinstance(owner, str) else None,
    )


def entry_paths(e: dict[str, Any], base: Path) -> dict[str, str | None]:
    """The entry's cert_path, key_path and ca_path resolved against the manifest's folder
    (symlinks kept); None for one that is not a usable string."""
    # what os.path.join does, without its cost per call (10k entries, three paths each)
    folder = str(base).rstrip("/") + "/"

    def resolved(v: Any) -> str | None:
        if not isinstance(v, str) or not v or "\0" in v:
            return None
        path = v if v.startswith("/") else folder + v
        # most paths are already normal: normpath only for those with something to fold
        return os.path.normpath(path) if "/." in path or "//" in path or path.endswith("/") else path

    return {
        "cert_path": resolved(e.get("cert_path")),
        "key_path": resolved(e.get("key_path")),
        "ca_path": resolved(e.get("ca_path")),
    }


def cross_checks(claims: list[Claim], checked_before: bool = False) -> list[Issue]:
    """`checked_before`: these very claims passed before (the same manifest bytes at the same
    path), so no two of their names or path strings clash; only this host can make two of
    their paths one file now, through a folder that is a link: the pairs are compared again
    only then. The owners of shared CA files are checked every time (users and groups change)."""
    folders: dict[str, str] = {}  # folder -> its realpath
    paths = (p for c in claims for p in (c.cert_path, c.key_path, c.ca_path))
    if checked_before and not linked_folders(paths, folders):
        return _shared_ca_owners(claims)
    issues: list[Issue] = []
    owners: dict[str, tuple[Claim, str]] = {}
    names: dict[str, Claim] = {}

    def same_file(p: str) -> str:
        """Where `p` really is: two names for one file through a linked folder are one
        file, and two entries writing it would replace each other's certificate forever."""
        head, tail = os.path.split(p)
        if path_problem(p):  # cannot exist (PATH_MAX, NAME_MAX): walking it name by name is quadratic
            return p
        if head not in folders:
            folders[head] = os.path.realpath(head)
        real = folders[head]
        return p if real == head else os.path.join(real, tail)

    for c in claims:
        real_cert, real_key = same_file(c.cert_path), same_file(c.key_path)
        if real_cert == real_key:
            issues.append(
                Issue(
                    f"{c.where}.key_path", f"is the same file as cert_path ({c.cert_path}); give the key its own file"
                )
            )
        for field, real in (("cert_path", real_cert), ("key_path", real_key)):
            p = getattr(c, field)
            if real in owners and owners[real][0] is not c:
                other, other_field = owners[real]
                theirs = getattr(other, other_field)
                via = f"; through a linked folder it is the same file as {theirs}" if theirs != p else ""
                issues.append(
                    Issue(
                        f"{c.where}.{field}",
                        f"{p} is also the {other_field} of {other.where} ({other.name}){via}; "
                        "every file belongs to one certificate",
                    )
                )
            else:
                owners.setdefault(real, (c, field))
        if c.name is None:
            continue
        if c.name in names:
            issues.append(
                Issue(
                    f"{c.where}.name",
                    f'"{c.name}" is already the name of {names[c.name].where}; set a unique "name" on one of them',
                )
            )
        else:
            names[c.name] = c
    for c in claims:
        if c.ca_path is not None and same_file(c.ca_path) in owners:
            other, other_field = owners[same_file(c.ca_path)]
            issues.append(
                Issue(
                    f"{c.where}.ca_path",
                    f"{c.ca_path} is the {other_field} of {other.where}; give the CA root its own file",
                )
            )
    return issues + _shared_ca_owners(claims)


def linked_folders(paths: Iterable[str | None], folders: dict[str, str] | None = None) -> bool:
    """Whether the folder of any of these claimed paths resolves elsewhere (each folder
    resolved once, into `folders`)."""
    folders = {} if folders is None else folders
    linked = False
    for p in paths:
        # os.path.dirname of a claimed path (absolute, normalised), at a fifth of its cost
        head = (p.rpartition("/")[0] or "/") if p is not None else None
        if head is not None and head not in folders:
            folders[head] = os.path.realpath(head)
            linked = linked or folders[head] != head
    return linked


def _shared_ca_owners(claims: list[Claim]) -> list[Issue]:
    """Entries may share one ca_path (it holds the same root), but not with two owners: each
    pass would chown the file to one, the next back to the other. Entries without an owner
    leave it alone and agree with anyone; the same ids spelled differently agree."""
    issues: list[Issue] = []
    first: dict[tuple[str, str], tuple[Claim, int]] = {}  # (ca_path, "uid"/"gid") -> who set it first
    for c in claims:
        if c.ca_path is None or c.owner is None:
            continue
        uid, gid, problem = resolve_owner(c.owner)
        if problem:
            continue  # reported at the entry's own owner
        for part, value in (("uid", uid), ("gid", gid)):
            if value is None:
                continue
            other, other_value = first.setdefault((c.ca_path, part), (c, value))
            if other_value != value:
                issues.append(
                    Issue(
                        f"{c.where}.owner",
                        f'"{c.owner}" differs from "{other.owner}" of {other.where} ({other.name}), '
                        f"which writes the same ca_path {c.ca_path}; every pass would chown it back and forth: "
                        "give both one owner, or each its own ca_path",
                    )
                )
                break
    return issues
