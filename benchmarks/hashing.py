"""Hash routing: fit time per strategy, and the cost of routing next to the experts.

Run: ``python benchmarks/hashing.py`` (``--quick`` for small sizes). One run prints:

1. **fit**: ``HashRouter.fit`` wall time per strategy on the standard-library token
   stream (``routelab.corpus``: the first 1M tokens of the whole library's stream
   with its V = 32768 vocabulary, E = 64), with the max/mean
   expected load each table gives on that stream. ``clustered`` / ``dispersed``
   cluster a Gaussian ``[V, 64]`` embedding table (a stand-in for trained
   embeddings: the timing depends on the shape, not the values). Target: seconds.
2. **route vs experts**: forward time of the hash router (one gather) against
   ``FFNExperts`` on the routing it produced, and against a learned ``TopKGate``
   (k = 1) for context, with routelab's input validation on (default) and off, at T = 8192, d = 512, h = 2048, E = 16; side by side,
   interleaved; prints the ratio route / FFNExperts.
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import time_side_by_side  # first: it keeps benchmarks/ off sys.path

from analysis import hash_load_imbalance
from routelab import FFNExperts, validation
from routelab.corpus import load_stdlib_corpus
from routelab.routers import HashRouter, TopKGate

FULL = {
    "tokens": 1_000_000,
    "vocab": 32768,
    "fit_experts": 64,
    "T": 8192,
    "d": 512,
    "h": 2048,
    "E": 16,
}
QUICK = {
    "tokens": 100_000,
    "vocab": 4096,
    "fit_experts": 16,
    "T": 1024,
    "d": 128,
    "h": 256,
    "E": 16,
}


def bench_fit(tokens: int, vocab: int, experts: int) -> None:
    start = time.perf_counter()
    corpus = load_stdlib_corpus(vocab)  # the whole library, so V ids all occur
    load_s = time.perf_counter() - start
    stream = corpus.ids[:tokens]
    counts = torch.bincount(stream, minlength=corpus.vocab_size)
    V = corpus.vocab_size
    print(
        f"[fit] stdlib stream: first {stream.numel()} of {corpus.num_tokens} tokens, V={V}, "
        f"E={experts} (full corpus load {load_s:.2f} s, cached per process after that)"
    )
    emb = torch.randn(V, 64, generator=torch.Generator().manual_seed(0))
    runs = {
        "random": {"vocab_size": V},
        "balanced": {"token_ids": stream, "vocab_size": V},
        "clustered": {"embeddings": emb, "token_ids": stream},
        "dispersed": {"embeddings": emb, "token_ids": stream},
        "multi-hash": {"vocab_size": V, "num_hashes": 4},
    }
    for strategy, kwargs in runs.items():
        start = time.perf_counter()
        router = HashRouter.fit(strategy, experts, d_model=8, **kwargs)
        seconds = time.perf_counter() - start
        imbalance = hash_load_imbalance(router, counts)
        print(f"  {strategy:10s} fit {seconds:7.2f} s   max/mean expected load {imbalance:6.3f}")
    heaviest = float(counts.max()) / (float(counts.sum()) / experts)
    print(f"  (lower bound on max/mean: heaviest token / mean load = {max(1.0, heaviest):.3f})")


def bench_route(T: int, d: int, h: int, E: int, repeats: int) -> None:
    torch.manual_seed(0)
    V = 32768
    router = HashRouter.fit("random", E, d_model=d, vocab_size=V)
    gate = TopKGate(d, E, k=1)
    experts = FFNExperts(E, d, h)
    x = torch.randn(T, d)
    ids = torch.randint(V, (T,))
    routing = router(x, ids)

    def unvalidated():
        with validation(False):
            return router(x, ids)

    with torch.no_grad():
        times = time_side_by_side(
            {
                "hash route": lambda: router(x, ids),
                "hash route, validation off": unvalidated,
                "TopKGate route": lambda: gate(x),
                "FFNExperts": lambda: experts(x, routing),
            },
            repeats=repeats,
        )
    print(f"[route vs experts] fp32 forward, T={T} d={d} h={h} E={E}, median of {repeats}")
    for name, seconds in times.items():
        print(f"  {name:27s} {seconds * 1e3:9.3f} ms")
    ffn = times["FFNExperts"]
    print(f"  hash route / FFNExperts                 = {times['hash route'] / ffn:.5f}")
    print(
        f"  hash route (validation off) / FFNExperts = {times['hash route, validation off'] / ffn:.5f}"
    )
    print(
        f"  hash route / TopKGate route             = {times['hash route'] / times['TopKGate route']:.3f}"
    )
    print(
        "  (with validation on, the base class's isfinite(x) check dominates the hash route; "
        "the lookup itself is one gather)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    print(f"threads={torch.get_num_threads()}")
    bench_fit(cfg["tokens"], cfg["vocab"], cfg["fit_experts"])
    bench_route(cfg["T"], cfg["d"], cfg["h"], cfg["E"], args.repeats)


if __name__ == "__main__":
    main()
