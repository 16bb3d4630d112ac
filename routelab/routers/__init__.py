"""Routers: one file per family, all returning a :class:`routelab.Routing`."""

from routelab.routers.base_layer import BalancedAssignmentRouter, BASERouter
from routelab.routers.cosine import CosineTopKGate
from routelab.routers.dselect_k import DSelectKGate
from routelab.routers.expert_choice import ExpertChoiceRouter
from routelab.routers.hash import HashRouter
from routelab.routers.moe_plus_plus import MoEPlusPlusGate
from routelab.routers.noisy_topk import NoisyTopKGate
from routelab.routers.remoe import ReMoEGate
from routelab.routers.sinkhorn import SinkhornRouter
from routelab.routers.softmax import SoftmaxGate
from routelab.routers.switch import SwitchGate
from routelab.routers.top_p import TopPGate
from routelab.routers.topk import TokenChoiceRouter, TopKGate, TopKRouter, TopKSelection

__all__ = [
    "BASERouter",
    "BalancedAssignmentRouter",
    "CosineTopKGate",
    "DSelectKGate",
    "ExpertChoiceRouter",
    "HashRouter",
    "MoEPlusPlusGate",
    "NoisyTopKGate",
    "ReMoEGate",
    "SinkhornRouter",
    "SoftmaxGate",
    "SwitchGate",
    "TokenChoiceRouter",
    "TopKGate",
    "TopKRouter",
    "TopKSelection",
    "TopPGate",
]
