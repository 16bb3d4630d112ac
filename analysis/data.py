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
  ``routelab.deep_moe.DeepMoE`` (Eigen et al. 2013) with residual connections, so an
  image a capacity or pausing policy drops passes through a layer unchanged. An image's
  "token id" is its index in the data set: it carries no information about a held-out
  image, so hash rows do not run on digits. Labels: the digit class; the task metric
  is test accuracy.

Every model trains on the same ``steps`` batches (``Dataset.train_batches``, drawn once
from the seed). Hash tables are fitted on exactly those batches' tokens
(``fit_token_ids``); the clustered / dispersed tables cluster ``embeddings`` built from
the next- and previous-token counts of those same tokens, so they see no more text than
the learned routers train on (but they see its bigram statistics before training starts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.specialisation import frequency_buckets
from routelab._validate import require_int
from routelab.deep_moe import DeepMoE
from routelab.moe import MoE
from routelab.soft_moe import SoftMoE

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
        fit_token_ids: int64, the token ids of every training batch (their frequencies
            drive the balanced hash table).
        embeddings: float ``[vocab_size, D]`` per-id features for clustered / dispersed
            hashing (from the training batches only).
        metric: the task metric's name; ``higher_is_better`` its direction.
        unit: what one routed item is: ``"token"`` or ``"image"``.
        train_batches: the training batches, one per step, the same for every model.
        evaluation: the held-out batches.
        build_model: ``(make_layer, d_model, num_experts) -> model``; ``make_layer(i)``
            builds MoE layer i; the model's forward returns ``(logits, [routing per layer])``.
    """

    name: str
    vocab_size: int
    num_labels: int
    label_names: list[str]
    fit_token_ids: Tensor
    embeddings: Tensor
    metric: str
    higher_is_better: bool
    unit: str
    train_batches: list[Batch]
    evaluation: list[Batch]
    build_model: Callable[[Callable[[int], MoE | SoftMoE], int, int], nn.Module]
    extra: dict[str, object] = field(default_factory=dict)


class TokenLM(nn.Module):
    """A bigram-context next-token model around one MoE layer (see the module docstring).

    ``inputs int64 [T, 2]`` (previous, current token) -> logits ``[T, V]``.
    """

    def __init__(self, vocab_size: int, d_model: int, moe: MoE | SoftMoE) -> None:
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


def _cooccurrence_embeddings(batches: list[Batch], vocab_size: int, dim: int, seed: int) -> Tensor:
    """``[V, dim]`` embeddings from the SVD of log bigram counts of the training batches:
    row v counts the next and the previous id of every training position whose id is v."""
    current = torch.cat([b.token_ids for b in batches])
    previous = torch.cat([b.inputs[:, 0] for b in batches])
    following = torch.cat([b.targets for b in batches])

    def counts(other: Tensor) -> Tensor:
        flat = current * vocab_size + other
        return torch.bincount(flat, minlength=vocab_size * vocab_size).view(vocab_size, -1)

    m = torch.cat([counts(following), counts(previous)], dim=1).double().log1p()
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(m, q=dim, niter=3)
    return (u * s).float()


def _training_batches(
    draw: Callable[[torch.Generator, int], Batch], steps: int, batch_size: int, seed: int
) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed + 12345)
    return [draw(gen, batch_size) for _ in range(steps)]


def _tokens(quick: bool, seed: int, batch_size: int, steps: int) -> Dataset:
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
    train_batches = _training_batches(train, steps, batch_size, seed)

    def build_model(
        make_layer: Callable[[int], MoE | SoftMoE], d: int, num_experts: int
    ) -> nn.Module:
        return TokenLM(vocab, d, make_layer(0))

    return Dataset(
        name="tokens",
        vocab_size=vocab,
        num_labels=4,
        label_names=["freq q1 (top)", "freq q2", "freq q3", "freq q4 (tail)"],
        fit_token_ids=torch.cat([b.token_ids for b in train_batches]),
        embeddings=_cooccurrence_embeddings(train_batches, vocab, 16, seed),
        metric="val ppl",
        higher_is_better=False,
        unit="token",
        train_batches=train_batches,
        evaluation=evaluation,
        build_model=build_model,
        extra={
            "stream_tokens": int(ids.shape[0]),
            "files": len(corpus.files),
            "vocab_size": vocab,
            "training_tokens_seen": steps * batch_size,
            "held_out_tokens": num_eval,
        },
    )


def _digits(quick: bool, seed: int, batch_size: int, steps: int) -> Dataset:
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
    train_batches = _training_batches(train, steps, batch_size, seed)

    def build_model(
        make_layer: Callable[[int], MoE | SoftMoE], d: int, num_experts: int
    ) -> nn.Module:
        return DeepMoE(
            64,
            10,
            d_model=d,
            num_experts=num_experts,
            num_layers=2,
            make_layer=make_layer,
            residual=True,
        )

    return Dataset(
        name="digits",
        vocab_size=int(x.shape[0]),
        num_labels=10,
        label_names=[str(i) for i in range(10)],
        fit_token_ids=torch.cat([b.token_ids for b in train_batches]),
        embeddings=x,
        metric="test acc",
        higher_is_better=True,
        unit="image",
        train_batches=train_batches,
        evaluation=evaluation,
        build_model=build_model,
        extra={
            "train_images": int(train_idx.shape[0]),
            "test_images": int(test_idx.shape[0]),
            "training_images_seen": steps * batch_size,
        },
    )


def load_dataset(
    name: str, *, quick: bool = False, seed: int = 0, batch_size: int = 256, steps: int = 300
) -> Dataset:
    """Prepare ``"tokens"`` or ``"digits"`` with ``steps`` training batches of
    ``batch_size`` (``quick``: a small slice of the token stream, for tests)."""
    seed = require_int("seed", seed, minimum=0)
    batch_size = require_int("batch_size", batch_size, minimum=1)
    steps = require_int("steps", steps, minimum=1)
    if name == "tokens":
        return _tokens(bool(quick), seed, batch_size, steps)
    if name == "digits":
        return _digits(bool(quick), seed, batch_size, steps)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def task_loss(dataset: Dataset, logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the model's logits (both data sets are classification)."""
    return F.cross_entropy(logits, targets)
