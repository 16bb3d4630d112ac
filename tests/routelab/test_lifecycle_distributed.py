"""Expert parallelism over grown, pruned and merged layers (2 real gloo processes)."""

from __future__ import annotations

import pickle
import socket
import time

import pytest
import torch.multiprocessing as mp

from tests.routelab import _lifecycle_dist_workers as workers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_expert_parallel_copies_of_reindexed_layers_match_one_process(tmp_path):
    context = mp.start_processes(
        workers.worker,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    finished = False
    try:  # join() handles one finished process per call
        while not finished and time.monotonic() < deadline:
            finished = context.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert finished, "a rank hung"
    for rank in range(2):
        with open(tmp_path / f"{rank}.pkl", "rb") as f:
            record = pickle.load(f)
        assert "failure" not in record, record.get("failure")
        assert set(record) == {"grown", "pruned", "merged"}
        for name, result in record.items():
            assert result["error"] < 1e-5, (rank, name, result)
            assert result["gathered"], (rank, name)
