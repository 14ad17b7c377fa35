"""Mergers: parts that share storage between layers (MiniCache)."""
