"""``python -m pciguard``: the same as the ``pciguard`` command."""

from pciguard.cli.main import main

main()
