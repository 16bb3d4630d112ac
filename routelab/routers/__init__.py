"""Routers: one file per family, all returning a :class:`routelab.Routing`."""

from routelab.routers.base_layer import BASERouter
from routelab.routers.dselect_k import DSelectKGate
from routelab.routers.expert_choice import ExpertChoiceRouter
from routelab.routers.hash import HashRouter
from routelab.routers.noisy_topk import NoisyTopKGate
from routelab.routers.sinkhorn import SinkhornRouter
from routelab.routers.softmax import SoftmaxGate
from routelab.routers.switch import SwitchGate
from routelab.routers.topk import TopKGate

__all__ = [
    "BASERouter",
    "DSelectKGate",
    "ExpertChoiceRouter",
    "HashRouter",
    "NoisyTopKGate",
    "SinkhornRouter",
    "SoftmaxGate",
    "SwitchGate",
    "TopKGate",
]
