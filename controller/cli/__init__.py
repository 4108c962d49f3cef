"""The `coffer` operator command line."""
