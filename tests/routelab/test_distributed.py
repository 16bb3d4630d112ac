"""Expert parallelism on real processes (gloo on 127.0.0.1, world sizes 2 and 4).

Each world size is one spawned run (``_dist_workers.run_group``) that goes through all
its cases; the tests below assert on the per-rank results. Every case compares the
expert-parallel layer on each rank's chunk with a single-process reference on the
concatenated batch: the output slice, the input gradient slice, the expert-shard
gradients against the matching slice of the full experts' gradients, and the router
gradients summed over the ranks against the reference router gradients.
"""

from __future__ import annotations

import pytest
import torch

from routelab import FFNExperts
from routelab.distributed import ExpertParallelMoE, expert_range, shard_experts
from routelab.routers import TopKGate
from routelab.routing import even_quota
from tests.routelab._dist_workers import run_group

TOL = 1e-5


def _cases(world: int) -> list[dict]:
    E = 2 * world
    if world == 2:
        spec = [
            ("topk", "topk", [5, 7], "per_rank", "full", {}),
            ("topk_one_empty_rank", "topk", [0, 7], "per_rank", "full", {"batched": True}),
            ("topk_all_empty", "topk", [0, 0], "per_rank", "full", {}),
            ("topk_capacity_per_rank", "topk", [9, 4], "per_rank", "chunks", {"capacity": 0.5}),
            ("hash", "hash", [6, 3], "per_rank", "full", {}),
            ("hash_one_empty_rank", "hash", [4, 0], "per_rank", "full", {}),
            ("multi_hash", "multi-hash", [5, 4], "per_rank", "full", {}),
            ("base_per_rank", "base", [6, 5], "per_rank", "chunks", {}),
            ("base_global", "base", [6, 5], "global", "full", {}),
            ("base_per_rank_one_empty", "base", [0, 8], "per_rank", "chunks", {}),
            ("base_global_one_empty", "base", [0, 8], "global", "full", {}),
            ("base_global_all_empty", "base", [0, 0], "global", "full", {}),
            # the other routers: token-wise gates against the full batch, batch-level
            # routers (expert choice, Sinkhorn-BASE) per rank or globally
            ("softmax_dense", "softmax", [4, 3], "per_rank", "full", {}),
            ("switch", "switch", [6, 2], "per_rank", "full", {}),
            ("noisy_topk_eval", "noisy_topk", [3, 5], "per_rank", "full", {"eval": True}),
            ("dselect_k", "dselect_k", [5, 4], "per_rank", "full", {}),
            ("expert_choice_per_rank", "expert_choice", [6, 4], "per_rank", "chunks", {}),
            ("sinkhorn_global", "sinkhorn", [5, 6], "global", "full", {}),
            # variable experts per token (top-p, ReLU routing), with and without capacity
            ("top_p", "top_p", [5, 4], "per_rank", "full", {}),
            ("remoe_capacity_per_rank", "remoe", [6, 3], "per_rank", "chunks", {"capacity": 1.0}),
            ("deepseek_shared", "deepseek", [5, 3], "per_rank", "full", {"shared": True}),
        ]
    else:
        spec = [
            ("topk", "topk", [3, 0, 6, 1], "per_rank", "full", {"activation": "swiglu"}),
            ("topk_all_empty", "topk", [0, 0, 0, 0], "per_rank", "full", {}),
            ("hash", "hash", [2, 5, 0, 4], "per_rank", "full", {}),
            ("base_per_rank", "base", [4, 0, 7, 3], "per_rank", "chunks", {}),
            ("base_global", "base", [4, 0, 7, 3], "global", "full", {}),
            ("deepseek_shared", "deepseek", [2, 4, 0, 3], "per_rank", "full", {"shared": True}),
        ]
    return [
        dict(
            name=name,
            router=router,
            num_experts=E,
            sizes=sizes,
            assignment=mode,
            reference=ref,
            seed=i,
            **extra,
        )
        for i, (name, router, sizes, mode, ref, extra) in enumerate(spec)
    ]


def _case_names(world: int) -> list[str]:
    return [c["name"] for c in _cases(world)]


@pytest.fixture(scope="module")
def world2():
    return run_group("equivalence", 2, config={"cases": _cases(2)}, deadline_s=120)


@pytest.fixture(scope="module")
def world4():
    return run_group("equivalence", 4, config={"cases": _cases(4)}, deadline_s=150)


def _results(outcomes):
    for o in outcomes:
        assert o.exitcode == 0 and o.error is None, f"rank {o.rank} failed:\n{o.error}"
    return [o.result for o in outcomes]


def _check_case(outcomes, name):
    for rank, result in enumerate(_results(outcomes)):
        errs = result[name]["errs"]
        assert {"output", "grad_x"} <= set(errs)
        assert any(k.startswith("experts.") for k in errs)
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, f"rank {rank}, case {name}: errors above {TOL}: {bad}"


@pytest.mark.parametrize("name", _case_names(2))
def test_world2_matches_single_process(world2, name):
    _check_case(world2, name)


@pytest.mark.parametrize("name", _case_names(4))
def test_world4_matches_single_process(world4, name):
    _check_case(world4, name)


def test_ranks_saw_their_own_batch_sizes(world2, world4):
    for outcomes, world in ((world2, 2), (world4, 4)):
        for case in _cases(world):
            got = [r[case["name"]]["info"]["tokens"] for r in _results(outcomes)]
            assert got == case["sizes"]


def test_base_modes_balance_per_rank_or_over_all_ranks(world2, world4):
    for outcomes, world in ((world2, 2), (world4, 4)):
        results = _results(outcomes)
        for case in _cases(world):
            if case["router"] != "base":
                continue
            infos = [r[case["name"]]["info"] for r in results]
            E, sizes = case["num_experts"], case["sizes"]
            if sum(1 for size in sizes if size) > 1:
                # the modes differ on this batch, so the equivalence tests tell them apart
                assert infos[0]["modes_differ"], case["name"]
            if case["assignment"] == "per_rank":  # every rank's own tokens split evenly
                for info, size in zip(infos, sizes):
                    assert info["load"] == even_quota(size, E)
            else:  # one even split of all ranks' tokens together
                summed = [sum(loads) for loads in zip(*(info["load"] for info in infos))]
                assert summed == even_quota(sum(sizes), E)


def test_constructor_errors_and_shard_round_trip(world2, world4):
    for outcomes in (world2, world4):
        for result in _results(outcomes):
            checks = result["checks"]
            assert (
                checks["indivisible"].startswith("ValueError")
                and "divisible" in (checks["indivisible"])
            )
            assert checks["wrong_shard"].startswith("ValueError")
            assert checks["global_needs_base"].startswith("TypeError")
            assert checks["bad_mode"].startswith("ValueError")
            assert checks["roundtrip"] == 0.0


@pytest.mark.parametrize(
    ("world", "bad_rank", "linger"),
    [
        (2, 1, True),  # the failed rank stays alive: the others must hit the group timeout
        (3, 0, False),  # the failed rank (which hosts the store) exits at once
    ],
)
def test_a_failing_rank_makes_the_others_fail_not_hang(world, bad_rank, linger):
    timeout_s = 5.0
    outcomes = run_group(
        "failing_rank",
        world,
        config={
            "bad_rank": bad_rank,
            "timeout_s": timeout_s,
            "linger_rank": bad_rank if linger else None,
        },
        deadline_s=90,
        release_after=[r for r in range(world) if r != bad_rank],
    )
    for o in outcomes:
        assert o.exitcode is not None, f"rank {o.rank} hung"
        assert o.exitcode != 0 and o.error is not None, f"rank {o.rank} did not fail"
    assert outcomes[bad_rank].error_type == "ValueError"
    assert "d_model" in outcomes[bad_rank].error
    for o in outcomes:
        if o.rank != bad_rank:
            assert o.error_type in ("RuntimeError", "DistBackendError", "DistNetworkError")
            # init + setup take a few seconds; the error comes within one group timeout
            assert o.elapsed < timeout_s + 30


# ---------------------------------------------------------------------- in-process
def test_expert_range_and_its_errors():
    assert list(expert_range(8, 1, 4)) == [2, 3]
    assert list(expert_range(6, 0, 1)) == list(range(6))
    with pytest.raises(ValueError, match="divisible"):
        expert_range(6, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        expert_range(8, 4, 4)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_shards_hold_the_global_experts(activation, bias):
    torch.manual_seed(0)
    full = FFNExperts(6, 5, 7, activation=activation, bias=bias)
    x = torch.randn(4, 5)
    for rank in range(3):
        shard = shard_experts(full, rank, 3)
        assert shard.num_experts == 2 and shard.activation == activation
        assert (shard.b_in is None) == (not bias)
        for local, e in enumerate(expert_range(6, rank, 3)):
            torch.testing.assert_close(shard.expert_forward(local, x), full.expert_forward(e, x))
        with torch.no_grad():  # a copy, not a view: the full experts stay untouched
            shard.w_in.zero_()
        assert full.w_in.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        shard_experts(full, 0, 4)
    with pytest.raises(TypeError, match="Experts"):
        shard_experts(torch.nn.Linear(2, 2), 0, 1)


class _GatedOutputExperts(FFNExperts):
    """FFNExperts with a parameter distributed.py has never heard of."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_gate = torch.nn.Parameter(torch.randn(self.num_experts, self.d_model))


def test_a_new_experts_parameter_shards_without_touching_distributed():
    torch.manual_seed(0)
    full = _GatedOutputExperts(6, 4, 8)
    for rank in range(3):
        shard = shard_experts(full, rank, 3)
        assert type(shard) is _GatedOutputExperts and shard.num_experts == 2
        ids = expert_range(6, rank, 3)
        torch.testing.assert_close(shard.output_gate, full.output_gate[ids.start : ids.stop])
        torch.testing.assert_close(shard.w_out, full.w_out[ids.start : ids.stop])


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("e_local", [1, 2, 4])
def test_received_rows_are_put_in_expert_order_without_a_sort(world, e_local):
    """The receiving side's permutation equals a stable sort of the rows' local experts."""
    from routelab.distributed import _source_to_expert_order

    chunks = torch.randint(0, 4, (world, e_local), generator=torch.Generator().manual_seed(7))
    labels = torch.arange(e_local).repeat(world).repeat_interleave(chunks.reshape(-1))
    order = _source_to_expert_order(chunks, labels.shape[0])
    if order is None:
        assert world == 1 or e_local == 1
        order = torch.arange(labels.shape[0])
    assert torch.equal(order, torch.argsort(labels, stable=True))


def test_layer_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(TopKGate(4, 2), FFNExperts(2, 4, 8))


def test_torchrun_example_trains_and_saves_a_single_process_checkpoint(tmp_path):
    """``examples/expert_parallel.py`` under torchrun (2 processes, uneven batches):
    the loss falls, and the saved checkpoint loads into a plain single-process MoE."""
    import subprocess
    import sys
    from pathlib import Path

    from routelab import MoE

    script = Path(__file__).resolve().parents[2] / "examples" / "expert_parallel.py"
    ckpt = tmp_path / "moe.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), "--steps", "25", "--batch", "64"]
    command += ["--save", str(ckpt)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if "loss" in line]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], done.stdout
    single = MoE(TopKGate(32, 4, k=2), FFNExperts(4, 32, 64))
    single.load_state_dict(torch.load(ckpt))
    out = single(torch.randn(5, 32))
    assert out.output.shape == (5, 32)


# ---------------------------------------------------------------------- issue 11
def test_global_batch_balance_equals_the_single_process_computation(world2, world4):
    for outcomes in (world2, world4):
        for rank, result in enumerate(_results(outcomes)):
            errs = result["global_balance"]
            assert {"one_loss", "one_grad", "acc_grad", "acc_step_loss"} <= set(errs)
            bad = {k: v for k, v in errs.items() if not v <= 1e-10}
            assert not bad, f"rank {rank}: {bad}"


def test_router_replay_through_expert_parallelism(world2, world4):
    for outcomes in (world2, world4):
        results = _results(outcomes)
        for result in results:
            assert result["replay"]["output"] <= TOL
            assert result["replay"]["same_experts"]
        # the perturbed router would have routed differently somewhere: replay mattered
        assert any(r["replay"]["fresh_routing_changed"] for r in results)
