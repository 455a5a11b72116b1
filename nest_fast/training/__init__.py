"""Training helpers for ``python -m nest_fast.train`` (Lightning is imported by :mod:`.module`, not here)."""
