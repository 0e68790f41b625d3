"""Xen dom0s: the hypervisor's evidence for the audit (``evidence``, ``dom0``)."""
