"""Scaling out on Ray (the optional extra `steerable[ray]`): sweeps and calibration on Ray Core actors, serving on
Ray Serve. Nothing here imports Ray at module level: the core package works without it."""
