"""Data parallel + expert parallel training of a tiny MoE model, launched with torchrun.

    torchrun --standalone --nproc-per-node 2 examples/expert_parallel.py
    torchrun --standalone --nproc-per-node 4 examples/expert_parallel.py --router hash

Every rank holds a replica of the dense parts (embedding, router, output head) and a
shard of the experts (E / world size of them), and trains on its own data (data
parallel). Inside the MoE layer the tokens travel to the rank that holds their expert
and back (all-to-all, expert parallel). gloo on CPU, NCCL when CUDA is available.

Gradients: the local loss is the sum over local tokens divided by the global token
count, so the sum of the per-rank losses is the global mean; an expert shard's gradient
already sums every rank's tokens, and ``all_reduce_replicated_grads`` sums the
replicated gradients, so every parameter gets the gradient of the global mean loss.

The task: predict ``(a * token + b) mod V`` from the token, a lookup the experts learn
(hash routing sends every token id to a fixed expert; the gates and BASE learn to).
``--save PATH`` writes a single-process ``MoE`` checkpoint (experts gathered from all
ranks) that ``routelab.MoE`` loads without any process group.
"""

from __future__ import annotations

import argparse
import os

import torch

# torch 2.13: torch._dynamo, imported lazily by the first optimiser, keeps a process group
# that exists at import time alive past destroy_process_group; the gloo worker threads then
# abort the interpreter at exit now and then ("terminate called without an active
# exception"). Importing it before init_process_group avoids that.
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from routelab import FFNExperts, MoE
from routelab.distributed import (
    ExpertParallelMoE,
    all_reduce_replicated_grads,
    broadcast_replicated,
    gather_experts,
    shard_experts,
)


def make_router(kind: str, d: int, E: int, vocab: int):
    if kind == "topk":
        from routelab.routers import TopKGate

        return TopKGate(d, E, k=2)
    if kind == "hash":
        from routelab.routers.hash import HashRouter

        return HashRouter.fit("random", E, d_model=d, vocab_size=vocab)
    if kind == "base":
        from routelab.routers.base_layer import BASERouter

        return BASERouter(d, E)
    raise ValueError(f"--router must be topk, hash or base, got {kind!r}")


class TinyMoEModel(nn.Module):
    """Embedding -> x + MoE(x) -> linear head; the MoE layer is expert-parallel."""

    def __init__(self, vocab: int, d: int, moe: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.moe = moe
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor):
        x = self.embed(tokens)
        out = self.moe(x, tokens)
        return self.head(x + out.output), out.aux_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", default="topk", choices=["topk", "hash", "base"])
    parser.add_argument("--assignment", default="per_rank", choices=["per_rank", "global"])
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256, help="tokens per rank and step")
    parser.add_argument("--save", default=None, help="write a single-process MoE checkpoint")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    vocab, d, h = 64, 32, 64
    E = args.experts_per_rank * world
    torch.manual_seed(0)  # the same initial weights on every rank ...
    router = make_router(args.router, d, E, vocab)
    full_experts = FFNExperts(E, d, h)
    layer = ExpertParallelMoE(
        router, shard_experts(full_experts, rank, world), assignment=args.assignment
    )
    model = TinyMoEModel(vocab, d, layer).to(device)
    broadcast_replicated(model)  # ... and made so explicitly, as a real run would
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)

    generator = torch.Generator().manual_seed(1000 + rank)  # every rank its own data
    for step in range(args.steps):
        # uneven batches on purpose: the ranks need not agree on their sizes
        size = args.batch + (rank * 7 + step * 3) % 17
        tokens = torch.randint(0, vocab, (size,), generator=generator).to(device)
        targets = (5 * tokens + 3) % vocab
        total = torch.tensor([size], device=device)
        dist.all_reduce(total)
        logits, aux = model(tokens)
        loss = F.cross_entropy(logits, targets, reduction="sum") / total + aux / world
        optimiser.zero_grad()
        loss.backward()
        all_reduce_replicated_grads(model)
        optimiser.step()
        if step % 10 == 0 or step == args.steps - 1:
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            if rank == 0:
                print(f"step {step:3d}  loss {float(global_loss):.4f}", flush=True)

    experts = gather_experts(layer.experts)  # a collective: every rank joins
    if args.save and rank == 0:
        single = MoE(router, experts)
        torch.save(single.state_dict(), args.save)
        print(f"saved a single-process MoE state dict ({E} experts) to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
