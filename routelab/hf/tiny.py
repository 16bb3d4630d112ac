"""Tiny random checkpoints of every registered architecture, and loading one back.

For tests and examples, offline: :func:`train_tokenizer` trains a byte-level BPE
tokenizer with ``tokenizers`` on text (default: a few standard-library files);
:func:`tiny_checkpoint` builds a randomly initialised model from the architecture's
own ``transformers`` config class (2 layers, 4-8 experts, width 32; weights drawn
with std 0.2 so that experts matter to the loss), makes its routers
decisive (router weights drawn with std 0.5, a random selection bias where the router
has one, as DeepSeek-V3's) and
writes model and tokenizer with ``save_pretrained``; :func:`load_pretrained` loads a
checkpoint directory exactly as a user's checkpoint is loaded (``AutoTokenizer`` and
``AutoModelForCausalLM``, or ``AutoModelForSeq2SeqLM`` for encoder-decoders), with
nothing downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routelab.hf.registry import require_transformers, router_spec

__all__ = ["TINY_CONFIGS", "load_pretrained", "stdlib_text", "tiny_checkpoint", "train_tokenizer"]

_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,  # experts large enough that a router swap moves the loss
}
_GROUPED = {
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 0,
    "n_shared_experts": 1,
}
_DEEPSEEK = {
    **_GROUPED,
    "q_lora_rank": None,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}

# Per model_type: the config keywords of a tiny model (vocab_size comes from the tokenizer).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_DECODER,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        **_DECODER,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "head_dim": 16,
    },
    "olmoe": {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {**_DECODER, **_DEEPSEEK, "routed_scaling_factor": 2.5},
    "deepseek_v2": {**_DECODER, **_DEEPSEEK, "topk_method": "group_limited_greedy"},
    "glm4_moe": {**_DECODER, **_GROUPED, "routed_scaling_factor": 1.5, "head_dim": 16},
    "dots1": {**_DECODER, **_GROUPED, "norm_topk_prob": False, "head_dim": 16},
    "flex_olmo": {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True},
    "gpt_oss": {
        **_DECODER,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 16,
    },
    "switch_transformers": {
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 2,
        "num_experts": 4,
        "expert_capacity": 24,
        "encoder_sparse_step": 1,
        "decoder_sparse_step": 1,
        "decoder_start_token_id": 0,
    },
}


def stdlib_text(max_files: int = 8, *, offset: int = 0) -> list[str]:
    """The text of ``max_files`` standard-library files (from the ``offset``-th, in the
    order :func:`routelab.corpus.stdlib_files` lists them)."""
    from routelab.corpus import _stdlib_root, stdlib_files

    root = _stdlib_root()
    texts = []
    for name in stdlib_files(root)[offset:]:
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                texts.append(f.read())
        except (UnicodeDecodeError, OSError):
            continue
        if len(texts) >= max_files:
            break
    return texts


def train_tokenizer(texts: list[str] | None = None, *, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer (a ``transformers`` fast tokenizer) trained offline with
    ``tokenizers`` on ``texts`` (default :func:`stdlib_text`); ``vocab_size`` >= 260."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = stdlib_text() if texts is None else texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )


def _sharpen_routers(model: nn.Module, seed: int) -> None:
    spec = router_spec(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ != spec.router_class:
                continue
            for param in module.parameters():
                if param.dim() == 2:
                    param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            if spec.selection_bias is not None:
                bias = getattr(module, spec.selection_bias)
                bias.copy_(0.05 * torch.randn(bias.shape, generator=gen))


def tiny_checkpoint(
    model_type: str,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``model_type`` model and its tokenizer to ``path``
    (``save_pretrained``); returns the path. ``tokenizer`` default: :func:`train_tokenizer`."""
    transformers = require_transformers()
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    tokenizer = train_tokenizer() if tokenizer is None else tokenizer
    keywords = {
        **TINY_CONFIGS[model_type],
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        **config_overrides,
    }
    config = transformers.AutoConfig.for_model(model_type, **keywords)
    torch.manual_seed(seed)
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if config.is_encoder_decoder
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_config(config)
    _sharpen_routers(model, seed)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_pretrained(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a local ``save_pretrained`` directory, model in eval mode;
    never downloads (``local_files_only``)."""
    transformers = require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer
