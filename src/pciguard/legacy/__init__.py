"""Historic flaws, kept as selectable behaviours so tests and the verifier can show
that each attack works when the flaw is present and is stopped when it is not.

The secure toolstack and platform know nothing of them. A flaw is selected from
outside (a scenario's ``flaws``) and lives here, as what it changes: the plans a
legacy toolstack makes (``legacy.toolstack``) or what a legacy hypervisor does
(``legacy.platform``). The ownership ledger is never bent, so the invariants see the
damage.
"""

from pciguard.legacy.flaws import Flaw, parse_flaws

__all__ = ["Flaw", "parse_flaws"]
