"""Combinatorial solvers for routing: numpy in, numpy out; torch in, torch out.

Never imports ``routelab`` or ``analysis``.
"""

from solvers.kmeans import KMeansResult, kmeans
from solvers.partition import PartitionResult, balanced_partition, greedy_partition

__all__: list[str] = []
__all__ += ["KMeansResult", "PartitionResult", "balanced_partition", "greedy_partition", "kmeans"]

from solvers.assignment import AssignmentResult, balanced_assignment  # noqa: E402

__all__ += ["AssignmentResult", "balanced_assignment"]
