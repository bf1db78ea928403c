"""`warmstart` admin commands."""
