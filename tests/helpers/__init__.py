"""Shared test helpers: one fake method context, the CLI runners, tiny runs, callbacks."""
