"""Attacks and faults, each through the path an attacker or a failure takes (marked slow)."""
