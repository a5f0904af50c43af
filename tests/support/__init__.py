"""Helpers that start the real processes the tests talk to (stand-in cluster, OIDC provider, moto)."""
