"""Hugging Face ``transformers`` MoE checkpoints seen through routelab.

Adapters, not forks: forward hooks on a model's own router modules turn each MoE
layer's router output into a :class:`routelab.Routing` (with ``probs [T, E]``), and a
hook can replace that output by a routelab policy or router applied to the model's
own scores. Nothing of the model's code is copied; one registry
(:mod:`routelab.hf.registry`) says where each architecture's router is and what its
scores mean.

- :func:`router_spec`, :data:`ARCHITECTURES`, :func:`register_architecture`,
  :class:`RouterSpec`: the registry.
- :class:`RoutingCapture`: record every MoE layer's Routing during a normal forward.
- :func:`swap_router` with :class:`TopK`, :class:`Balanced`, :class:`Hash` or any
  Routing -> Routing policy (``CapacityPolicy`` ...): run the model with a layer's
  router replaced; :func:`next_token_loss` measures the change.
- :mod:`routelab.hf.tiny`: tiny random checkpoints of every registered architecture and
  a tokenizer trained offline (tests, examples).

``transformers`` is an optional dependency (``pip install routelab[hf]``); this
package imports it only where a model is built or loaded.
"""

from routelab.hf.capture import LayerRouting, RoutingCapture, find_routers
from routelab.hf.registry import (
    ARCHITECTURES,
    RouterSpec,
    register_architecture,
    require_transformers,
    router_spec,
)
from routelab.hf.swap import Balanced, Hash, TopK, balanced_topk, next_token_loss, swap_router

__all__ = [
    "ARCHITECTURES",
    "Balanced",
    "Hash",
    "LayerRouting",
    "RouterSpec",
    "RoutingCapture",
    "TopK",
    "balanced_topk",
    "find_routers",
    "next_token_loss",
    "register_architecture",
    "require_transformers",
    "router_spec",
    "swap_router",
]
