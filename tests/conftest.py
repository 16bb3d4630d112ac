"""Hypothesis profiles: ``ci`` (derandomised, modest example counts, the default under
CI=true), ``dev`` (the default otherwise) and ``thorough`` (HYPOTHESIS_PROFILE=thorough)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Two cores: intra-op threads beyond that only oversubscribe the machine.
torch.set_num_threads(min(2, torch.get_num_threads()))
