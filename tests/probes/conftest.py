"""Trained models whose circuits the causal-probe tests recover (trained once per test session).

Both are CI-sized, attention-only, trained on the induction task (d_vocab 24, seq 32) with the
project's trainer on CPU:

- ``kvshift_1l``: one KV-shift layer, 4 heads (d_model 32, d_head 8), the spec of
  tests/train/test_learning.py: 90% masked accuracy at step 240 (seed 0), about 5 s.
- ``vanilla_2l``: two vanilla layers, same sizes, rotary positions, lr 3e-3, stopped at 95%
  (seeds 0-2 reached it at steps 560-600, 8-10 s). Each seed grew one clean previous-token head in
  layer 0 (attention to t - 1 of 0.7-0.8; ablating it leaves 10-26% accuracy, ablating any other
  layer-0 head costs <= 2 points) and shared induction across the layer-1 heads.

  Calibration when this was written: with learned absolute positions (the KV-shift model's) the
  same sizes reach 95% too (seed 0: step 840, 12-18 s), but the previous-token role is spread over
  the layer-0 heads (attention to t - 1 of 0.16-0.21 each; the most important head's ablation
  leaves 48%, the top two together 20%), so there is no single previous-token head to find.
  lr 1e-2 never learns; a short decaying schedule (700 steps) stalls at 16-52%.
"""

from __future__ import annotations

import pytest
import torch

from kvshift_lens.data.tasks import InductionTask
from kvshift_lens.train import RunSpec, TrainConfig, train
from probes.ablation import ablate_each_head, ablation_effect, zero_ablate_head

TASK = dict(name="induction", d_vocab=24, seq_len=32)


def _spec(shift: bool, n_layers: int, steps: int, target: float, **model) -> RunSpec:
    return RunSpec(
        model=dict(d_model=32, d_head=8, n_layers=n_layers, n_ctx=32, attn_only=True,
                   shift_k=shift, shift_v=shift, **{"shift_param": "free", **model}),
        task=dict(TASK),
        train=TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=20,
                          progress=False, device="cpu", stop_at_target=True, seed=0,
                          target_accuracy=target,
                          # The fixtures were calibrated with the coefficients on the weights'
                          # learning rate: a circuit with both induction and non-induction heads.
                          shift_lr_scale=1.0),
    )


def _train(spec: RunSpec, run_dir):
    result = train(spec, run_dir)
    if result.steps_to_target is None:
        pytest.fail(f"the fixture model did not reach {spec.train.target_accuracy:.0%} in "
                    f"{spec.train.steps} steps (final {result.final_metrics}); recalibrate conftest.py")
    return result.model.eval()


@pytest.fixture(scope="session")
def induction_task() -> InductionTask:
    return InductionTask(d_vocab=24, seq_len=32)


@pytest.fixture(scope="session")
def eval_batch(induction_task):
    """256 fresh sequences (a seed the trainer never uses)."""
    return induction_task.sample(256, torch.Generator().manual_seed(123))


@pytest.fixture(scope="session")
def kvshift_1l(tmp_path_factory):
    return _train(_spec(True, 1, 600, 0.9), tmp_path_factory.mktemp("kvshift_1l"))


@pytest.fixture(scope="session")
def vanilla_2l(tmp_path_factory):
    return _train(_spec(False, 2, 1500, 0.95, positional_embedding_type="rotary"),
                  tmp_path_factory.mktemp("vanilla_2l"))


@pytest.fixture(scope="session")
def kvshift_induction_heads(kvshift_1l, eval_batch) -> list[int]:
    """The induction heads of ``kvshift_1l``, found by ablation: heads ranked by how much zero-
    ablating each alone hurts, then the shortest prefix of that ranking that, kept alone (every
    other head zero-ablated), still reaches 80% of the clean accuracy."""
    table = ablate_each_head(kvshift_1l, eval_batch)
    ranked = [head for _, head, _ in table.ranked()]
    n_heads = kvshift_1l.cfg.n_heads
    for k in range(1, n_heads + 1):
        kept = ranked[:k]
        others = [zero_ablate_head(kvshift_1l, 0, h) for h in range(n_heads) if h not in kept]
        if ablation_effect(kvshift_1l, eval_batch, others).accuracy_after >= 0.8 * table.accuracy_before:
            return sorted(kept)
    raise AssertionError("no subset of heads carries induction")  # pragma: no cover


@pytest.fixture(scope="session")
def vanilla_heads(vanilla_2l, eval_batch) -> dict[str, int]:
    """``{"previous": L0 head, "induction": L1 head}`` of ``vanilla_2l``: in each layer, the head
    whose zero-ablation alone costs the most accuracy."""
    drop = ablate_each_head(vanilla_2l, eval_batch).accuracy_drop
    return {"previous": int(drop[0].argmax()), "induction": int(drop[1].argmax())}
