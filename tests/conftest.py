"""Shared test settings: CPU, one torch thread per pytest worker, deterministic seeds."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KVSHIFT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_spec(steps: int = 24):
    """A 1-layer KV-shift run on a small induction task (2 heads), for the report tests."""
    from kvshift_lens.train import RunSpec, TrainConfig

    return RunSpec(
        model=dict(d_model=16, d_head=8, n_layers=1, attn_only=True, shift_init="uniform"),
        task=dict(name="induction", d_vocab=12, seq_len=16),
        train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=6,
                          eval_batches=1, log_every=2, progress=False, device="cpu"),
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 1-layer KV-shift run folder on the induction task (trained once per process)."""
    from kvshift_lens.train import train

    run_dir = tmp_path_factory.mktemp("report") / "run"
    train(tiny_spec(), run_dir)
    return run_dir
