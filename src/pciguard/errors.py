"""Every error pciguard raises on purpose derives from ``PciguardError``.

    PciguardError
    ├── InputError                 a file or argument is malformed; carries the place
    │   └── PolicyError            a hot-plug policy rule is malformed (file:line:column)
    ├── TopologyError              a platform description is self-contradictory
    ├── RefusedError               the toolstack refused an operation before changing anything
    │   ├── PreconditionFailed     a check before exposure failed (names the device and why)
    │   └── IllegalTransition      the ownership table has no such move
    ├── StepFailed                 a platform step failed; the toolstack unwound it
    │   └── InjectedFault          the failure was injected on purpose (tests, verifier)
    └── PlatformMisuse             the caller broke the platform's contract (a bug in the caller)

Messages say what happened and what to do about it.
"""

from __future__ import annotations


class PciguardError(Exception):
    """Root of every error pciguard raises on purpose."""


class InputError(PciguardError):
    """A file or argument is malformed.

    ``source`` names the input (a path or "<argument>"), ``where`` the place in it
    (a key path such as ``devices[2].acs``, and line/column where known).
    """

    def __init__(
        self,
        source: str,
        message: str,
        *,
        key_path: str = "",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.source = source
        self.key_path = key_path
        self.line = line
        self.column = column
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        place = self.source
        if self.line is not None:
            place += f":{self.line}"
            if self.column is not None:
                place += f":{self.column}"
        if self.key_path:
            place += f": at {self.key_path}"
        return f"{place}: {self.detail}"


class PolicyError(InputError):
    """A hot-plug policy rule is malformed; names the file, line and column."""


class TopologyError(PciguardError):
    """A platform description contradicts itself (a dangling parent, a duplicate BDF...)."""


class RefusedError(PciguardError):
    """The toolstack refused an operation; nothing was changed."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        self.device = device
        super().__init__(message)


class PreconditionFailed(RefusedError):
    """A check that must pass before anything is exposed to a guest did not pass.

    ``reasons`` lists every failed check, each a full sentence.
    """

    def __init__(self, device: str, target: str, reasons: list[str]) -> None:
        self.target = target
        self.reasons = list(reasons)
        text = f"cannot assign {device} to {target}: " + "; ".join(reasons)
        super().__init__(text, device=device)


class IllegalTransition(RefusedError):
    """The ownership state machine does not allow this move from the device's state."""

    def __init__(self, device: str, state: str, event: str, allowed: list[str]) -> None:
        self.state = state
        self.event = event
        hint = ", ".join(allowed) if allowed else "nothing"
        super().__init__(
            f"{device} is {state}; '{event}' is not allowed from there (allowed: {hint})",
            device=device,
        )


class StepFailed(PciguardError):
    """A platform step failed. The toolstack has unwound the operation."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(f"{step} failed: {message}")


class InjectedFault(StepFailed):
    """A failure injected on purpose at a chosen platform call."""


class PlatformMisuse(PciguardError):
    """The caller broke the platform's contract: a bug in the caller, never user error.

    The simulated platform raises this at once (double ownership, releasing what is
    not owned, two owners in one IOMMU group...), the way iommufd's selftests do.
    """


class Undetermined(RuntimeError):
    """The verifier's memo: a step's reads contradict an earlier run with the same values
    read so far: it read something the recorder does not see, or it is not deterministic.
    A bug in the verifier or the toolstack, never a verdict."""
