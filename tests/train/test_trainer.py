"""The trainer: bit-identical resume, the NaN guard, DDP equivalence, run-folder safety, the
schedule, and a tiny end-to-end run that must learn induction."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.run_folder import latest_checkpoint
from kvshift_lens.train import (
    RunFolderError,
    RunSpec,
    TrainConfig,
    TrainingDiverged,
    lr_lambda,
    resolve_run_spec,
    train,
)

ROOT = Path(__file__).resolve().parents[2]


def small_spec(**train_overrides) -> RunSpec:
    settings = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=4,
                    eval_batches=2, checkpoint_every=4, log_every=1, progress=False, device="cpu")
    settings.update(train_overrides)
    return RunSpec(
        model=dict(d_model=32, d_head=8, n_layers=1, n_ctx=24, attn_only=True,
                   shift_init="normal"),
        task=dict(name="induction", d_vocab=20, seq_len=24),
        train=TrainConfig(**settings),
    )


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return HookedKVShiftTransformer.from_pretrained(run_dir / "final", device="cpu").state_dict()


def _metrics(run_dir: Path) -> list[dict]:
    """Training and evaluation records (the closing summary holds wall-clock timings)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] != "summary"]


class _Crash(Exception):
    pass


class _CrashingTask:
    """The task of a resolved run, raising on its ``n``-th training draw (a crash mid-run)."""

    def __init__(self, task, n: int):
        self.task, self.n, self.calls = task, n, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, batch_size, generator):
        self.calls += 1
        if self.calls == self.n:
            raise _Crash
        return self.task.sample(batch_size, generator)


def crashing_run(spec: RunSpec, at_draw: int):
    run = resolve_run_spec(spec)
    run.task = _CrashingTask(run.task, at_draw)
    return run


def test_resume_is_bit_identical(tmp_path):
    straight = train(small_spec(), tmp_path / "straight")
    with pytest.raises(_Crash):  # step 11's batch, after the step-8 checkpoint
        train(crashing_run(small_spec(), 11), tmp_path / "crashed")
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000008"
    resumed = train(small_spec(), tmp_path / "crashed", resume=True)

    a, b = _state(tmp_path / "straight"), _state(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "crashed")
    assert straight.final_metrics == resumed.final_metrics
    # The run moved: trained weights differ from the initial ones.
    init = HookedKVShiftTransformer({**small_spec().model, "d_vocab": 20, "device": "cpu"},
                                    generator=torch.Generator().manual_seed(0)).state_dict()
    assert not torch.equal(init["embed.W_E"], a["embed.W_E"])


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    train(small_spec(steps=2, eval_every=2), tmp_path / "run")
    with pytest.raises(RunFolderError, match="already exists; pass --resume"):
        train(small_spec(steps=2, eval_every=2), tmp_path / "run")
    with pytest.raises(RunFolderError, match=r"differs from this run in \['train'\]"):
        train(small_spec(steps=3, eval_every=2), tmp_path / "run", resume=True)
    result = train(small_spec(steps=2, eval_every=2), tmp_path / "run", overwrite=True)
    assert result.steps == 2


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    spec = small_spec(checkpoint_every=2)
    model = HookedKVShiftTransformer({**spec.model, "d_vocab": 20, "device": "cpu"},
                                     generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def poison(x, hook):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return x * float("nan")
        return x

    model.add_perma_hook("hook_embed", poison)
    with pytest.raises(TrainingDiverged,
                       match=r"step 5: the training loss is nan, not finite.*last good checkpoint"):
        train(spec, tmp_path / "run", model=model)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000004"
    kept = HookedKVShiftTransformer.from_pretrained(ckpt, device="cpu")
    assert all(torch.isfinite(p).all() for p in kept.parameters())
    assert not (tmp_path / "run" / "final").exists()


def test_task_model_mismatch(tmp_path):
    spec = small_spec()
    spec.model["d_vocab"] = 10
    with pytest.raises(ValueError, match="model d_vocab=10 is smaller than task 'induction' d_vocab=20"):
        train(spec, tmp_path / "run")
    spec = small_spec()
    spec.model["n_ctx"] = 10
    with pytest.raises(ValueError, match="n_ctx=10 is shorter than the task's seq_len=24"):
        train(spec, tmp_path / "run")


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_lambda(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_metrics_log_coefficients_every_eval(tmp_path):
    result = train(small_spec(steps=8), tmp_path / "run")
    evals = [m for m in _metrics(tmp_path / "run") if m["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4, 8]
    final = HookedKVShiftTransformer.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert torch.tensor(evals[-1]["coefficients"]["k"]).allclose(final.shift_coefficients()["k"])
    assert not torch.tensor(evals[0]["coefficients"]["k"]).allclose(
        torch.tensor(evals[-1]["coefficients"]["k"]))
    assert result.tokens_per_second > 0


DDP_SCRIPT = """
import sys
from kvshift_lens.train import RunSpec, TrainConfig, train
sys.path.insert(0, {root!r})
from tests.train.test_trainer import small_spec
train(small_spec(checkpoint_every=0), {run!r})
"""


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the same losses as 1 process, same global batch."""
    single = train(small_spec(checkpoint_every=0), tmp_path / "single")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), run=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [m for m in _metrics(tmp_path / "single") if m["kind"] == "train"]
    two = [m for m in _metrics(tmp_path / "ddp") if m["kind"] == "train"]
    assert [m["step"] for m in one] == [m["step"] for m in two] and len(one) == 12
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-6)
    sa, sb = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    assert single.steps == 12


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile (slow: compiles C++ kernels on CPU) gives the eager losses."""
    eager = train(small_spec(steps=4, checkpoint_every=0), tmp_path / "eager")
    compiled = train(small_spec(steps=4, checkpoint_every=0, compile=True), tmp_path / "compiled")
    for a, b in zip(eager.evals, compiled.evals):
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-4)


def test_text_runs_evaluate_on_validation_and_keep_their_tokenizer(tmp_path):
    """Text: evaluation reads the held-out split (not the training stream), and the tokenizer
    travels with the saved model."""
    from kvshift_lens.data.text import TextTask

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (i + 3))
    task = {"name": "text", "source": str(corpus), "seq_len": 16, "val_fraction": 0.3}
    spec = RunSpec(model=dict(d_model=16, d_head=4, n_layers=1, attn_only=True), task=task,
                   train=TrainConfig(steps=2, batch_size=4, eval_every=2, eval_batches=1,
                                     progress=False, device="cpu"))
    result = train(spec, tmp_path / "run")
    val = TextTask.from_corpus(source=str(corpus), seq_len=16, val_fraction=0.3, split="val")
    batch = next(iter(val.eval_batches(4, 1)))
    with torch.no_grad():
        expected = val.metrics(result.model.eval()(batch.tokens), batch)["loss"]
    assert result.final_metrics["loss"] == pytest.approx(expected, rel=1e-5)
    final = HookedKVShiftTransformer.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert final.to_string(final.to_tokens("lorem ipsum", prepend_bos=False)[0]) == "lorem ipsum"


def test_training_works_after_gradients_were_switched_off(tmp_path):
    """TransformerLens and ARENA notebooks start with torch.set_grad_enabled(False); the trainer
    turns gradients on for its own steps (and leaves the caller's setting as it was)."""
    torch.set_grad_enabled(False)
    try:
        result = train(small_spec(steps=4, checkpoint_every=0), tmp_path / "run")
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    straight = train(small_spec(steps=4, checkpoint_every=0), tmp_path / "straight")
    for k, v in straight.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v), k
