"""Fault injection: training is killed (SIGKILL, in a subprocess) at named points, then resumed,
possibly more than once; every time the finished run equals an uninterrupted one, weights and
metrics bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.run_folder import latest_checkpoint, read_metrics
from kvshift_lens.train import RunSpec, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]

SPEC = dict(model=dict(d_model=16, d_head=4, n_layers=1, attn_only=True, shift_init="normal"),
            task=dict(name="induction", d_vocab=12, seq_len=16),
            train=dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4,
                       eval_batches=1, checkpoint_every=4, log_every=1, progress=False,
                       device="cpu"))

# Each scenario: the code that arms the kill (run in the subprocess before training), and what
# the run folder must look like after the kill.
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
POINTS = {
    # a crash half-way through writing the step-8 checkpoint's trainer state
    "mid_checkpoint_write": f"""
        import kvshift_lens.train.state as state
        real = state.save_file
        def save_file(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if "step_00000008" in str(path):
                with open(path, "r+b") as f:
                    f.truncate(64)
                {KILL}
        state.save_file = save_file
    """,
    # the step folder renamed into place, the 'latest' pointer not yet moved
    "before_latest_pointer": f"""
        import kvshift_lens.train.state as state
        real = state.write_latest
        def write_latest(run_dir, folder):
            if folder.name == "step_00000008":
                {KILL}
            real(run_dir, folder)
        state.write_latest = write_latest
    """,
    # the last checkpoint written, final/ not yet
    "between_last_checkpoint_and_final": f"""
        from kvshift_lens.model import HookedKVShiftTransformer
        real = HookedKVShiftTransformer.save_pretrained
        def save_pretrained(self, directory):
            if Path(directory).name == "final":
                {KILL}
            return real(self, directory)
        HookedKVShiftTransformer.save_pretrained = save_pretrained
    """,
    # before the first checkpoint (step 3 of 4)
    "before_first_checkpoint": f"""
        from kvshift_lens.data.tasks import InductionTask
        real = InductionTask.sample
        calls = {{"n": 0}}
        def sample(self, batch_size, generator):
            calls["n"] += 1
            if calls["n"] == 5:  # the step-0 evaluation's draw, then steps 1..3
                {KILL}
            return real(self, batch_size, generator)
        InductionTask.sample = sample
    """,
}

HARNESS = """
import os, signal, sys, json
from pathlib import Path
sys.path.insert(0, {root!r})
{arm}
from kvshift_lens.train import RunSpec, train
spec = json.loads({spec!r})
train(RunSpec.from_dict(spec), {run!r}, resume={resume})
"""


def run_killed(run: Path, arm: str, resume: bool = False) -> None:
    code = HARNESS.format(root=str(ROOT), arm=textwrap.dedent(arm), spec=json.dumps(SPEC),
                          run=str(run), resume=resume)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin"})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] != "summary"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return HookedKVShiftTransformer.from_pretrained(run / "final", device="cpu").state_dict()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "straight"
    train(RunSpec.from_dict(SPEC), run)
    return run


def assert_same_run(run: Path, straight: Path) -> None:
    a, b = weights(straight), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert records(run) == records(straight)
    steps = [(r["step"], r["kind"]) for r in records(run)]
    assert len(steps) == len(set(steps))  # never a duplicated (step, kind)
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp") or ".staging-" in p.name]
    assert not leftovers


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_then_resumed_equals_uninterrupted(tmp_path, straight, point):
    run = tmp_path / "run"
    run_killed(run, POINTS[point])
    if point == "mid_checkpoint_write":
        assert latest_checkpoint(run).name == "step_00000004"
    if point == "before_latest_pointer":
        assert (run / "checkpoints" / "step_00000008").is_dir()
        assert latest_checkpoint(run).name == "step_00000004"
    train(RunSpec.from_dict(SPEC), run, resume=True)
    assert_same_run(run, straight)


def test_killed_during_the_metrics_rewrite_of_a_resume(tmp_path, straight):
    """Killed at step 10 (metrics up to 10, checkpoint at 8); the resume that drops records 9-10
    is killed after writing the new metrics file but before renaming it; a third run finishes."""
    run = tmp_path / "run"
    run_killed(run, POINTS["before_first_checkpoint"].replace('calls["n"] == 5', 'calls["n"] == 12'))
    assert latest_checkpoint(run).name == "step_00000008"
    before = (run / "metrics.jsonl").read_bytes()
    run_killed(run, f"""
        import kvshift_lens._files as files
        real = files.commit_staged
        def commit_staged(staged):
            if any(t.name == "metrics.jsonl" for t in staged):
                {KILL}
            real(staged)
        files.commit_staged = commit_staged
    """, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == before  # the old history, whole
    train(RunSpec.from_dict(SPEC), run, resume=True)
    assert_same_run(run, straight)


def test_killed_mid_line_of_the_metrics(tmp_path, straight):
    """A crash can cut the last metrics line short; resume drops it and finishes the run."""
    run = tmp_path / "run"
    run_killed(run, POINTS["before_first_checkpoint"].replace('calls["n"] == 5', 'calls["n"] == 11'))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "kind": "tra')
    train(RunSpec.from_dict(SPEC), run, resume=True)
    assert_same_run(run, straight)


def test_gradient_clipping_bounds_the_update(tmp_path):
    """Two AdamW steps with a clip far below the gradient norm equal a reference that clips, and
    differ from one that does not (Adam is invariant to a constant gradient scale, so a single
    step could not tell them apart; two steps with different clip factors can)."""
    from kvshift_lens.data.tasks import masked_cross_entropy
    from kvshift_lens.train.trainer import lr_lambda, param_groups

    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, grad_clip=1e-3,
                      eval_every=2, eval_batches=1, progress=False, device="cpu", seed=5)
    spec = RunSpec(model=dict(SPEC["model"]), task=dict(SPEC["task"]), train=cfg)
    result = train(spec, tmp_path / "run")

    def reference(clip: bool) -> dict[str, torch.Tensor]:
        from kvshift_lens.train import resolve_run_spec

        run = resolve_run_spec(spec)
        model = HookedKVShiftTransformer(run.model, generator=torch.Generator().manual_seed(5))
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        data = torch.Generator().manual_seed(6)
        norms = []
        for _ in range(2):
            batch = run.task.sample(cfg.batch_size, data)
            loss = masked_cross_entropy(model(batch.tokens), batch.targets, reduction="sum")
            opt.zero_grad()
            (loss / batch.n_predictions).backward()
            grads = [p.grad for p in model.parameters()]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            model.constrain_shift_()  # as the trainer does (projects the gain_mix default's mixes)
            sched.step()
        assert min(norms) > 10 * cfg.grad_clip and abs(norms[0] - norms[1]) > 0.01 * norms[0]
        return {k: v.detach() for k, v in model.state_dict().items()}

    trained = result.model.state_dict()
    clipped, unclipped = reference(True), reference(False)
    for k in trained:
        torch.testing.assert_close(trained[k], clipped[k], rtol=1e-6, atol=1e-7)
    gap = max(float((clipped[k] - unclipped[k]).abs().max()) for k in trained)
    assert gap > 1e-4  # the check above could not pass by accident
