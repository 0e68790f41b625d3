"""pciguard: keep PCI devices given to virtual machines away from memory and
interrupts they do not own.

The pieces, from the bottom up:

- ``model``: pure values (PCI topology, IOMMU units, groups, ownership table).
- ``platforms``: the narrow ``Platform`` protocol and its implementations.
- ``toolstack``: the secure workflows, written once against ``Platform``.
- ``verify``: the invariants every state must satisfy.
- ``formats``: platform and scenario files.
- ``cli``: the ``pciguard`` command.
"""

__version__ = "0.1.0"
