"""pciguard on a fake tree whose kernel is emulated (fakekernel.py), killed with
SIGKILL just before its N-th sysfs write, or (N = "finish") just before it records
the operation's end: ``crash_run.py ROOT N pciguard-args...``."""

import os
import signal
import sys
from pathlib import Path

from fakekernel import installed
from pciguard.cli.main import main
from pciguard.platforms.linux.journal import Journal

root, kill_at, *arguments = sys.argv[1:]
if kill_at == "finish":
    Journal.finish = lambda *_: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[method-assign]
with installed(Path(root), 0 if kill_at == "finish" else int(kill_at)):
    sys.argv = ["pciguard", *arguments]
    main()
