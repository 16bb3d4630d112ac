"""``routelab lifelong``: Lifelong-MoE against sequential fine-tuning on real data streams,
pruning / merging of a trained layer by its routing statistics, and sparse upcycling.

Two sequences of data distributions that ship offline:

- ``stdlib``: next-token prediction (the :class:`analysis.data.TokenLM` model) on the
  Python standard library's source, one distribution per package family, in this
  order: text processing, networking, concurrency, GUI (:data:`FAMILIES`). One
  vocabulary over all families (the most frequent tokens, ties by the token string,
  as :func:`routelab.corpus.load_stdlib_corpus` builds it; ``vocab_size`` with
  ``"<unk>"``). Each family's files are tokenised by :func:`routelab.corpus.tokenize`
  in path order and sampled as evenly spaced chunks of :data:`CHUNK` tokens (at most
  ``tokens_per_family``), so a family is its whole set of files, not the first few;
  every 10th chunk is held out for evaluation. Quality: evaluation perplexity.
- ``digits``: class-incremental digits (scikit-learn's ``load_digits``): classes 0-4,
  then 5-9, on the two-layer :class:`routelab.deep_moe.DeepMoE`; quality: test accuracy
  on each phase's classes, predicting among all 10 classes (no task id).

Methods, trained phase after phase from the same seed and batches:

- ``dense``: the same model with one FFN (hidden width k times an expert's, the MoE's
  active compute) in place of the MoE layer, fine-tuned on each phase;
- ``moe-finetune``: one fixed MoE (E experts, top-k), fine-tuned on each phase;
- ``lifelong-moe``: Lifelong-MoE (Chen et al. 2023): before every new phase each MoE
  layer gains ``grow`` experts (copies of the experts the new data uses most, recorded
  by :class:`analysis.RoutingRecorder`), the old experts and the old gate columns are
  frozen (:func:`routelab.lifecycle.expand_model`), and the loss adds the output-level
  regulariser ``distill_weight * distillation_loss(model(x), previous_model(x))`` on the
  new data (for digits: on the classes seen before);
- ``lifelong-moe-noreg``: the same without the regulariser;
- ``lifelong-moe-replay``: the same with the regulariser and a replay buffer of
  ``replay_size`` training examples per earlier phase, mixed into every batch
  (``replay_fraction`` of it);
- ``moe-replay``: the fixed MoE fine-tuned with the same replay buffer (what replay
  alone does, without growth, freezing or the regulariser).

After every phase each model is evaluated on every distribution: ``R[i][j]`` is the
quality on distribution j after training phase i. Reported per method (Chaudhry et al.
2018; Lopez-Paz & Ranzato 2017), with "gain" meaning accuracy, or minus the loss for
perplexity (forgetting is computed on the log scale, nats per token):

- final: the mean quality over all distributions after the last phase (the geometric
  mean for perplexities);
- forgetting: mean over j < last of ``max_{i in [j, last)} gain[i][j] - gain[last][j]``;
- backward transfer: mean over j < last of ``gain[last][j] - gain[j][j]``;
- forward transfer: mean over j > 0 of ``gain[j-1][j] - gain_init[j]`` (zero-shot
  quality on the next distribution relative to the untrained model);
- plasticity: mean of ``gain[j][j]`` (how well each new distribution was learnt).

Pruning and merging (:func:`prune_merge_study`, on the ``routelab compare`` data and
model, :func:`analysis.data.load_dataset`): a top-k MoE is trained, its loads recorded
on the training data with :class:`analysis.RoutingRecorder`, then each layer loses
half its experts by pruning the least used, pruning at random, MC-SMoE merging (groups
around the most used experts by router-probability similarity, frequency-weighted
averages) and uniform merging; the task metric before and after (no fine-tuning).
Sparse upcycling (:func:`upcycle_study`): a dense model trained for half the steps,
upcycled into an MoE (the same function at that point) and trained on, against the
dense model continued and an MoE trained from scratch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.data import Batch, TokenLM, load_dataset
from analysis.recorder import RoutingRecorder
from routelab import FFNExperts, MoE
from routelab.corpus import UNK, stdlib_files, tokenize
from routelab.deep_moe import DeepMoE
from routelab.lifecycle import (
    distillation_loss,
    expand_model,
    merge_experts,
    moe_layers,
    prune_experts,
    upcycle_ffn,
)
from routelab.routers import TopKGate

__all__ = [
    "FAMILIES",
    "METHODS",
    "STREAMS",
    "LifelongSettings",
    "MethodResult",
    "Stream",
    "lifelong",
    "load_stream",
    "prune_merge_study",
    "run_method",
    "summarise",
    "upcycle_study",
]

STREAMS = ("stdlib", "digits")
METHODS = (
    "dense",
    "moe-finetune",
    "lifelong-moe",
    "lifelong-moe-noreg",
    "lifelong-moe-replay",
    "moe-replay",
)

FAMILIES: dict[str, tuple[str, ...]] = {
    "text": (
        "re/", "html/", "xml/", "json/", "csv.py", "difflib.py", "textwrap.py", "string.py",
        "gettext.py", "locale.py", "configparser.py", "shlex.py", "pprint.py", "tokenize.py",
    ),
    "network": (
        "http/", "urllib/", "email/", "xmlrpc/", "wsgiref/", "smtplib.py", "imaplib.py",
        "ftplib.py", "poplib.py", "nntplib.py", "socket.py", "socketserver.py", "ssl.py",
        "ipaddress.py", "mailbox.py",
    ),
    "concurrency": (
        "asyncio/", "multiprocessing/", "concurrent/", "threading.py", "queue.py",
        "subprocess.py", "selectors.py", "sched.py", "contextvars.py",
    ),
    "gui": ("tkinter/", "idlelib/", "turtle.py", "turtledemo/", "curses/"),
}  # fmt: skip
"""Standard-library package families, in stream order (path prefixes under the stdlib)."""

CHUNK = 512
"""Tokens per contiguous chunk of a family's stream; every 10th chunk is held out."""


@dataclass
class LifelongSettings:
    """Sizes of one lifelong run (the defaults finish in a few minutes on 2 CPU cores)."""

    steps_per_phase: int = 150
    d_model: int = 32
    num_experts: int = 4
    k: int = 2
    grow: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    distill_weight: float = 1.0
    temperature: float = 2.0
    replay_size: int = 256
    replay_fraction: float = 0.25
    vocab_size: int = 2048
    tokens_per_family: int = 60_000
    eval_tokens: int = 4096
    prune_steps: int = 300
    recover_steps: int = 30
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls, seed: int = 0) -> LifelongSettings:
        return cls(
            steps_per_phase=6,
            d_model=16,
            batch_size=32,
            replay_size=32,
            vocab_size=256,
            tokens_per_family=3000,
            eval_tokens=256,
            prune_steps=8,
            recover_steps=2,
            seed=seed,
            quick=True,
        )


# ---------------------------------------------------------------------- the streams
@dataclass
class Phase:
    """One distribution: training batches, evaluation batches, the classes it holds."""

    name: str
    train: Callable[[torch.Generator, int], Batch]
    evaluation: list[Batch]
    classes: int | None = None  # digits: the classes seen once this phase is learnt


@dataclass
class Stream:
    """A sequence of distributions and the model family trained on it."""

    name: str
    phases: list[Phase]
    metric: str
    higher_is_better: bool
    build: Callable[[int, bool], nn.Module]  # (seed, dense) -> model
    info: dict[str, Any] = field(default_factory=dict)


def _family_files(files: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    return [f for f in files if any(f == p or f.startswith(p) for p in prefixes)]


def _family_tokens(prefixes: Sequence[str], root: str, cap: int | None = None) -> list[str]:
    """The tokens of the family's files, in path order (undecodable files skipped);
    reading stops once ``cap`` tokens are read (quick runs)."""
    tokens: list[str] = []
    for name in _family_files(stdlib_files(root), prefixes):
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="strict") as f:
                tokens += tokenize(f.read())
        except (UnicodeDecodeError, OSError):
            continue
        if cap is not None and len(tokens) >= cap:
            break
    return tokens


def _spread_chunks(n: int, limit: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """At most ``limit`` positions of a stream of ``n`` as evenly spaced chunks of ``chunk``
    (so a family is sampled across all its files, not just the first ones)."""
    count = max(1, min(n // chunk, limit // chunk))
    stride = n / count
    return [(int(i * stride), min(n, int(i * stride) + chunk)) for i in range(count)]


def _stdlib_stream(settings: LifelongSettings) -> Stream:
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    texts = {}
    for family, prefixes in FAMILIES.items():
        cap = 10 * settings.tokens_per_family if settings.quick else None
        tokens = _family_tokens(prefixes, root, cap)
        spans = _spread_chunks(len(tokens), settings.tokens_per_family)
        texts[family] = [tokens[a:b] for a, b in spans]
    counts: dict[str, int] = {}
    for chunks in texts.values():
        for chunk in chunks:
            for t in chunk:
                counts[t] = counts.get(t, 0) + 1
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[: settings.vocab_size - 1]
    index = {t: i + 1 for i, t in enumerate(ranked)}
    vocab = len(ranked) + 1
    phases = []
    for p, (family, chunks) in enumerate(texts.items()):
        ids = [torch.tensor([index.get(t, 0) for t in c], dtype=torch.int64) for c in chunks]
        held = {i for i in range(len(ids)) if i % 10 == 9} or {len(ids) - 1}
        held_out = [c for i, c in enumerate(ids) if i in held]
        train = [c for i, c in enumerate(ids) if i not in held]
        phases.append(_token_phase(family, torch.cat(train), torch.cat(held_out), settings, p))

    d, E, k = settings.d_model, settings.num_experts, settings.k

    def build(seed: int, dense: bool) -> nn.Module:
        torch.manual_seed(seed)
        if dense:
            moe = MoE(TopKGate(d, 1, k=1), FFNExperts(1, d, 2 * d * k))
        else:
            moe = MoE(TopKGate(d, E, k=k), FFNExperts(E, d, 2 * d))
        return TokenLM(vocab, d, moe)

    info = {
        "vocab_size": vocab,
        "unk": UNK,
        "tokens": {f: sum(map(len, c)) for f, c in texts.items()},
        "unk_fraction": {
            f: sum(1 for chunk in c for t in chunk if t not in index) / max(sum(map(len, c)), 1)
            for f, c in texts.items()
        },
    }
    return Stream("stdlib", phases, "val ppl", False, build, info)


def _token_phase(
    name: str, train_ids: Tensor, valid_ids: Tensor, settings: LifelongSettings, p: int
) -> Phase:
    def make(stream: Tensor, positions: Tensor) -> Batch:
        inputs = torch.stack([stream[positions - 1], stream[positions]], dim=1)
        return Batch(inputs, stream[positions], stream[positions + 1], stream[positions])

    def train(gen: torch.Generator, size: int) -> Batch:
        return make(train_ids, torch.randint(1, train_ids.shape[0] - 1, (size,), generator=gen))

    gen = torch.Generator().manual_seed(settings.seed + 1000 + p)
    n = min(settings.eval_tokens, valid_ids.shape[0] - 2)
    positions = torch.randperm(valid_ids.shape[0] - 2, generator=gen)[:n] + 1
    evaluation = [make(valid_ids, q) for q in positions.split(1024)]
    return Phase(name, train, evaluation)


def _digits_stream(settings: LifelongSettings) -> Stream:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(x.shape[0]).numpy(), test_size=0.25, random_state=settings.seed,
        stratify=y.numpy(),
    )  # fmt: skip
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    phases = []
    for classes in [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]:
        wanted = torch.tensor(classes)
        tr = train_idx[torch.isin(y[train_idx], wanted)]
        te = test_idx[torch.isin(y[test_idx], wanted)]

        def make(rows: Tensor) -> Batch:
            return Batch(x[rows], rows, y[rows], y[rows])

        def train(gen: torch.Generator, size: int, tr: Tensor = tr) -> Batch:
            return make(tr[torch.randint(tr.shape[0], (size,), generator=gen)])

        name = f"digits {classes[0]}-{classes[-1]}"
        phases.append(Phase(name, train, [make(te)], classes=max(classes) + 1))

    d, E, k = settings.d_model, settings.num_experts, settings.k

    def build(seed: int, dense: bool) -> nn.Module:
        torch.manual_seed(seed)
        if dense:
            return DeepMoE(
                64, 10, d_model=d, num_experts=1, d_hidden=2 * d * k, residual=True,
                make_router=lambda dd, e: TopKGate(dd, e, k=1),
            )  # fmt: skip
        return DeepMoE(
            64, 10, d_model=d, num_experts=E, residual=True,
            make_router=lambda dd, e: TopKGate(dd, e, k=k),
        )  # fmt: skip

    info = {"train_images": int(train_idx.shape[0]), "test_images": int(test_idx.shape[0])}
    return Stream("digits", phases, "test acc", True, build, info)


def load_stream(name: str, settings: LifelongSettings) -> Stream:
    """The named stream (``"stdlib"`` or ``"digits"``) at these settings."""
    if name == "stdlib":
        return _stdlib_stream(settings)
    if name == "digits":
        return _digits_stream(settings)
    raise ValueError(f"stream must be one of {STREAMS}, got {name!r}")


# ---------------------------------------------------------------------- training
def _forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(logits, summed aux loss)`` of either model family."""
    out = model(batch.inputs, batch.token_ids)
    logits, routings = out[0], out[1]
    aux = sum((r.aux_loss for r in routings), torch.zeros(()))
    return logits, aux


def _cat(batches: Sequence[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in Batch.__dataclass_fields__))


@torch.no_grad()
def evaluate(model: nn.Module, phase: Phase, higher_is_better: bool) -> float:
    """Accuracy, or perplexity ``exp(mean NLL)``, on the phase's evaluation batches."""
    was = model.training
    model.eval()
    nll = correct = total = 0.0
    for batch in phase.evaluation:
        logits, _ = _forward(model, batch)
        nll += float(F.cross_entropy(logits, batch.targets, reduction="sum"))
        correct += float((logits.argmax(1) == batch.targets).sum())
        total += batch.targets.shape[0]
    model.train(was)
    return correct / max(total, 1) if higher_is_better else math.exp(nll / max(total, 1))


@torch.no_grad()
def _loads_on(model: nn.Module, batch: Batch) -> list[Tensor]:
    """Every MoE layer's load ``[E]`` on ``batch`` (eval-mode routing), via the recorder."""
    was = model.training
    model.eval()
    with RoutingRecorder(model, mode="eval") as recorder:
        _forward(model, batch)
        loads = [recorder.stats(i).load for i in range(len(recorder.layer_names))]
    model.train(was)
    return loads


def _expand(model: nn.Module, batch: Batch, settings: LifelongSettings) -> nn.Module:
    """Lifelong-MoE's expansion: every layer gains ``grow`` experts copied from those the
    new data uses most (per layer), gate columns copied with noise; old ones frozen."""
    loads = _loads_on(model, batch)
    expansion = expand_model(
        model,
        settings.grow,
        init="copy",
        gate="copy",
        noise=0.5,
        layer_loads=loads,
        seed=settings.seed,
    )
    return expansion.model


@dataclass
class MethodResult:
    """One method on one stream: the quality matrix and its summary."""

    method: str
    matrix: list[list[float]]  # [phase trained][distribution evaluated]
    initial: list[float]  # the untrained model on every distribution
    summary: dict[str, float]
    parameters: list[int]  # parameter count after each phase
    seconds: float
    metric: str = ""
    higher_is_better: bool = True


def run_method(stream: Stream, method: str, settings: LifelongSettings) -> MethodResult:
    """Train ``method`` through the stream's phases; evaluate after each."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    model = stream.build(settings.seed, method == "dense")
    hib = stream.higher_is_better
    initial = [evaluate(model, ph, hib) for ph in stream.phases]
    lifelong = method.startswith("lifelong")
    regularise = lifelong and method != "lifelong-moe-noreg"
    replay = method.endswith("-replay")
    gen = torch.Generator().manual_seed(settings.seed + 7)
    buffer: list[Batch] = []
    matrix, parameters = [], []
    seen_classes = None
    for p, phase in enumerate(stream.phases):
        teacher = None
        if p > 0 and lifelong:
            probe = phase.train(torch.Generator().manual_seed(settings.seed + 99 + p), 512)
            teacher = copy.deepcopy(model).eval() if regularise else None
            model = _expand(model, probe, settings)
        trainable = [q for q in model.parameters() if q.requires_grad]
        optimiser = torch.optim.Adam(trainable, lr=settings.lr)
        model.train()
        replay_n = int(settings.replay_fraction * settings.batch_size) if buffer else 0
        pool = _cat(buffer) if buffer else None
        for _ in range(settings.steps_per_phase):
            batch = phase.train(gen, settings.batch_size - replay_n)
            if pool is not None and replay_n:
                pick = torch.randint(pool.targets.shape[0], (replay_n,), generator=gen)
                batch = _cat(
                    [batch, Batch(*(getattr(pool, f)[pick] for f in Batch.__dataclass_fields__))]
                )
            logits, aux = _forward(model, batch)
            loss = F.cross_entropy(logits, batch.targets) + aux
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits, _ = _forward(teacher, batch)
                if seen_classes is not None:
                    teacher_logits = teacher_logits[:, :seen_classes]
                loss = loss + settings.distill_weight * distillation_loss(
                    logits, teacher_logits, temperature=settings.temperature
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if replay:
            buffer.append(
                phase.train(
                    torch.Generator().manual_seed(settings.seed + 500 + p), settings.replay_size
                )
            )
        seen_classes = phase.classes
        matrix.append([evaluate(model, ph, hib) for ph in stream.phases])
        parameters.append(sum(q.numel() for q in model.parameters()))
    summary = summarise(matrix, initial, hib)
    seconds = time.perf_counter() - start
    return MethodResult(method, matrix, initial, summary, parameters, seconds, stream.metric, hib)


def summarise(
    matrix: Sequence[Sequence[float]], initial: Sequence[float], higher_is_better: bool
) -> dict[str, float]:
    """Final quality, forgetting, backward / forward transfer and plasticity (see the
    module docstring); perplexities are compared as log-perplexity (nats per token)."""
    P = len(matrix)

    def gain(v: float) -> float:
        return v if higher_is_better else -math.log(v)

    g = [[gain(v) for v in row] for row in matrix]
    g0 = [gain(v) for v in initial]
    last = P - 1
    old = range(last)
    forgetting = [max(g[i][j] for i in range(j, last)) - g[last][j] for j in old]
    backward = [g[last][j] - g[j][j] for j in old]
    forward = [g[j - 1][j] - g0[j] for j in range(1, P)]
    final = [matrix[last][j] for j in range(P)]
    if higher_is_better:
        final_mean = sum(final) / P
    else:  # geometric mean of the perplexities
        final_mean = math.exp(sum(math.log(v) for v in final) / P)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        "final": final_mean,
        "forgetting": mean(forgetting),
        "backward_transfer": mean(backward),
        "forward_transfer": mean(forward),
        "plasticity": mean([g[j][j] for j in range(P)]),
    }


# ---------------------------------------------------------------------- prune / merge
def _calibration(model: nn.Module, batches: Sequence[Batch]) -> tuple[list[Tensor], list[Tensor]]:
    """Per MoE layer: the load ``[E]`` (RoutingRecorder, eval routings) and the router
    probabilities ``[T, E]`` on ``batches``."""
    layers = moe_layers(model)
    probs: list[list[Tensor]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_hook(lambda m, i, o, j=j: probs[j].append(o.routing.probs.detach()))
        for j, (_, layer) in enumerate(layers)
    ]
    model.eval()
    with torch.no_grad(), RoutingRecorder(model, mode="eval") as recorder:
        for batch in batches:
            _forward(model, batch)
        loads = [recorder.stats(i).load for i in range(len(layers))]
    for h in hooks:
        h.remove()
    return loads, [torch.cat(p) for p in probs]


def _no_training(gen: torch.Generator, size: int) -> Batch:
    raise RuntimeError("this phase is for evaluation only")


def _replace_layers(model: nn.Module, make: Callable[[int, MoE], MoE]) -> nn.Module:
    new = copy.deepcopy(model)
    for j, (name, layer) in enumerate(moe_layers(new)):
        parent_name, _, attr = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, attr, make(j, layer))
    return new


def _topk_layer(d: int, E: int, k: int) -> Callable[[int], MoE]:
    """``make_layer`` of the studies: a top-k gate over E FFN experts of hidden width 2d."""
    return lambda i: MoE(TopKGate(d, E, k=min(k, E)), FFNExperts(E, d, 2 * d))


def _train(model: nn.Module, batches: Sequence[Batch], lr: float) -> nn.Module:
    """Adam (a fresh optimiser) on the task loss plus the aux losses, one step per batch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        logits, aux = _forward(model, batch)
        loss = F.cross_entropy(logits, batch.targets) + aux
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model


def _study_data(dataset: str, settings: LifelongSettings) -> Any:
    """The compare data set for the one-layer studies (upcycling, pruning and merging):
    ``settings.prune_steps`` batches."""
    return load_dataset(
        dataset, quick=settings.quick, seed=settings.seed, batch_size=settings.batch_size,
        steps=settings.prune_steps,
    )  # fmt: skip


def upcycle_study(dataset: str, settings: LifelongSettings) -> dict[str, Any]:
    """Sparse upcycling (Komatsuzaki et al. 2023) on the compare data: a dense model
    (one FFN of width 2d) trained for half the steps is upcycled into a top-k MoE of
    ``2 * num_experts`` copies with a fresh router, and trained for the second half;
    against the dense model continued for the second half and an MoE trained from
    scratch for all the steps (every run restarts Adam)."""
    E = 2 * settings.num_experts
    d, k = settings.d_model, settings.k
    data = _study_data(dataset, settings)
    batches = data.train_batches
    half = len(batches) // 2
    phase = Phase(dataset, _no_training, data.evaluation)
    hib = data.higher_is_better
    torch.manual_seed(settings.seed)
    dense = _train(data.build_model(_topk_layer(d, 1, 1), d, 1), batches[:half], settings.lr)
    upcycled = _replace_layers(dense, lambda j, m: upcycle_ffn(m.experts, TopKGate(d, E, k=k)))
    rows = [
        {"variant": f"dense after {half} steps", "experts": 1, "metric": evaluate(dense, phase, hib)},
        {"variant": "upcycled, before training", "experts": E,
         "metric": evaluate(upcycled, phase, hib)},
    ]  # fmt: skip
    _train(dense, batches[half:], settings.lr)
    _train(upcycled, batches[half:], settings.lr)
    torch.manual_seed(settings.seed)
    scratch = _train(data.build_model(_topk_layer(d, E, k), d, E), batches, settings.lr)
    steps = len(batches)
    rows += [
        {"variant": f"dense, {steps} steps", "experts": 1, "metric": evaluate(dense, phase, hib)},
        {"variant": f"upcycled at {half}, {steps} steps", "experts": E,
         "metric": evaluate(upcycled, phase, hib)},
        {"variant": f"MoE from scratch, {steps} steps", "experts": E,
         "metric": evaluate(scratch, phase, hib)},
    ]  # fmt: skip
    return {"dataset": dataset, "metric_name": data.metric, "rows": rows}


def prune_merge_study(dataset: str, settings: LifelongSettings) -> dict[str, Any]:
    """Train a top-k MoE on the compare data set, then halve its experts four ways."""
    E = 2 * settings.num_experts
    d, k = settings.d_model, settings.k
    data = _study_data(dataset, settings)
    torch.manual_seed(settings.seed)
    model = data.build_model(_topk_layer(d, E, k), d, E)
    _train(model, data.train_batches, settings.lr)
    loads, probs = _calibration(model, data.train_batches[:8])
    phase = Phase(dataset, _no_training, data.evaluation)
    hib = data.higher_is_better
    keep = E // 2
    rand = torch.Generator().manual_seed(settings.seed + 11)
    random_keep = [torch.randperm(E, generator=rand)[:keep].tolist() for _ in loads]
    variants: dict[str, Callable[[int, MoE], MoE]] = {
        "prune least used": lambda j, m: prune_experts(m, loads[j], num_remove=E - keep).moe,
        "prune random": lambda j, m: prune_experts(m, loads[j], keep=random_keep[j]).moe,
        "merge MC-SMoE": lambda j, m: (
            merge_experts(m, loads[j], num_groups=keep, features=probs[j].t()).moe
        ),
        "merge uniform": lambda j, m: (
            merge_experts(m, torch.ones(E), num_groups=keep, features=probs[j].t()).moe
        ),
    }
    recover = data.train_batches[: settings.recover_steps]

    def row(name: str, experts: int, candidate: nn.Module) -> dict[str, Any]:
        before = evaluate(candidate, phase, hib)
        _train(candidate, recover, settings.lr)  # every row: the same extra steps
        return {"variant": name, "experts": experts, "metric": before,
                "after_recovery": evaluate(candidate, phase, hib)}  # fmt: skip

    smaller = {name: _replace_layers(model, make) for name, make in variants.items()}
    rows = [row(f"trained (E = {E})", E, model)]
    rows += [row(name, keep, candidate) for name, candidate in smaller.items()]
    return {
        "dataset": dataset,
        "metric_name": data.metric,
        "rows": rows,
        "recover_steps": len(recover),
        "loads": [lo.tolist() for lo in loads],
    }


# ---------------------------------------------------------------------- report
def _plot(stream: Stream, results: Sequence[MethodResult], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    P = len(stream.phases)
    fig = Figure(figsize=(3.2 * P, 3.2))
    FigureCanvasAgg(fig)
    for j, phase in enumerate(stream.phases):
        ax = fig.add_subplot(1, P, j + 1)
        for r in results:
            ax.plot(range(1, P + 1), [row[j] for row in r.matrix], marker="o", label=r.method)
        ax.axvline(j + 1, color="grey", lw=0.8, ls=":")
        ax.set_title(f"on {phase.name}", fontsize=9)
        ax.set_xlabel("after phase")
        ax.set_xticks(range(1, P + 1))
        if not stream.higher_is_better:
            ax.set_yscale("log")
        if j == 0:
            ax.set_ylabel(stream.metric)
    fig.axes[-1].legend(fontsize=7)
    fig.suptitle(f"{stream.name}: quality on every distribution after each phase", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def summary_table(results: Sequence[MethodResult]) -> str:
    """The markdown forgetting table of one stream (one row per method)."""
    if not results:
        return ""
    metric = results[0].metric
    unit = "acc" if results[0].higher_is_better else "nats"
    head = [
        "method", f"final {metric}", f"forgetting ({unit})", f"backward transfer ({unit})",
        f"forward transfer ({unit})", "parameters",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r.summary
        lines.append(
            f"| {r.method} | {s['final']:.3f} | {s['forgetting']:.3f} | "
            f"{s['backward_transfer']:+.3f} | {s['forward_transfer']:+.3f} | {r.parameters[-1]} |"
        )
    return "\n".join(lines)


def matrix_table(stream: Stream, result: MethodResult) -> str:
    names = [p.name for p in stream.phases]
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i, row in enumerate(result.matrix):
        lines.append(f"| {names[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def _prune_table(study: dict[str, Any]) -> str:
    recovery = "after_recovery" in study["rows"][0]
    head = f"| variant | experts | {study['metric_name']} |"
    if recovery:
        head += f" after {study['recover_steps']} more steps |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in study["rows"]:
        line = f"| {row['variant']} | {row['experts']} | {row['metric']:.3f} |"
        if recovery:
            line += f" {row['after_recovery']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def lifelong(
    out: str | Path,
    *,
    streams: Sequence[str] = STREAMS,
    methods: Sequence[str] = METHODS,
    settings: LifelongSettings | None = None,
    prune: bool = True,
    progress: bool = True,
) -> dict[str, list[MethodResult]]:
    """Run every method on every stream; write ``report.md``, ``metrics.json`` and one PNG
    per stream into ``out``. Returns ``{stream: [MethodResult per method]}``."""
    settings = settings or LifelongSettings()
    for name in streams:
        if name not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {name!r}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, list[MethodResult]] = {}
    loaded: dict[str, Stream] = {}
    bar = tqdm(total=len(streams) * len(methods), disable=not progress, unit="run")
    for name in streams:
        stream = loaded[name] = load_stream(name, settings)
        results[name] = []
        for method in methods:
            bar.set_description(f"{name} / {method}")
            results[name].append(run_method(stream, method, settings))
            bar.update(1)
    bar.close()
    studies = [prune_merge_study(d, settings) for d in ("tokens", "digits")] if prune else []
    upcycling = [upcycle_study(d, settings) for d in ("tokens", "digits")] if prune else []
    plots = {name: str(_plot(loaded[name], rows, out / f"{name}_forgetting.png").name)
             for name, rows in results.items()}  # fmt: skip
    wall = time.perf_counter() - start
    metrics = {
        "settings": asdict(settings),
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "streams": {
            name: {
                "phases": [p.name for p in loaded[name].phases],
                "metric": loaded[name].metric,
                "info": loaded[name].info,
                "results": [asdict(r) for r in rows],
            }
            for name, rows in results.items()
        },
        "prune_merge": studies,
        "upcycling": upcycling,
        "plots": plots,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "report.md").write_text(
        _report(loaded, results, studies, upcycling, plots, settings, wall)
    )
    return results


def _report(
    loaded, results, studies, upcycling, plots, settings: LifelongSettings, wall: float
) -> str:
    s = settings
    lines = [
        "# routelab lifelong",
        "",
        f"d_model = {s.d_model}, E = {s.num_experts} experts (top-{s.k}), +{s.grow} experts per "
        f"new phase for Lifelong-MoE, {s.steps_per_phase} Adam steps (lr {s.lr}) of "
        f"{s.batch_size} examples per phase, distillation weight {s.distill_weight} at "
        f"temperature {s.temperature}, replay {s.replay_size} examples per earlier phase "
        f"({s.replay_fraction:.0%} of each batch), seed {s.seed}"
        f"{' (quick)' if s.quick else ''}; {wall:.0f} s in all.",
        "",
        "forgetting: mean over earlier distributions of the best quality reached minus the "
        "final one (accuracy, or nats per token for perplexity; lower is better). Backward "
        "transfer: final minus just-learnt quality. Forward transfer: zero-shot quality on "
        "the next distribution minus the untrained model's (on class-incremental digits no "
        "model predicts a class it was not trained on, so this is minus the untrained "
        "model's chance hits).",
        "",
        "Lifelong-MoE's expansion: each MoE layer gains experts copied from the ones the new "
        "data uses most (loads from `analysis.RoutingRecorder` on 512 new examples), gate "
        "columns copied with noise (0.5 std); old experts and old gate columns frozen by "
        "gradient masks; embeddings, norms and head keep training.",
    ]
    for name, rows in results.items():
        stream = loaded[name]
        lines += [
            "",
            f"## {name}: {' -> '.join(p.name for p in stream.phases)}",
            "",
            summary_table(rows),
            "",
            f"![forgetting]({plots[name]})",
        ]
        for r in rows:
            lines += ["", f"### {r.method} ({stream.metric})", "", matrix_table(stream, r)]
    if studies:
        lines += [
            "",
            "## Pruning and merging by routing statistics",
            "",
            "A top-k MoE trained on the `routelab compare` data; loads and router "
            "probabilities recorded on 8 training batches; half the experts of every layer "
            "removed; the metric right after, and after the same few more training steps "
            "(the first training batches again) for every row, the trained model included, "
            "each with a fresh Adam.",
        ]
        for study in studies:
            lines += ["", f"### {study['dataset']}", "", _prune_table(study)]
    if upcycling:
        lines += [
            "",
            "## Sparse upcycling",
            "",
            f"A dense model (one FFN) trained for half of {s.prune_steps} steps, upcycled into "
            f"{2 * s.num_experts} copies with a fresh top-{s.k} router (the same function at "
            "that point) and trained on; against the dense model continued and an MoE trained "
            "from scratch on the same batches.",
        ]
        for study in upcycling:
            lines += ["", f"### {study['dataset']}", "", _prune_table(study)]
    return "\n".join(lines) + "\n"


def run_cli(args: Any) -> int:
    """``routelab lifelong``: settings from the parsed arguments, run, print the tables."""
    settings = LifelongSettings.quick_settings(args.seed) if args.quick else LifelongSettings()
    settings.seed = args.seed
    for name, attr in (("steps", "steps_per_phase"), ("grow", "grow")):
        if getattr(args, name) is not None:
            setattr(settings, attr, getattr(args, name))
    if args.distill_weight is not None:
        settings.distill_weight = args.distill_weight
    streams = STREAMS if args.stream == "all" else (args.stream,)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = lifelong(
            args.out,
            streams=streams,
            methods=getattr(args, "methods", None) or METHODS,
            settings=settings,
            prune=not args.no_prune,
            progress=not args.no_progress,
        )
    finally:
        torch.set_num_threads(previous)
    for name, rows in results.items():
        print(f"\n## {name}\n")
        print(summary_table(rows))
    print(f"\nreport: {args.out}/report.md")
    return 0
