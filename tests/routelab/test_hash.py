import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis import hash_expected_load, hash_load_imbalance
from routelab import FFNExperts, MoE, validation
from routelab.corpus import load_stdlib_corpus
from routelab.routers import HashRouter
from routelab.routers.hash import STRATEGIES
from routelab.testing import RouterContract, check_routing
from solvers import greedy_partition
from solvers.tables import dispersed_table, multi_hash_table, random_table


def _seed_from_torch() -> int:
    """Contract routers draw their seed from torch's RNG, so build(seed=0) != build(seed=1)
    and the state_dict round trip really has to restore the table."""
    return int(torch.randint(0, 2**31 - 1, ()))


def _zipf_stream(vocab_size: int, n: int = 2000) -> torch.Tensor:
    probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return torch.multinomial(probs, n, replacement=True)


class TestRandomHash(RouterContract):
    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        return HashRouter.fit(
            "random", num_experts, d_model=d_model, vocab_size=self.vocab_size,
            seed=_seed_from_torch(),
        )  # fmt: skip


class TestBalancedHash(RouterContract):
    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        stream = _zipf_stream(self.vocab_size)
        return HashRouter.fit(
            "balanced", num_experts, d_model=d_model, token_ids=stream,
            vocab_size=self.vocab_size, seed=_seed_from_torch(),
        )  # fmt: skip


class TestClusteredHash(RouterContract):
    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        emb = torch.randn(self.vocab_size, 5)
        return HashRouter.fit("clustered", num_experts, d_model=d_model, embeddings=emb)


class TestDispersedHash(RouterContract):
    expect = {"k": 1}

    def make_router(self, d_model, num_experts):
        emb = torch.randn(self.vocab_size, 5)
        return HashRouter.fit(
            "dispersed", num_experts, d_model=d_model, embeddings=emb,
            token_ids=_zipf_stream(self.vocab_size), num_clusters=4,
        )  # fmt: skip


class TestMultiHash(RouterContract):
    num_experts = 6  # N * E with N = 2 hashes of E = 3 experts

    def make_router(self, d_model, num_experts):
        return HashRouter.fit(
            "multi-hash", num_experts // 2, d_model=d_model, num_hashes=2,
            vocab_size=self.vocab_size, seed=_seed_from_torch(),
        )  # fmt: skip

    def expectations(self, router, x):
        return {}  # N entries per token, weight 1 each (checked in test_multi_hash_*)


class TestModuloFallback(RouterContract):
    vocab_size = 200  # token ids drawn beyond the 50-entry table

    def make_router(self, d_model, num_experts):
        return HashRouter.fit(
            "random", num_experts, d_model=d_model, vocab_size=50, out_of_range="modulo"
        )


# ---------------------------------------------------------------------- random
RANDOM_TABLE_CODE = (
    "import hashlib;from routelab.routers import HashRouter;"
    "r=HashRouter.fit('random',64,d_model=4,vocab_size=32768,seed=7);"
    "print(hashlib.sha256(r.table.numpy().tobytes()).hexdigest())"
)


def test_random_table_is_identical_across_processes_and_hash_seeds():
    digests = []
    for hashseed in ("0", "987654321"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-c", RANDOM_TABLE_CODE],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        digests.append(out.stdout.strip())
    import hashlib

    here = HashRouter.fit("random", 64, d_model=4, vocab_size=32768, seed=7)
    digests.append(hashlib.sha256(here.table.numpy().tobytes()).hexdigest())
    assert len(set(digests)) == 1


def _splitmix64_reference(z: int) -> int:
    """SplitMix64's finaliser in pure Python integers (an independent reference)."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@given(seed=st.integers(0, 2**64 - 1), index=st.integers(0, 5), E=st.integers(1, 70))
def test_random_table_matches_a_pure_python_splitmix64(seed, index, E):
    key = _splitmix64_reference(
        _splitmix64_reference(seed) ^ ((index * 0xD1B54A32D192ED03) & ((1 << 64) - 1))
    )
    expected = [_splitmix64_reference(v ^ key) % E for v in range(40)]
    assert random_table(40, E, seed=seed, index=index).tolist() == expected


def test_random_table_known_values_and_state_dict_round_trip():
    # pinned: a change here would silently re-route every saved model
    table = torch.from_numpy(random_table(12, 4, seed=0))
    assert table.tolist() == [1, 0, 2, 3, 1, 0, 1, 0, 2, 3, 1, 3]
    assert table.dtype == torch.int64 and table.shape == (12,)
    router = HashRouter.fit("random", 4, d_model=3, vocab_size=12, seed=0)
    other = HashRouter.fit("random", 4, d_model=3, vocab_size=12, seed=1)
    assert not torch.equal(router.table, other.table)
    state = router.state_dict()
    assert set(state) == {"table"}
    other.load_state_dict(state)
    assert torch.equal(other.table, table)
    ids = torch.arange(12)
    assert torch.equal(other(torch.zeros(12, 3), ids).expert, table)


def test_random_table_spreads_tokens_evenly():
    table = torch.from_numpy(random_table(64_000, 16, seed=3))
    counts = torch.bincount(table, minlength=16).double()
    # binomial(64000, 1/16): sd ~ 61; 6 sd is far outside chance
    assert float((counts - 4000).abs().max()) < 370
    seeds = [torch.from_numpy(random_table(1000, 16, seed=s)) for s in range(3)]
    assert not torch.equal(seeds[0], seeds[1]) and not torch.equal(seeds[1], seeds[2])


@given(E=st.integers(1, 9), V=st.integers(1, 300), data=st.data())
def test_routing_is_the_table_lookup(E, V, data):
    seed = data.draw(st.integers(0, 2**40))
    router = HashRouter.fit("random", E, d_model=2, vocab_size=V, seed=seed)
    T = data.draw(st.integers(0, 30))
    ids = torch.randint(V, (T,), generator=torch.Generator().manual_seed(seed % 1000))
    routing = router(torch.randn(T, 2, dtype=torch.float64), ids)
    check_routing(routing, num_tokens=T, num_experts=E, k=1)
    assert torch.equal(routing.token, torch.arange(T))
    assert torch.equal(routing.expert, router.table[ids])
    assert routing.weight.dtype == torch.float64 and bool((routing.weight == 1).all())
    assert routing.probs is None and not routing.aux


# ---------------------------------------------------------------------- balanced
@pytest.fixture(scope="module")
def stdlib_stream():
    return load_stdlib_corpus(4096, max_files=150)


@pytest.mark.parametrize("E", [8, 32])
def test_balanced_beats_random_on_the_stdlib_stream(stdlib_stream, E):
    counts = stdlib_stream.counts
    balanced = HashRouter.fit(
        "balanced", E, d_model=4, token_ids=stdlib_stream.ids, vocab_size=4096
    )
    rand = HashRouter.fit("random", E, d_model=4, vocab_size=4096)
    b, r = hash_load_imbalance(balanced, counts), hash_load_imbalance(rand, counts)
    assert b < r
    # balanced is at (or within 1% of) the lower bound max(mean, heaviest token)
    load = hash_expected_load(balanced, counts)
    bound = max(float(load.mean()), float(counts.max()))
    assert float(load.max()) <= bound * 1.01
    # and it balances what it saw: the realised load of the training stream
    routing = balanced(torch.zeros(stdlib_stream.num_tokens, 4), stdlib_stream.ids)
    assert torch.equal(routing.load().double(), load)


def test_balanced_on_held_out_text_still_beats_random(stdlib_stream):
    ids = stdlib_stream.ids
    train, test = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    test_counts = torch.bincount(test, minlength=4096)
    balanced = HashRouter.fit("balanced", 16, d_model=4, token_ids=train, vocab_size=4096)
    rand = HashRouter.fit("random", 16, d_model=4, vocab_size=4096)
    assert hash_load_imbalance(balanced, test_counts) < hash_load_imbalance(rand, test_counts)


def test_balanced_never_worse_than_greedy_on_the_stream(stdlib_stream):
    counts = stdlib_stream.counts
    router = HashRouter.fit("balanced", 16, d_model=4, token_ids=stdlib_stream.ids)
    greedy = greedy_partition(counts[counts > 0].double(), 16)
    assert float(hash_expected_load(router, counts).max()) <= greedy.max_load


def test_balanced_unseen_tokens_keep_the_random_hash():
    stream = torch.tensor([0, 0, 1, 2, 2, 2])
    router = HashRouter.fit("balanced", 3, d_model=2, token_ids=stream, vocab_size=10, seed=5)
    assert router.table[3:].tolist() == random_table(10, 3, seed=5)[3:].tolist()
    assert sorted(router.table[:3].tolist()) == [0, 1, 2]  # three tokens, three experts


# ---------------------------------------------------------------------- clustered / dispersed
def _embeddings_with_duplicates(V=60, d=4, distinct=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(distinct, d, generator=gen)
    which = torch.randint(distinct, (V,), generator=gen)
    return base[which], which


@given(seed=st.integers(0, 10_000), E=st.integers(1, 6), extra=st.integers(0, 5))
def test_clustered_identical_embeddings_share_an_expert(seed, E, extra):
    emb, which = _embeddings_with_duplicates(seed=seed)
    router = HashRouter.fit(
        "clustered", E, d_model=2, embeddings=emb, num_clusters=E + extra, seed=seed
    )
    table = router.table
    for group in range(12):
        members = table[which == group]
        assert members.numel() == 0 or bool((members == members[0]).all())


def test_clustered_follows_clear_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    label = torch.arange(90) % 3
    emb = centres[label] + torch.randn(90, 2, generator=gen)
    table = HashRouter.fit("clustered", 3, d_model=2, embeddings=emb).table
    pairs = set(zip(label.tolist(), table.tolist()))
    assert len(pairs) == 3  # each true cluster on exactly one expert, all different


@given(
    seed=st.integers(0, 10_000),
    E=st.integers(1, 7),
    C=st.integers(1, 9),
    weighted=st.booleans(),
)
def test_dispersed_splits_each_cluster_evenly(seed, E, C, weighted):
    from solvers import kmeans

    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(50, 3, generator=gen)
    stream = torch.randint(50, (300,), generator=gen) if weighted else None
    router = HashRouter.fit(
        "dispersed", E, d_model=2, embeddings=emb, token_ids=stream, num_clusters=C,
        seed=seed,
    )  # fmt: skip
    labels = kmeans(emb, C, seed=seed, max_iter=50).labels
    for c in range(C):
        per_expert = torch.bincount(router.table[labels == c], minlength=E)
        if int(per_expert.sum()):
            assert int(per_expert.max() - per_expert.min()) <= 1, per_expert.tolist()


def test_dispersed_separates_near_duplicates_and_balances_load():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=gen) * 30
    emb = centres.repeat_interleave(8, 0) + 0.01 * torch.randn(32, 6, generator=gen)
    table = dispersed_table(emb, 8, num_clusters=4, seed=0)
    for c in range(4):  # each tight cluster of 8 uses all 8 experts once
        assert sorted(table[c * 8 : (c + 1) * 8].tolist()) == list(range(8))
    clustered = HashRouter.fit("clustered", 4, d_model=2, embeddings=emb).table
    for c in range(4):
        assert len(set(clustered[c * 8 : (c + 1) * 8].tolist())) == 1


def test_dispersed_balances_the_stdlib_stream_and_keeps_cluster_counts(stdlib_stream):
    from solvers import kmeans

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(4096, 8, generator=gen)
    counts = stdlib_stream.counts
    router = HashRouter.fit(
        "dispersed", 16, d_model=2, embeddings=emb, token_ids=stdlib_stream.ids, seed=1
    )
    rand = HashRouter.fit("random", 16, d_model=2, vocab_size=4096)
    bound = max(1.0, float(counts.max()) / (float(counts.sum()) / 16))
    assert hash_load_imbalance(router, counts) < hash_load_imbalance(rand, counts)
    assert hash_load_imbalance(router, counts) <= bound * 1.1  # random: about 2x the bound
    labels = kmeans(emb, 16, seed=1, max_iter=50).labels
    for c in range(16):  # the swap pass kept every cluster's per-expert counts even
        per_expert = torch.bincount(router.table[labels == c], minlength=16)
        assert int(per_expert.max() - per_expert.min()) <= 1


# ---------------------------------------------------------------------- multi-hash
def test_multi_hash_with_one_hash_is_plain_hash_routing():
    single = HashRouter.fit("random", 5, d_model=3, vocab_size=40, seed=11)
    multi = HashRouter.fit("multi-hash", 5, d_model=3, vocab_size=40, seed=11, num_hashes=1)
    assert multi.num_experts == 5 and multi.table.shape == (1, 40)
    assert torch.equal(multi.table[0], single.table)
    ids = torch.randint(40, (25,))
    x = torch.randn(25, 3)
    a, b = single(x, ids), multi(x, ids)
    assert torch.equal(a.token, b.token) and torch.equal(a.expert, b.expert)
    assert torch.equal(a.weight, b.weight)


@given(N=st.integers(2, 4), E=st.integers(1, 5), T=st.integers(0, 12), seed=st.integers(0, 99))
def test_multi_hash_routes_one_sub_expert_per_group(N, E, T, seed):
    router = HashRouter.fit("multi-hash", E, d_model=2, vocab_size=30, num_hashes=N, seed=seed)
    assert router.num_experts == N * E and router.num_hashes == N
    ids = torch.randint(30, (T,), generator=torch.Generator().manual_seed(seed))
    routing = check_routing(router(torch.randn(T, 2), ids), num_tokens=T, num_experts=N * E)
    assert torch.equal(routing.entries_per_token(), torch.full((T,), N))
    group = routing.expert // E
    for t in range(T):
        assert sorted(group[routing.token == t].tolist()) == list(range(N))
    table = torch.from_numpy(multi_hash_table(30, E, N, seed=seed))
    expected = (table[:, ids] + torch.arange(N)[:, None] * E).t()
    assert torch.equal(routing.expert.view(T, N), expected)
    assert bool((routing.weight == 1).all())


@pytest.mark.parametrize(("N", "E", "d", "h"), [(2, 3, 6, 8), (3, 4, 5, 9), (4, 2, 8, 16)])
def test_multi_hash_moe_equals_hand_assembled_ffn(N, E, d, h):
    torch.manual_seed(0)
    V, T = 25, 17
    router = HashRouter.fit("multi-hash", E, d_model=d, vocab_size=V, num_hashes=N, seed=2)
    experts = FFNExperts(N * E, d, h // N, bias=False).double()
    moe = MoE(router, experts)
    x = torch.randn(T, d, dtype=torch.float64)
    ids = torch.randint(V, (T,))
    y = moe(x, ids).output
    for t in range(T):
        chosen = [j * E + int(router.table[j, ids[t]]) for j in range(N)]
        A = torch.cat([experts.w_in[c] for c in chosen], dim=1)  # [d, N * (h // N)]
        B = torch.cat([experts.w_out[c] for c in chosen], dim=0)  # [N * (h // N), d]
        torch.testing.assert_close(y[t], torch.relu(x[t] @ A) @ B)


# ---------------------------------------------------------------------- errors
def test_out_of_range_ids_are_a_clear_error_by_default():
    router = HashRouter.fit("random", 4, d_model=2, vocab_size=10)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 10\).*max 10"):
        router(x, torch.tensor([1, 2, 10]))
    with pytest.raises(ValueError, match="min -1"):
        router(x, torch.tensor([-1, 2, 3]))
    with pytest.raises(ValueError, match="token_ids is required"):
        router(x)
    modulo = HashRouter.fit("random", 4, d_model=2, vocab_size=10, out_of_range="modulo")
    routing = modulo(x, torch.tensor([13, -1, 4]))
    assert routing.expert.tolist() == modulo.table[torch.tensor([3, 9, 4])].tolist()


def test_validation_off_still_refuses_out_of_range_ids():
    router = HashRouter.fit("random", 4, d_model=2, vocab_size=10)
    with validation(False), pytest.raises(IndexError):
        router(torch.randn(1, 2), torch.tensor([10]))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("nope", 4), {}, ValueError, "strategy must be one of"),
        (("random", 0), {"vocab_size": 5}, ValueError, "num_experts"),
        (("random", 4), {}, ValueError, "vocab_size is required"),
        (("balanced", 4), {"vocab_size": 5}, ValueError, "needs token_ids"),
        (("clustered", 4), {"vocab_size": 5}, ValueError, "needs embeddings"),
        (("dispersed", 4), {"vocab_size": 5}, ValueError, "needs embeddings"),
        (("multi-hash", 4), {"vocab_size": 5}, ValueError, "num_hashes"),
        (("random", 4), {"vocab_size": 5, "num_hashes": 2}, ValueError, "not used"),
        (("random", 4), {"vocab_size": 5, "embeddings": torch.zeros(5, 2)}, ValueError, "not used"),
        (("balanced", 4), {"token_ids": torch.tensor([0, 7]), "vocab_size": 5}, ValueError, "token_ids"),
        (("balanced", 4), {"token_ids": torch.tensor([0.5])}, TypeError, "token_ids"),
        (("clustered", 4), {"embeddings": torch.zeros(5, 2), "vocab_size": 6}, ValueError, "rows"),
        (("clustered", 4), {"embeddings": torch.zeros(5, 2), "num_clusters": 2}, ValueError, "num_clusters"),
        (("clustered", 4), {"embeddings": torch.zeros(3, 2)}, ValueError, "num_clusters"),
        (("random", 4), {"vocab_size": 5, "seed": -1}, ValueError, "seed"),
        (("random", 4), {"vocab_size": 5, "out_of_range": "clip"}, ValueError, "out_of_range"),
    ],
)  # fmt: skip
def test_bad_fit_arguments_are_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        HashRouter.fit(*args, d_model=2, **kwargs)


@pytest.mark.parametrize(
    ("table", "error", "match"),
    [
        (torch.tensor([0, 4]), ValueError, r"\[0, 4\)"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.zeros(2, 2, 2, dtype=torch.long), ValueError, "num_hashes"),
        (torch.zeros(0, dtype=torch.long), ValueError, "V >= 1"),
        ([0, 1], TypeError, "Tensor"),
    ],
)
def test_bad_tables_are_clear_errors(table, error, match):
    with pytest.raises(error, match=match):
        HashRouter(2, 4, table=table)


def test_every_strategy_is_covered_and_flags_are_set():
    assert set(STRATEGIES) == {"random", "balanced", "clustered", "dispersed", "multi-hash"}
    assert HashRouter.differentiable is False and HashRouter.requires_token_ids is True
    router = HashRouter(3, 2, table=torch.tensor([1, 0, 1]))
    assert router.vocab_size == 3 and router.num_experts == 2 and "custom" in repr(router)
    # works through MoE with leading batch dims and bf16
    moe = MoE(router, FFNExperts(2, 3, 4).to(torch.bfloat16))
    out = moe(torch.randn(2, 5, 3, dtype=torch.bfloat16), torch.randint(3, (2, 5)))
    assert out.output.shape == (2, 5, 3) and out.routing.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(out.routing.load().sum().item(), 10)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("random", 4), {"vocab_size": 5, "seed": 2**64}, ValueError, r"seed must be <="),
        (("random", 4), {"vocab_size": 5, "seed": 1.5}, TypeError, "seed must be an int"),
        (("random", 4), {"vocab_size": 5, "seed": True}, TypeError, "seed must be an int"),
        (("random", 2.5), {"vocab_size": 5}, TypeError, "num_experts must be an int"),
        (("random", 4), {"vocab_size": True}, TypeError, "vocab_size must be an int"),
        (("random", 4), {"vocab_size": 2**40}, ValueError, "vocab_size must be <="),
        ((None, 4), {"vocab_size": 5}, ValueError, "strategy must be one of"),
        (("balanced", 4), {"token_ids": torch.tensor([3, 10**9])}, ValueError, "pass vocab_size"),
        (("balanced", 4), {"token_ids": torch.tensor([True, False])}, TypeError, "token_ids"),
        (("balanced", 4), {"token_ids": [[1, 2], [3]]}, TypeError, "token_ids"),
        (("multi-hash", 4), {"vocab_size": 5, "num_hashes": 0}, ValueError, "num_hashes"),
        (("clustered", 2), {"embeddings": torch.randn(6, 2), "num_clusters": 2.5}, TypeError,
         "num_clusters must be an int"),
        (("clustered", 2), {"embeddings": torch.full((6, 2), float("nan"))}, ValueError,
         "embeddings must be finite"),
        (("dispersed", 2), {"embeddings": torch.randn(6)}, ValueError, r"\[V, d\]"),
        (("dispersed", 2), {"embeddings": torch.randn(6, 2), "num_clusters": 7}, ValueError,
         "num_clusters must be <= V"),
    ],
)  # fmt: skip
def test_hostile_fit_arguments_are_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        HashRouter.fit(*args, d_model=2, **kwargs)


@pytest.mark.parametrize(
    ("table", "error", "match"),
    [
        (torch.tensor([0, 9, 1, 2]), ValueError, r"expert ids in \[0, 4\).*max 9"),
        (torch.tensor([0, -1, 1, 2]), ValueError, r"min -1"),
        (torch.tensor([0.0, 1.0, 1.0, 2.0]), TypeError, "integer tensor"),
        (torch.tensor([True, False, True, True]), TypeError, "integer tensor"),
        (torch.tensor([0, 1, 2]), ValueError, "shape"),
        (torch.zeros(2, 4, dtype=torch.long), ValueError, "shape"),
    ],
)
def test_load_state_dict_refuses_bad_tables(table, error, match):
    """A float table would be cast to long silently and an id >= E route to an expert
    that does not exist (issue 10): both are refused, and the router keeps its table."""
    router = HashRouter.fit("random", 4, d_model=2, vocab_size=4, seed=3)
    before = router.table.clone()
    with pytest.raises(error, match=match):
        router.load_state_dict({"table": table})
    assert torch.equal(router.table, before)
    router.load_state_dict({"table": torch.tensor([3, 2, 1, 0])})  # a good one loads
    assert router.table.tolist() == [3, 2, 1, 0]


def test_table_builders_are_arrays_in_arrays_out():
    """solvers.tables: numpy in (or nothing) -> numpy; torch in -> torch on its device."""
    from solvers.tables import balanced_table, clustered_table

    assert isinstance(random_table(5, 2), np.ndarray)
    counts = np.array([3.0, 0.0, 1.0, 1.0])
    assert isinstance(balanced_table(counts, 2), np.ndarray)
    assert isinstance(balanced_table(torch.from_numpy(counts), 2), torch.Tensor)
    emb = torch.randn(10, 3)
    table = clustered_table(emb, 2, seed=1)
    assert isinstance(table, torch.Tensor) and table.dtype == torch.int64
    np.testing.assert_array_equal(clustered_table(emb.numpy(), 2, seed=1), table.numpy())
