"""Pruning: channel groups and removable units traced from the jaxpr, plans under budgets, and the generic
surgery that rewrites (spec, variables)."""
