"""Certificate reconciler: make the TLS certificates on this host match a manifest."""

__version__ = "0.1.0"
