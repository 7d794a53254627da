"""The fault-injection suite's fixtures (defined in faultkit.py)."""

from faultkit import served_sandbox  # noqa: F401 - a fixture, registered by the import
