"""Adversarial tests: what an attacker or a careless user does, through the path they take (all slow)."""
