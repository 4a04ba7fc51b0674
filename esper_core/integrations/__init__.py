"""Adapters that put the growth controller inside other frameworks' loops (each needs its extra)."""
