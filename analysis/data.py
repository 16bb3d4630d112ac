"""The two offline data sets and the small models ``routelab compare`` trains on them.

- ``tokens``: next-token prediction on the Python standard library token stream
  (:func:`routelab.corpus.load_stdlib_corpus`). The model sees the current and the
  previous token, ``h = emb(x_t) + emb_prev(x_{t-1})``, applies one residual MoE layer
  ``h + MoE(LayerNorm(h))`` routed with ``token_ids = x_t`` (hash routers route by it),
  and predicts ``x_{t+1}``. Labels for specialisation: the frequency bucket of ``x_t``
  (equal stream mass, bucket 0 = the most frequent ids). The first 90% of the stream
  trains, the last 10% validates; the task metric is validation perplexity.
- ``digits``: scikit-learn's bundled 8x8 ``load_digits`` images (1797, 10 classes),
  pixels scaled to [0, 1], a stratified 75/25 split. The model is a two-layer
  :class:`routelab.deep_moe.DeepMoE` (Eigen et al. 2013). Hash routers route by the
  image's index in the data set (its "token id"); the clustered / dispersed strategies
  see the raw pixels as the id's embedding. Labels: the digit class; the task metric
  is test accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.specialisation import frequency_buckets
from routelab.deep_moe import DeepMoE
from routelab.experts import FFNExperts
from routelab.moe import MoE
from routelab.policies import Policy
from routelab.router import Router

__all__ = ["DATASETS", "Batch", "Dataset", "TokenLM", "load_dataset"]

DATASETS = ("tokens", "digits")


@dataclass
class Batch:
    """One batch: model inputs, ``token_ids [T]``, targets and labels ``[T]``."""

    inputs: Tensor
    token_ids: Tensor
    targets: Tensor
    labels: Tensor


@dataclass
class Dataset:
    """A prepared data set with everything the routers and models need.

    Fields:
        name: ``"tokens"`` or ``"digits"``.
        vocab_size: the number of token ids (hash tables are built over them).
        num_labels: L for the specialisation tables; ``label_names`` their names.
        fit_token_ids: int64, the training token ids (their frequencies drive the
            balanced hash table).
        embeddings: float ``[vocab_size, D]`` per-id features for clustered / dispersed
            hashing.
        metric: the task metric's name; ``higher_is_better`` its direction.
    """

    name: str
    vocab_size: int
    num_labels: int
    label_names: list[str]
    fit_token_ids: Tensor
    embeddings: Tensor
    metric: str
    higher_is_better: bool
    train: Callable[[torch.Generator, int], Batch]
    evaluation: list[Batch]
    build_model: Callable[[Callable[[int, int], tuple[Router, list[Policy]]], int, int], nn.Module]
    extra: dict[str, object] = field(default_factory=dict)


class TokenLM(nn.Module):
    """A bigram-context next-token model around one MoE layer (see the module docstring).

    ``inputs int64 [T, 2]`` (previous, current token) -> logits ``[T, V]``.
    """

    def __init__(self, vocab_size: int, d_model: int, moe: MoE) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.embed_prev = nn.Embedding(vocab_size, d_model)
        self.norm_in = nn.LayerNorm(d_model)
        self.moe = moe
        self.norm_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, inputs: Tensor, token_ids: Tensor | None = None) -> tuple[Tensor, list]:
        h = self.embed(inputs[:, 1]) + self.embed_prev(inputs[:, 0])
        out = self.moe(self.norm_in(h), inputs[:, 1] if token_ids is None else token_ids)
        h = h + out.output
        return self.head(self.norm_out(h)), [out.routing]


def _cooccurrence_embeddings(ids: Tensor, vocab_size: int, dim: int, seed: int) -> Tensor:
    """``[V, dim]`` embeddings from the SVD of log bigram counts (next and previous id)."""
    flat = ids[:-1] * vocab_size + ids[1:]
    counts = torch.bincount(flat, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)
    m = torch.cat([counts, counts.T], dim=1).double().log1p()
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(m, q=dim, niter=3)
    return (u * s).float()


def _tokens(quick: bool, seed: int, d_model: int, batch_size: int) -> Dataset:
    from routelab.corpus import load_stdlib_corpus

    if quick:
        corpus = load_stdlib_corpus(512, max_files=20, max_tokens=40_000)
    else:
        corpus = load_stdlib_corpus(2048, max_files=250)
    ids = corpus.ids
    vocab = corpus.vocab_size
    split = int(0.9 * ids.shape[0])
    train_ids, valid_ids = ids[:split], ids[split:]
    counts = torch.bincount(train_ids, minlength=vocab)
    buckets = frequency_buckets(counts, 4)

    def make(stream: Tensor, positions: Tensor) -> Batch:
        inputs = torch.stack([stream[positions - 1], stream[positions]], dim=1)
        return Batch(inputs, stream[positions], stream[positions + 1], buckets[stream[positions]])

    def train(gen: torch.Generator, size: int) -> Batch:
        positions = torch.randint(1, train_ids.shape[0] - 1, (size,), generator=gen)
        return make(train_ids, positions)

    num_eval = 512 if quick else 16384
    gen = torch.Generator().manual_seed(seed + 1)
    positions = torch.randint(1, valid_ids.shape[0] - 1, (num_eval,), generator=gen)
    evaluation = [make(valid_ids, p) for p in positions.split(batch_size * 4)]

    def build_model(make_layer, d: int, num_experts: int) -> nn.Module:
        router, policies = make_layer(d, num_experts)
        experts = FFNExperts(num_experts, d, 2 * d, activation="relu")
        return TokenLM(vocab, d, MoE(router, experts, policies))

    return Dataset(
        name="tokens",
        vocab_size=vocab,
        num_labels=4,
        label_names=["freq q1 (top)", "freq q2", "freq q3", "freq q4 (tail)"],
        fit_token_ids=train_ids,
        embeddings=_cooccurrence_embeddings(train_ids, vocab, 16, seed),
        metric="val ppl",
        higher_is_better=False,
        train=train,
        evaluation=evaluation,
        build_model=build_model,
        extra={"num_tokens": int(ids.shape[0]), "files": len(corpus.files)},
    )


def _digits(quick: bool, seed: int, d_model: int, batch_size: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    index = torch.arange(x.shape[0])
    train_idx, test_idx = train_test_split(
        index.numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)

    def make(rows: Tensor) -> Batch:
        return Batch(x[rows], rows, y[rows], y[rows])

    def train(gen: torch.Generator, size: int) -> Batch:
        return make(train_idx[torch.randint(train_idx.shape[0], (size,), generator=gen)])

    evaluation = [make(rows) for rows in test_idx.split(512)]

    def build_model(make_layer, d: int, num_experts: int) -> nn.Module:
        pending: list[list[Policy]] = []

        def make_router(dd: int, e: int) -> Router:
            router, policies = make_layer(dd, e)
            pending.append(policies)
            return router

        return DeepMoE(
            64,
            10,
            d_model=d,
            num_experts=num_experts,
            num_layers=2,
            make_router=make_router,
            make_policies=lambda i: pending[i],
        )

    return Dataset(
        name="digits",
        vocab_size=int(x.shape[0]),
        num_labels=10,
        label_names=[str(i) for i in range(10)],
        fit_token_ids=train_idx,
        embeddings=x,
        metric="test acc",
        higher_is_better=True,
        train=train,
        evaluation=evaluation,
        build_model=build_model,
        extra={"train_images": int(train_idx.shape[0]), "test_images": int(test_idx.shape[0])},
    )


def load_dataset(
    name: str, *, quick: bool = False, seed: int = 0, d_model: int = 32, batch_size: int = 256
) -> Dataset:
    """Prepare ``"tokens"`` or ``"digits"`` (``quick``: a small slice for tests)."""
    if name == "tokens":
        return _tokens(quick, seed, d_model, batch_size)
    if name == "digits":
        return _digits(quick, seed, d_model, batch_size)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def task_loss(dataset: Dataset, logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the model's logits (both data sets are classification)."""
    return F.cross_entropy(logits, targets)
