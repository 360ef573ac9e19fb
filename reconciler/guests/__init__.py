"""Delivery into Proxmox guests (issue 12): the certificate, key and CA root copied into an
LXC container or a VM, atomically inside the guest, then the service reloaded there.

  agent.py      judging what a command run in a guest reports (qm guest exec's JSON)
  proxmox.py    the Proxmox CLI client: pct / qm / pvesh as subprocesses, never a key on a command line
  deliver.py    the delivery stage: the files of one certificate into its guest, and the reload
"""
