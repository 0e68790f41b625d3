"""The ``pciguard`` command: one module per subcommand, wired together in ``main``."""
