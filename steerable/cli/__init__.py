"""The `steerable` command line."""
