"""Apply steering plans: pure per-token interventions, one validator, hooks that always come off."""
