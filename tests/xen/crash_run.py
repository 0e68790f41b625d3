"""pciguard in a fake Xen dom0 (fakekernel.py answers sysfs, fakexen.FakeXl answers xl),
killed with SIGKILL just before its N-th write or xl command that changes the host, or
(N = "finish") just before it records the operation's end:
``crash_run.py ROOT N pciguard-args...``."""

import os
import signal
import sys
from pathlib import Path

from fakekernel import command, installed
from fakexen import QUESTIONS, FakeXl
from pciguard.cli.main import main
from pciguard.platforms.linux.journal import Journal
from pciguard.platforms.xen import platform
from pciguard.platforms.xen.platform import Ran

root, kill_at, *arguments = sys.argv[1:]
if kill_at == "finish":
    Journal.finish = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
with installed(Path(root), 0 if kill_at == "finish" else int(kill_at)) as writes:
    xl = FakeXl.load(Path(root))

    def run(argv: tuple[str, ...]) -> Ran:
        if argv[1] not in QUESTIONS:
            command(writes, argv)
        ran = xl(argv)
        xl.save()
        return ran

    platform.run_xl = run  # type: ignore[assignment]
    sys.argv = ["pciguard", *arguments]
    main()
