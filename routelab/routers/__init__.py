"""Routers: one file per family, all returning a :class:`routelab.Routing`."""

from routelab.routers.topk import TopKGate

__all__ = ["TopKGate"]
