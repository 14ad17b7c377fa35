"""Scorers: which tokens a layer keeps (higher score = kept first)."""
