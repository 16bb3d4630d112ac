"""One registry: where each ``transformers`` MoE architecture keeps its router, and what
the router's scores mean.

A :class:`RouterSpec` names the router module's class (one call of it is one MoE
layer's routing of one batch), the layout of what it returns, and the score semantics
needed to recompute, re-select or replace its choice on the model's own scores:

    s = score(logits)                                   probs [T, E]: softmax or sigmoid
    c = s + b                                           selection scores; b [E] a selection
                                                        bias (DeepSeek-V3's
                                                        e_score_correction_bias) or 0
    groups (optional): experts split into G equal groups; a group's score is the sum of
        its two best c (``"top2_sum"``, DeepSeek-V3) or its best c (``"max"``,
        DeepSeek-V2); only the ``topk_group`` best groups stay eligible, the others'
        c set to -inf (DeepSeek-V2's code masks with 0.0: the same choice while the k
        experts fit among the positive softmax scores of the kept groups)
    chosen = TopK(c, k)                                 indices [T, k]
    w = s[chosen] / sum s[chosen]  if normalised, else s[chosen]
    w = w * scale                                       weights [T, k] (routed_scaling_factor)

The selection and weights are computed by routelab's one token-choice selection,
``routelab.routers.topk.TopKSelection`` (group ranking included: ``group_score="top2"``
or ``"max"``). Which value an option takes can depend on the checkpoint (``norm_topk_prob``,
``routed_scaling_factor``, ``topk_method``): such options name the router module's
attribute that holds it, read at run time.

Adding an architecture: read ``transformers/models/<name>/modeling_<name>.py``, find
the module that computes the router logits (the class whose output the MoE block
unpacks into expert indices and weights) and register it::

    register_architecture(RouterSpec(
        model_types=("my_moe",), router_class="MyMoeTopKRouter",
        score="softmax", normalise="norm_topk_prob"))

The tests in ``tests/routelab/test_hf.py`` check a registered spec against the model:
its re-selection on the captured scores must reproduce the model's own choice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routelab.routers.topk import TopKSelection

__all__ = [
    "ARCHITECTURES",
    "OUTPUT_LAYOUTS",
    "RouterSpec",
    "register_architecture",
    "require_transformers",
    "router_spec",
]

OUTPUT_LAYOUTS = ("logits_weights_indices", "dispatch_probs_logits")
SCORES = ("softmax", "sigmoid")
GROUP_LIMITS = (None, "top2_sum", "max")


def require_transformers() -> Any:
    """The ``transformers`` module, or an ImportError saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(
            "routelab.hf needs Hugging Face transformers (>= 5): "
            'pip install "routelab[hf]" (or pip install "transformers>=5" tokenizers safetensors)'
        ) from error


@dataclass(frozen=True)
class RouterSpec:
    """Where one architecture's router is and what its output means (module docstring).

    Fields:
        model_types: the ``config.model_type`` values this spec covers.
        router_class: class name of the router module.
        output: ``"logits_weights_indices"``: the router returns ``(logits [T, E],
            weights [T, k], indices [T, k])`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek,
            GPT-OSS); ``"dispatch_probs_logits"``: it returns ``(dispatch [B, S, E]``
            one-hot after its capacity limit, ``top probability [B, S, 1],
            logits [B, S, E])`` (Switch Transformers, top-1).
        score: ``"softmax"`` or ``"sigmoid"`` over all E logits.
        normalise: whether the chosen scores are renormalised to sum to 1: a bool, or
            the router attribute holding it (``"norm_topk_prob"``).
        scale: the factor on the weights: a number or the router attribute holding it.
        selection_bias: router attribute of a bias ``[E]`` added to the scores for
            selection only (the weights use the unbiased scores), or None.
        group_limit: None, ``"top2_sum"`` or ``"max"`` (module docstring).
        group_limit_when: ``(attribute, value)``: group limits apply only when the router's
            attribute equals value (DeepSeek-V2's ``topk_method``); None: always.
        num_groups, topk_groups: router attributes holding G and the groups kept.
        top_k: router attribute holding k, or the int k.
        capacity: router attribute holding a per-sequence capacity (Switch), or None.
        notes: where the semantics were read from, shown in reports.
    """

    model_types: tuple[str, ...]
    router_class: str
    output: str = "logits_weights_indices"
    score: str = "softmax"
    normalise: bool | str = True
    scale: float | str = 1.0
    selection_bias: str | None = None
    group_limit: str | None = None
    group_limit_when: tuple[str, object] | None = None
    num_groups: str = "num_group"
    topk_groups: str = "topk_group"
    top_k: str | int = "top_k"
    capacity: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.model_types or not all(isinstance(t, str) for t in self.model_types):
            raise ValueError(
                f"model_types must be a non-empty tuple of str, got {self.model_types!r}"
            )
        if not isinstance(self.router_class, str) or not self.router_class:
            raise ValueError(f"router_class must be a class name, got {self.router_class!r}")
        if self.output not in OUTPUT_LAYOUTS:
            raise ValueError(f"output must be one of {OUTPUT_LAYOUTS}, got {self.output!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.group_limit not in GROUP_LIMITS:
            raise ValueError(f"group_limit must be one of {GROUP_LIMITS}, got {self.group_limit!r}")

    @property
    def one_expert_per_token(self) -> bool:
        """Whether the router's output layout dispatches at most one expert per token
        (Switch's one-hot dispatch): replacements must then use k = 1."""
        return self.output == "dispatch_probs_logits"

    # ------------------------------------------------------------------ per module
    def _attr(self, module: nn.Module, value: object, field: str) -> Any:
        if not isinstance(value, str):
            return value
        if not hasattr(module, value):
            raise AttributeError(
                f"{type(module).__name__} has no attribute {value!r} (RouterSpec.{field} for "
                f"model_types {self.model_types}); the installed transformers may lay this "
                "router out differently: update the spec"
            )
        return getattr(module, value)

    def k(self, module: nn.Module) -> int:
        """The router's experts per token."""
        return int(self._attr(module, self.top_k, "top_k"))

    def normalises(self, module: nn.Module) -> bool:
        return bool(self._attr(module, self.normalise, "normalise"))

    def scale_of(self, module: nn.Module) -> float:
        return float(self._attr(module, self.scale, "scale"))

    def bias_of(self, module: nn.Module) -> Tensor | None:
        """The selection bias ``[E]`` (fp32) or None."""
        if self.selection_bias is None:
            return None
        return self._attr(module, self.selection_bias, "selection_bias").detach().float()

    def groups_of(self, module: nn.Module) -> tuple[int, int] | None:
        """``(G, groups kept)`` where group limits apply to this router, else None."""
        if self.group_limit is None:
            return None
        if self.group_limit_when is not None:
            attr, value = self.group_limit_when
            if self._attr(module, attr, "group_limit_when") != value:
                return None
        return (
            int(self._attr(module, self.num_groups, "num_groups")),
            int(self._attr(module, self.topk_groups, "topk_groups")),
        )

    # ------------------------------------------------------------------ semantics
    def scores(self, logits: Tensor) -> Tensor:
        """``s = score(logits)`` in fp32: ``[T, E]`` (sigmoid scores are not normalised
        over the experts: they are what the router selects on and weights with)."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, -1)

    def selection(self, module: nn.Module, k: int, *, groups: bool = True) -> TopKSelection:
        """The router's selection as routelab's one token-choice selection
        (``routelab.routers.topk.TopKSelection``), group limits included."""
        limit = self.groups_of(module) if groups else None
        return TopKSelection(
            k=k,
            score=self.score,
            normalize=self.normalises(module),
            scaling_factor=self.scale_of(module),
            num_groups=None if limit is None else limit[0],
            top_groups=None if limit is None else limit[1],
            group_score="max" if self.group_limit == "max" else "top2",
        )

    def select(
        self,
        scores: Tensor,
        module: nn.Module,
        k: int | None = None,
        extra_bias: Tensor | None = None,
    ) -> Tensor:
        """int64 ``[T, k]``: the experts the router chooses on ``scores [T, E]`` (k default:
        the router's own); ``extra_bias [E]`` is added to its selection bias (a
        counterfactual loss-free bias)."""
        k = self.k(module) if k is None else k
        scores = scores.float()
        bias = self.bias_of(module)
        if extra_bias is not None:
            extra = extra_bias.to(scores.device, torch.float32)
            bias = extra if bias is None else bias.to(scores.device) + extra
        if bias is not None:
            bias = bias.to(scores.device)
        chosen = self.selection(module, k).select_scores(scores, selection_bias=bias)
        return chosen.indices

    def combine(self, scores: Tensor, indices: Tensor, module: nn.Module) -> Tensor:
        """float ``[T, k]``: the router's combine weights of ``indices [T, k]``."""
        selection = self.selection(module, indices.shape[1], groups=False)
        return selection.select_scores(scores.float(), indices=indices).weights

    # ------------------------------------------------------------------ output layout
    def unpack(
        self, module: nn.Module, output: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(logits [T, E], indices [T, k], weights [T, k], kept bool [T, k] | None)`` of
        one router call. ``kept`` is None where the router has no capacity limit."""
        if self.output == "logits_weights_indices":
            logits, weights, indices = output[0], output[1], output[2]
            E = logits.shape[-1]
            return logits.reshape(-1, E), indices.reshape(indices.shape[0], -1), weights, None
        dispatch, top_prob, logits = output[0], output[1], output[2]
        E = logits.shape[-1]
        logits = logits.reshape(-1, E)
        dispatch = dispatch.reshape(-1, E)
        indices = self.scores(logits).argmax(-1, keepdim=True)
        kept = dispatch.gather(1, indices) > 0
        return logits, indices, top_prob.reshape(-1, 1), kept

    def pack(
        self, module: nn.Module, output: Any, indices: Tensor, weights: Tensor, valid: Tensor
    ) -> Any:
        """A router output in this architecture's layout carrying ``indices [T, k']`` with
        ``weights [T, k']``; entries where ``valid [T, k']`` is False get weight 0 (and are
        not dispatched where the layout says so). ``output`` is the router's own output
        (for shapes and dtypes)."""
        if self.output == "logits_weights_indices":
            logits, old_weights, old_indices = output[0], output[1], output[2]
            w = torch.where(valid, weights, torch.zeros_like(weights)).to(old_weights.dtype)
            idx = torch.where(valid, indices, torch.zeros_like(indices)).to(old_indices.dtype)
            return (logits, w, idx, *tuple(output[3:]))
        dispatch, top_prob, logits = output[0], output[1], output[2]
        if indices.shape[1] != 1:
            raise ValueError(
                f"{self.router_class} dispatches one expert per token; the replacement "
                f"routing gives up to {indices.shape[1]} (use k = 1)"
            )
        E = dispatch.shape[-1]
        onehot = torch.nn.functional.one_hot(indices[:, 0], E) * valid.to(torch.long)
        new_dispatch = onehot.to(dispatch.dtype).view(dispatch.shape)
        new_prob = weights.to(top_prob.dtype).view(top_prob.shape)
        return (new_dispatch, new_prob, logits, *tuple(output[3:]))


ARCHITECTURES: dict[str, RouterSpec] = {}


def register_architecture(spec: RouterSpec, *, replace: bool = False) -> RouterSpec:
    """Add ``spec`` under each of its ``model_types`` (``replace`` to override one)."""
    if not isinstance(spec, RouterSpec):
        raise TypeError(f"spec must be a RouterSpec, got {type(spec).__name__}")
    for model_type in spec.model_types:
        if model_type in ARCHITECTURES and not replace:
            raise ValueError(f"model_type {model_type!r} is registered already (pass replace=True)")
    for model_type in spec.model_types:
        ARCHITECTURES[model_type] = spec
    return spec


def _looks_like_router(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Router" in name or name.endswith("Gate")


def router_spec(model: nn.Module) -> RouterSpec:
    """The registered :class:`RouterSpec` of a ``transformers`` model, or a ValueError that
    names what is missing and how to add it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"model must be a transformers PreTrainedModel with config.model_type, got "
            f"{type(model).__name__}"
        )
    candidates = sorted({type(m).__name__ for m in model.modules() if _looks_like_router(m)})
    hint = (
        f"router-like modules in this model: {candidates}"
        if candidates
        else "no module in this model looks like a router (a class named *Router or *Gate)"
    )
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise ValueError(
            f"no router adapter is registered for model_type {model_type!r} "
            f"({type(model).__name__}); registered: {sorted(ARCHITECTURES)}. {hint}. To add "
            f"it, read transformers/models/{model_type}/modeling_{model_type}.py and call "
            "routelab.hf.register_architecture(RouterSpec(model_types=("
            f"{model_type!r},), router_class=<the router module's class>, output=<layout of "
            "its return value>, score='softmax'|'sigmoid', normalise=..., scale=..., "
            "selection_bias=..., group_limit=...)) (see routelab/hf/registry.py)"
        )
    if spec.router_class not in candidates and not any(
        type(m).__name__ == spec.router_class for m in model.modules()
    ):
        version = getattr(require_transformers(), "__version__", "?")
        raise ValueError(
            f"model_type {model_type!r} is registered with router class "
            f"{spec.router_class!r}, but this model (transformers {version}) has no such "
            f"module; {hint}. Update the RouterSpec for this transformers version"
        )
    return spec


_TOP_K_SOFTMAX_NORM = "softmax over all experts, top-k, renormalised if norm_topk_prob"

for _spec in (
    RouterSpec(
        ("mixtral",),
        "MixtralTopKRouter",
        normalise=True,
        notes="softmax over all experts, top-k, always renormalised",
    ),
    RouterSpec(
        ("qwen2_moe",), "Qwen2MoeTopKRouter", normalise="norm_topk_prob", notes=_TOP_K_SOFTMAX_NORM
    ),
    RouterSpec(
        ("qwen3_moe",), "Qwen3MoeTopKRouter", normalise="norm_topk_prob", notes=_TOP_K_SOFTMAX_NORM
    ),
    RouterSpec(
        ("olmoe",), "OlmoeTopKRouter", normalise="norm_topk_prob", notes=_TOP_K_SOFTMAX_NORM
    ),
    RouterSpec(
        ("flex_olmo",), "FlexOlmoTopKRouter", normalise="norm_topk_prob", notes=_TOP_K_SOFTMAX_NORM
    ),
    *(
        RouterSpec(
            (model_type,),
            router_class,
            score="sigmoid",
            normalise="norm_topk_prob",
            scale="routed_scaling_factor",
            selection_bias="e_score_correction_bias",
            group_limit="top2_sum",
            notes="sigmoid scores; selection on scores + e_score_correction_bias within the "
            "topk_group best of n_group groups (group score: sum of its two best); weights "
            "the unbiased scores, renormalised if norm_topk_prob, times routed_scaling_factor",
        )
        for model_type, router_class in (
            ("deepseek_v3", "DeepseekV3TopkRouter"),
            ("glm4_moe", "Glm4MoeTopkRouter"),
            ("dots1", "Dots1TopkRouter"),
        )
    ),
    RouterSpec(
        ("deepseek_v2",),
        "DeepseekV2TopkRouter",
        normalise=False,
        scale="routed_scaling_factor",
        group_limit="max",
        group_limit_when=("topk_method", "group_limited_greedy"),
        notes="softmax over all experts; group_limited_greedy keeps the topk_group groups "
        "with the best expert; weights not renormalised, times routed_scaling_factor",
    ),
    RouterSpec(
        ("gpt_oss",),
        "GptOssTopKRouter",
        normalise=True,
        notes="top-k of the logits (with the router bias), softmax over the chosen k: "
        "equal to renormalised softmax probabilities",
    ),
    RouterSpec(
        ("switch_transformers",),
        "SwitchTransformersTop1Router",
        output="dispatch_probs_logits",
        normalise=False,
        top_k=1,
        capacity="expert_capacity",
        notes="softmax, top-1, weight the top probability; tokens beyond expert_capacity "
        "per sequence (in position order) are dropped",
    ),
):
    register_architecture(_spec)
