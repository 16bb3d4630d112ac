"""routelab analysis: load and specialisation metrics, recording, plots and the CLI.

- :func:`load_stats` -> :class:`LoadStats`: how balanced a routing is (CV of importance
  and load, max/mean, Gini, entropy, unused and dropped fractions, capacity utilisation).
- :func:`specialisation` -> :class:`Specialisation`: expert x label table, I(expert;
  label), purity, top labels; :func:`coactivation` across stacked layers;
  :func:`routing_stability` between checkpoints.
- :class:`RoutingRecorder`: streaming statistics of every MoE layer of a model.
- :func:`hash_expected_load` / :func:`hash_load_imbalance`: a hash table's expected load.
- :func:`representation_collapse` -> :class:`CollapseStats`: effective rank and spread of
  routed token representations (X-MoE); :func:`soft_moe_stats`: a Soft MoE layer's
  slot and combine mass, dispatch/combine entropy and specialisation over tokens.
- :mod:`analysis.plots`: PNG plots; :mod:`analysis.compare`: ``routelab compare`` /
  ``routelab sweep``.
- :mod:`analysis.counterfactual`: capacity drops, exact balanced assignment and the
  loss-free bias on a model's recorded router scores; :mod:`analysis.inspect_model`:
  ``routelab inspect-model`` on a Hugging Face MoE checkpoint (``routelab.hf``).
"""

from analysis.collapse import CollapseStats, effective_rank, representation_collapse
from analysis.hash_load import hash_expected_load, hash_load_imbalance
from analysis.metrics import (
    LoadCounter,
    LoadStats,
    coefficient_of_variation,
    concat_routings,
    gini,
    importance,
    load_stats,
    normalised_entropy,
)
from analysis.recorder import RoutingRecorder
from analysis.soft_moe import SoftMoEStats, soft_moe_stats
from analysis.specialisation import (
    Specialisation,
    coactivation,
    contingency,
    frequency_buckets,
    mutual_information,
    routing_stability,
    shuffled_baseline,
    specialisation,
)

__all__ = [
    "CollapseStats",
    "LoadCounter",
    "LoadStats",
    "RoutingRecorder",
    "SoftMoEStats",
    "Specialisation",
    "coactivation",
    "coefficient_of_variation",
    "concat_routings",
    "contingency",
    "effective_rank",
    "frequency_buckets",
    "gini",
    "hash_expected_load",
    "hash_load_imbalance",
    "importance",
    "load_stats",
    "mutual_information",
    "normalised_entropy",
    "representation_collapse",
    "routing_stability",
    "shuffled_baseline",
    "soft_moe_stats",
    "specialisation",
]
