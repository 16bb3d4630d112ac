"""Combinatorial solvers for routing: numpy in, numpy out; torch in, torch out.

Never imports ``routelab`` or ``analysis``.
"""

__all__: list[str] = []
