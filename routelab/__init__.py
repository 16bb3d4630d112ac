"""routelab: a research toolkit for Mixture-of-Experts routing."""

from routelab.experts import ExpertDispatch, Experts, FFNExperts, ModuleExperts
from routelab.moe import MoE, MoEOutput
from routelab.router import Router, set_validation, validation, validation_enabled
from routelab.routing import Routing

__all__ = [
    "ExpertDispatch",
    "Experts",
    "FFNExperts",
    "MoE",
    "MoEOutput",
    "ModuleExperts",
    "Router",
    "Routing",
    "set_validation",
    "validation",
    "validation_enabled",
]
__version__ = "0.1.0"
