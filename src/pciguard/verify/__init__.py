"""The verifier: invariants, and the explorer that checks them over every interleaving.
Its hot modules run compiled when the install could compile them (``compiled``)."""

from pciguard.verify.compiled import use_compiled

#: Why the verifier runs as Python (None: it runs compiled).
NOT_COMPILED = use_compiled(__path__)
