"""Hot-plug policy: which newly plugged devices the host may drive.

Fail closed: anything no rule allows is quarantined.
"""

from pciguard.policy.default import Decision, DefaultPolicy, HotplugPolicy, PresentPolicy, Target

__all__ = ["Decision", "DefaultPolicy", "HotplugPolicy", "PresentPolicy", "Target"]
