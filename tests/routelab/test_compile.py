"""torch.compile(MoE(router, experts), fullgraph=True) with validation off (issue 17, item 5).

Each token-choice router (and expert choice) compiles without a graph break and gives
eager's output, routing, auxiliary losses, gradients and balancing state, for two
training steps with the explicit balancing update between them (the second step must
run the same graph: the updated bias or coefficient is a buffer, not a constant).

The backend is ``aot_eager``: dynamo's full graph and AOTAutograd's joint forward +
backward graph, the parts that break on data-dependent sizes and host syncs, at about a
second per router on two cores. Inductor's code generation is checked by the opt-in
``ROUTELAB_TEST_INDUCTOR=1`` run of the same cases (4 to 40 s each, about 3 min).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn

import routelab
from routelab import FFNExperts, MoE
from routelab.balancing import update_balancing
from routelab.null_experts import NullExperts
from routelab.routers import (
    CosineTopKGate,
    ExpertChoiceRouter,
    MoEPlusPlusGate,
    NoisyTopKGate,
    ReMoEGate,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
    TopKRouter,
    TopPGate,
)

D, E, H = 8, 8, 12  # d_model, experts, hidden size
B, S = 2, 6  # x [B, S, d]: the sequence-wise loss sees S = 6

# name -> factory of (router, experts); every loss the router has is on
CASES: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
    "TopKGate": lambda: (TopKGate(D, E, k=2, z_weight=1e-2), FFNExperts(E, D, H)),
    "TopKRouter balance": lambda: (
        TopKRouter(D, E, k=2, balance_weight=1e-2, z_weight=1e-3),
        FFNExperts(E, D, H),
    ),
    "TopKRouter deepseek-v3": lambda: (  # sigmoid, groups, selection bias, sequence loss
        TopKRouter.from_preset("deepseek-v3", D, E, k=2, num_groups=4, top_groups=2),
        FFNExperts(E, D, H),
    ),
    "TopKRouter deepseek-v2": lambda: (
        TopKRouter.from_preset("deepseek-v2", D, E, k=2, num_groups=4, top_groups=2),
        FFNExperts(E, D, H),
    ),
    "TopKRouter qwen3-moe": lambda: (  # global-batch balance loss (GlobalLoadCounts)
        TopKRouter.from_preset("qwen3-moe", D, E, k=2),
        FFNExperts(E, D, H),
    ),
    "TopKRouter qwen2-moe": lambda: (
        TopKRouter.from_preset("qwen2-moe", D, E, k=2),
        FFNExperts(E, D, H),
    ),
    "TopKRouter mixtral": lambda: (TopKRouter.from_preset("mixtral", D, E), FFNExperts(E, D, H)),
    "SwitchGate": lambda: (SwitchGate(D, E, z_weight=1e-3), FFNExperts(E, D, H)),
    "NoisyTopKGate": lambda: (NoisyTopKGate(D, E, k=2), FFNExperts(E, D, H)),
    "SoftmaxGate": lambda: (SoftmaxGate(D, E), FFNExperts(E, D, H)),
    "CosineTopKGate": lambda: (CosineTopKGate(D, E, k=2), FFNExperts(E, D, H)),
    "TopPGate": lambda: (TopPGate(D, E), FFNExperts(E, D, H)),
    "ReMoEGate": lambda: (ReMoEGate(D, E, k=2), FFNExperts(E, D, H)),
    "MoEPlusPlusGate": lambda: (
        MoEPlusPlusGate(D, E + 3, k=2, num_null=3),
        NullExperts(FFNExperts(E, D, H), num_zero=1, num_copy=1, num_constant=1),
    ),
    "ExpertChoiceRouter": lambda: (ExpertChoiceRouter(D, E), FFNExperts(E, D, H)),
}


NAMES = [*CASES, "MoE++ residual"]  # and two linked MoE++ layers (_GatingResidualPair)


class _GatingResidualPair(nn.Module):
    """Two MoE++ layers, the second gate adding the first's logits (gating residual)."""

    def __init__(self) -> None:
        super().__init__()
        first = MoEPlusPlusGate(D, E + 2, k=2, num_null=2)
        second = MoEPlusPlusGate(D, E + 2, k=2, num_null=2, residual_from=first)
        self.layers = nn.ModuleList(
            MoE(gate, NullExperts(FFNExperts(E, D, H), num_constant=0)) for gate in (first, second)
        )

    def forward(self, x: torch.Tensor):
        return self.layers[1](self.layers[0](x).output)  # the second layer's MoEOutput


def _train_step(layer: nn.Module, model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One step of ``layer`` (``model`` or its compiled form): forward, backward of
    ``<y, grad> + aux_loss``, then the explicit balancing update. Returns what must match."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # NoisyTopKGate's noise: the same draw in both runs
    out = layer(x)
    routing = out.routing
    ((out.output * grad).sum() + out.aux_loss).backward()
    update_balancing(model)
    got = {"output": out.output.detach(), "x.grad": x.grad}
    got |= {f"aux[{k}]": v.detach() for k, v in routing.aux.items()}
    got |= {"token": routing.token, "expert": routing.expert, "weight": routing.weight.detach()}
    got |= {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
    got |= {n: b.clone() for n, b in model.named_buffers()}
    return got


def _check_compiled_equals_eager(name: str, backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = (_GatingResidualPair() if name == "MoE++ residual" else MoE(*CASES[name]())).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x, grad = torch.randn(B, S, D), torch.randn(B, S, D)
    with routelab.validation(False):
        for step in range(2):
            # the second step reuses the first graph (state lives in buffers)
            stance = "fail_on_recompile" if step else "default"
            with torch.compiler.set_stance(stance):
                got = _train_step(compiled, model, x, grad)
            want = _train_step(eager, eager, x, grad)
            assert got.keys() == want.keys(), name
            assert any(key.endswith(".grad") and key != "x.grad" for key in got), name
            for key, value in want.items():
                where = f"{name}, step {step}: {key}"
                torch.testing.assert_close(
                    got[key],
                    value,
                    atol=1e-5,
                    rtol=1e-5,
                    msg=lambda m, where=where: f"{where}\n{m}",
                )


@pytest.mark.parametrize("name", NAMES)
def test_compiled_moe_fullgraph_equals_eager(name):
    _check_compiled_equals_eager(name, "aot_eager")


@pytest.mark.skipif(
    os.environ.get("ROUTELAB_TEST_INDUCTOR") != "1",
    reason="inductor code generation: opt-in (ROUTELAB_TEST_INDUCTOR=1), about 3 min in all",
)
@pytest.mark.parametrize("name", NAMES)
def test_inductor_moe_fullgraph_equals_eager(name, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # eager's noise draws
    _check_compiled_equals_eager(name, "inductor")
