"""Library recipes that generate and then estimate (stage 7: after evaluate, before sweeps/serve and the CLI)."""
