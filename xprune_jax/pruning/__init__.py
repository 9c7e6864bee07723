"""Pruning: plans under budgets, per-architecture rules, and the surgery that rewrites (spec, variables)."""
