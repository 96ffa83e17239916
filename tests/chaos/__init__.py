"""The chaos suite (pytest -m chaos): faults injected into a loaded fleet of real processes."""
