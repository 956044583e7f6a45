"""A tiny trained run shared by the report and browser tests (trained once per test process)."""

from __future__ import annotations

import pytest

from kvshift_lens.train import RunSpec, TrainConfig, train


def tiny_spec(steps: int = 24) -> RunSpec:
    return RunSpec(
        model=dict(d_model=16, d_head=8, n_layers=1, attn_only=True, shift_init="uniform"),
        task=dict(name="induction", d_vocab=12, seq_len=16),
        train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=6,
                          eval_batches=1, log_every=2, progress=False, device="cpu"),
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 1-layer KV-shift run folder on the induction task (2 heads, 24 steps)."""
    run_dir = tmp_path_factory.mktemp("viz") / "run"
    train(tiny_spec(), run_dir)
    return run_dir
