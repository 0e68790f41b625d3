"""The hot-plug guard on a fake tree whose kernel is emulated (fakekernel.py): started,
a device plugged in, and the guard killed with SIGKILL just before the N-th sysfs write
of its decision about it, or (N = "finish") just before it records the operation's end
(N = 0: not killed; prints how many writes the decision made):
``guard_crash_run.py ROOT RULES DEVICE N``."""

import os
import signal
import sys
from pathlib import Path

from fakekernel import crash_before, installed, plug
from pciguard.platforms.linux.guard import Guard
from pciguard.platforms.linux.journal import Journal
from pciguard.policy.rules import parse_policy

root, rules, device, kill_at = sys.argv[1:]
with installed(Path(root)) as writes:
    guard = Guard(parse_policy(rules, "test.rules"), root, Path(root) / "state")
    guard.start()
    plug(Path(root), device)
    before = len(writes)
    if kill_at == "finish":
        Journal.finish = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
    elif kill_at != "0":
        crash_before(writes, int(kill_at))
    guard.added("pci", device)
    print(len(writes) - before)
