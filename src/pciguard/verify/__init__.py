"""Invariants and (later) the explorer that checks them over every interleaving."""
