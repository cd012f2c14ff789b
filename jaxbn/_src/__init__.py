"""jaxbn internals: not a public API (names and modules here may change without notice)."""
