"""Delivery into Proxmox guests (issue 12; docs/proxmox.md): the certificate, key and CA root
copied into an LXC container or a VM, atomically inside the guest, then the service
reloaded there. The values and drift rows are in reconciler/guestfacts.py (pure).

  agent.py      judging what a command run in a guest reports (qm guest exec's JSON)
  proxmox.py    the Proxmox CLI client: pct / qm / pvesh as subprocesses, never a key on a command line
  deliver.py    one certificate's files into its guest, one look at a guest's files, the reload
  stage.py      the stage of a pass: observe_guests (read only), deliver_all (after the host files)
  cluster.py    one manifest for a Proxmox cluster: the share of it this node acts on
  diagnose.py   `reconcile doctor`'s guest checks
"""
