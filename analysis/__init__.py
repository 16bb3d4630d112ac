"""routelab analysis: load and specialisation metrics, recording, plots and the CLI.

- :func:`load_stats` -> :class:`LoadStats`: how balanced a routing is (CV of importance
  and load, max/mean, Gini, entropy, unused and dropped fractions, capacity utilisation).
- :func:`specialisation` -> :class:`Specialisation`: expert x label table, I(expert;
  label), purity, top labels; :func:`coactivation` across stacked layers;
  :func:`routing_stability` between checkpoints.
- :class:`RoutingRecorder`: streaming statistics of every MoE layer of a model.
- :mod:`analysis.plots`: PNG plots; :mod:`analysis.compare`: ``routelab compare`` /
  ``routelab sweep``.
"""

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
    "LoadCounter",
    "LoadStats",
    "RoutingRecorder",
    "Specialisation",
    "coactivation",
    "coefficient_of_variation",
    "concat_routings",
    "contingency",
    "frequency_buckets",
    "gini",
    "importance",
    "load_stats",
    "mutual_information",
    "normalised_entropy",
    "routing_stability",
    "shuffled_baseline",
    "specialisation",
]
