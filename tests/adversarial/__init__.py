"""Adversarial tests (issue 14): what an attacker or a careless user does, through real processes."""
