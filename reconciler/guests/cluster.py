"""One manifest for a Proxmox cluster: each node acts only on its share of it.

A manifest under /etc/pve (shared by every node through pmxcfs), or any manifest when
RECONCILER_PROXMOX_CLUSTER is set, is a cluster's: each node keeps the entries whose guest
runs on it now (`pvesh get /cluster/resources --type vm`), the host entries marked for it
(`"node"`) and those marked for no node. When a guest migrates, the node that runs it
next takes it over on its next pass.

Two nodes never deliver to one guest at once because only the guest's own node is
allowed to: a node delivers only to the guests the cluster places on it, and `pct`/`qm`
themselves refuse a guest whose configuration is not on their node (pmxcfs moves it
atomically when the guest migrates). No cluster-wide lock is taken.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler import defaults
from reconciler.guestfacts import for_this_node, placement_of
from reconciler.guests.proxmox import GuestError, ProxmoxCLI
from reconciler.model import Desired


def cluster_mode(manifest: Path) -> bool:
    if defaults.flag(defaults.ENV_PVE_CLUSTER):
        return True
    try:
        return manifest.resolve().is_relative_to(defaults.PVE_CLUSTER_DIR)
    except OSError:
        return False


def local_share(desired: Desired, cli: ProxmoxCLI | None = None) -> tuple[Desired, tuple[str, ...]]:
    """`desired` as this node acts on it, and a note per entry left to another node.
    Unchanged outside cluster mode. Raises GuestError when the cluster cannot be asked."""
    if not cluster_mode(desired.manifest_path):
        return desired, ()
    cli = cli or ProxmoxCLI()
    try:
        node = cli.local_node()
        placement = placement_of(cli.resources())
    except GuestError as exc:
        raise GuestError(
            f"cluster mode ({desired.manifest_path} is a Proxmox cluster's manifest): {exc.message}",
            exc.hint or "is pvesh working on this node?",
        ) from None
    kept, left = for_this_node(desired.certificates, node, placement)
    return replace(desired, certificates=tuple(kept)), tuple(f"left to another node: {why}" for why in left)
