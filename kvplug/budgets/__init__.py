"""Budgets: how many tokens each layer and KV head keeps, given the scorer's ranking."""
