"""The ``kvshift`` command line, run in-process: train / eval / sweep, flags reflected in run.json,
resume, one-line errors with exit code 2 (3 for divergence), and --help at every level."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.cli import build_parser, main
from kvshift_lens.train import TrainConfig, TrainingDiverged
from kvshift_lens.train import trainer as trainer_module
from kvshift_lens.train.config import DEFAULT_SHIFT_INIT
from kvshift_lens.train.tasks import build_task

TINY = ["--steps", "4", "--batch-size", "4", "--d-model", "16", "--d-head", "4", "--layers", "1",
        "--seq-len", "16", "--d-vocab", "12", "--eval-every", "2", "--no-progress",
        "--device", "cpu"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _metrics(run: Path) -> list[dict]:
    """Training and evaluation records (the closing summary holds wall-clock timings)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] != "summary"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return HookedKVShiftTransformer.from_pretrained(folder, device="cpu").state_dict()


def test_train_writes_the_run_folder_with_every_flag_in_run_json(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(
        capsys, "train", *TINY, "--out", run,
        "--heads", "4", "--attn-only", "--shift", "k", "--shift-window", "2",
        "--shift-param", "convex", "--shift-init", "normal", "--pos", "rotary", "--norm", "RMS",
        "--model-arg", "init_range=0.05", "--task-arg", "min_length=3", "--task-arg", "bos=false",
        "--lr", "0.002", "--weight-decay", "0.05", "--betas", "0.8", "0.9", "--warmup-steps", "1",
        "--min-lr-ratio", "0.2", "--grad-clip", "0.5", "--eval-batches", "2",
        "--checkpoint-every", "2", "--keep-checkpoints", "1", "--seed", "3", "--no-bf16",
        "--target-accuracy", "0.5", "--log-every", "1")
    assert code == 0, err
    spec = json.loads((run / "run.json").read_text())
    model, task, train = spec["model"], spec["task"], spec["train"]
    assert model["n_layers"] == 1
    assert model["d_model"] == 16
    assert model["d_head"] == 4
    assert model["n_heads"] == 4
    assert model["n_ctx"] == 16  # the task's seq_len
    assert model["d_vocab"] == 12  # the task's d_vocab
    assert model["attn_only"] is True
    assert (model["shift_k"], model["shift_v"], model["shift_q"]) == (True, False, False)
    assert model["shift_window"] == 2
    assert model["shift_param"] == "convex"
    assert model["shift_init"] == "normal"
    assert model["positional_embedding_type"] == "rotary"
    assert model["normalization_type"] == "RMS"
    assert model["init_range"] == 0.05
    assert task == {"name": "induction", "d_vocab": 12, "seq_len": 16, "min_length": 3,
                    "bos": False}
    expected_train = TrainConfig(
        steps=4, batch_size=4, lr=0.002, weight_decay=0.05, betas=(0.8, 0.9), warmup_steps=1,
        min_lr_ratio=0.2, grad_clip=0.5, eval_every=2, eval_batches=2, checkpoint_every=2,
        keep_checkpoints=1, seed=3, device="cpu", bf16=False, compile=False,
        target_accuracy=0.5, stop_at_target=False, log_every=1, progress=False).to_dict()
    for name, value in expected_train.items():
        assert train[name] == value, name
    assert set(train) == set(expected_train)

    saved = HookedKVShiftTransformer.from_pretrained(run / "final", device="cpu").cfg
    assert (saved.shift_k, saved.shift_v, saved.shift_window, saved.shift_param) == \
        (True, False, 2, "convex")
    assert saved.positional_embedding_type == "rotary" and saved.attn_only
    records = _metrics(run)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000004"]
    assert f"finished 4 steps in {run}" in out
    assert "steps to target (accuracy >= 0.5)" in out and "final: accuracy=" in out
    assert err == ""


def test_defaults_and_resume_continue_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", *TINY, "--checkpoint-every", "2", "--log-every", "1",
                       "--out", run)
    assert code == 0, err
    spec = json.loads((run / "run.json").read_text())
    assert spec["model"]["shift_init"] == DEFAULT_SHIFT_INIT
    assert (spec["model"]["shift_k"], spec["model"]["shift_v"], spec["model"]["shift_q"]) == \
        (True, True, False)
    assert spec["model"]["attn_only"] is False and spec["model"]["normalization_type"] == "LN"
    assert spec["task"] == {"name": "induction", "d_vocab": 12, "seq_len": 16}
    defaults = TrainConfig().to_dict()
    for name in ("lr", "weight_decay", "betas", "warmup_steps", "grad_clip", "eval_batches",
                 "seed", "bf16", "target_accuracy"):
        assert spec["train"][name] == defaults[name], name

    straight_state, straight_metrics = _state(run / "final"), _metrics(run)
    # Pretend the run died after its step-2 checkpoint.
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")

    code, out, err = cli(capsys, "train", "--out", run, "--resume")  # settings from run.json
    assert code == 0, err
    assert f"finished 4 steps in {run}" in out
    resumed = _state(run / "final")
    for k, v in straight_state.items():
        assert torch.equal(v, resumed[k]), k
    assert _metrics(run) == straight_metrics

    # resuming with different settings is refused in one line
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "8")
    assert code == 2 and err.count("\n") == 1
    assert "differs from this run in ['train']" in err


def _config(tmp_path: Path, model_vocab: int, task_vocab: int) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({
        "model": {"d_model": 16, "d_head": 4, "n_layers": 1, "d_vocab": model_vocab},
        "task": {"name": "induction", "d_vocab": task_vocab, "seq_len": 16},
        "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu"}}))
    return path


def _bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "broken.json"
    path.write_text("{'model': ")
    return path


def _existing(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return tmp_path / "out"


ERROR_CASES = {
    "bad choice": (lambda t: ["train", "--task", "nope", "--out", t / "out"], "invalid choice: 'nope'"),
    "bad shift": (lambda t: ["train", *TINY, "--shift", "kvq", "--out", t / "out"], "'kvq'"),
    "bad int": (lambda t: ["train", "--steps", "ten", "--out", t / "out"], "'ten'"),
    "unknown flag": (lambda t: ["train", "--stpes", "3", "--out", t / "out"], "--stpes"),
    "resume and overwrite": (lambda t: ["train", "--resume", "--overwrite", "--out", t / "out"],
                             "not allowed with argument"),
    "missing config": (lambda t: ["train", "--config", t / "missing.json", "--out", t / "out"],
                       "missing.json does not exist"),
    "config not JSON": (lambda t: ["train", "--config", _bad_json(t), "--out", t / "out"],
                        "broken.json is not valid JSON"),
    "d_model 0": (lambda t: ["train", *TINY, "--d-model", "0", "--out", t / "out"], "d_model=0"),
    "negative lr": (lambda t: ["train", *TINY, "--lr", "-1", "--out", t / "out"], "lr=-1.0"),
    "bad task value": (lambda t: ["train", *TINY, "--task-arg", "min_length=1", "--out", t / "out"],
                       "min_length"),
    "unknown task arg": (lambda t: ["train", *TINY, "--task-arg", "colour=3", "--out", t / "out"],
                         "'colour'"),
    "task arg not KEY=VALUE": (lambda t: ["train", *TINY, "--task-arg", "oops", "--out", t / "out"],
                               "'oops' is not KEY=VALUE"),
    "unknown model arg": (lambda t: ["train", *TINY, "--model-arg", "d_modle=3", "--out", t / "out"],
                          "d_modle"),
    "vocab mismatch via --task-arg": (
        lambda t: ["train", "--config", _config(t, 12, 12), "--task-arg", "d_vocab=20",
                   "--out", t / "out"],
        "model d_vocab=12 is smaller than task 'induction' d_vocab=20"),
    "vocab mismatch via --model-arg": (
        lambda t: ["train", *TINY, "--model-arg", "d_vocab=8", "--out", t / "out"],
        "model d_vocab=8 is smaller than task 'induction' d_vocab=12"),
    "vocab mismatch via --config": (
        lambda t: ["train", "--config", _config(t, 10, 20), "--out", t / "out"],
        "model d_vocab=10 is smaller than task 'induction' d_vocab=20"),
    "n_ctx too short": (lambda t: ["train", *TINY, "--n-ctx", "8", "--out", t / "out"],
                        "n_ctx=8 is shorter than the task's seq_len=16"),
    "conflicting task flags": (
        lambda t: ["train", *TINY, "--task-arg", "d_vocab=20", "--out", t / "out"],
        "--task-arg d_vocab=20 conflicts with --d-vocab 12"),
    "d_vocab for text": (lambda t: ["train", "--task", "text", "--d-vocab", "300", "--out", t / "out"],
                         "--d-vocab does not apply to the 'text' task"),
    "existing folder": (lambda t: ["train", *TINY, "--out", _existing(t)],
                        "out already exists; pass --resume"),
    "eval missing run": (lambda t: ["eval", t / "no_such_run"], "no_such_run does not exist"),
    "eval not a run": (lambda t: ["eval", _existing(t)], "is neither a run folder"),
    "sweep missing spec": (lambda t: ["sweep", t / "nope.json", "--out", t / "sw"],
                           "nope.json does not exist"),
    "sweep bad spec": (lambda t: ["sweep", _config(t, 12, 12), "--out", t / "sw"],
                       "unknown sweep spec key(s) ['model', 'task', 'train']"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, case):
    make_argv, expected = ERROR_CASES[case]
    code, out, err = cli(capsys, *make_argv(tmp_path))
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("kvshift")
    assert expected in err
    if case not in ("existing folder", "eval not a run"):
        assert not (tmp_path / "out").exists()  # nothing written for a bad command


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_unavailable_device_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "train", *TINY, "--device", "cuda", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err


def test_diverged_training_exits_3(tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingDiverged("step 3: loss=nan, grad_norm=nan is not finite; stopped")

    monkeypatch.setattr(trainer_module, "train", diverge)
    code, _, err = cli(capsys, "train", *TINY, "--out", tmp_path / "run")
    assert code == 3 and err.count("\n") == 1
    assert "training diverged: step 3: loss=nan" in err


def _evaluate(model, task, batch_size, n_batches, seed):
    gen = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(n_batches):
            batch = task.sample(batch_size, gen)
            for k, v in task.metrics(model(batch.tokens), batch).items():
                totals[k] = totals.get(k, 0.0) + v
    return {k: v / n_batches for k, v in totals.items()}


def test_eval_prints_the_task_metrics_of_the_saved_model(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", *TINY, "--eval-batches", "2", "--seed", "5", "--out", run)
    assert code == 0, err
    model = HookedKVShiftTransformer.from_pretrained(run / "final", device="cpu").eval()

    # the run's own task, batches and evaluation seed (seed + 2): its last evaluation again
    code, out, err = cli(capsys, "eval", run, "--device", "cpu")
    assert code == 0, err
    printed = json.loads(out)
    task = build_task(json.loads((run / "run.json").read_text())["task"])
    mine = _evaluate(model, task, batch_size=4, n_batches=2, seed=7)
    assert printed["metrics"].keys() == mine.keys()
    for k in mine:
        assert printed["metrics"][k] == pytest.approx(mine[k], rel=1e-6, abs=1e-7), k
    last = [r for r in _metrics(run) if r["kind"] == "eval"][-1]
    assert printed["metrics"]["accuracy"] == pytest.approx(last["eval/accuracy"], abs=1e-7)

    # a checkpoint folder and another task, batch count, batch size and seed
    code, out, err = cli(capsys, "eval", run / "final", "--task", "repeated_tokens", "--d-vocab",
                         "10", "--task-arg", "run_length=5", "--batches", "3", "--batch-size",
                         "5", "--seed", "11", "--device", "cpu")
    assert code == 0, err
    printed = json.loads(out)
    task = build_task({"name": "repeated_tokens", "d_vocab": 10, "run_length": 5})
    mine = _evaluate(model, task, batch_size=5, n_batches=3, seed=11)
    assert printed["task"] == {"name": "repeated_tokens", "d_vocab": 10, "run_length": 5}
    for k in mine:
        assert printed["metrics"][k] == pytest.approx(mine[k], rel=1e-6, abs=1e-7), k

    # a task the model cannot represent
    code, _, err = cli(capsys, "eval", run, "--d-vocab", "30", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert "model d_vocab=12 is smaller than task 'induction' d_vocab=30" in err


def test_sweep_command_prints_the_summary_table(tmp_path, capsys):
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({
        "base": {"model": {"d_model": 16, "d_head": 4, "n_layers": 1, "attn_only": True},
                 "task": {"name": "induction", "d_vocab": 12, "seq_len": 16},
                 "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "device": "cpu"}},
        "variants": {"kv1": {}}, "seeds": [0]}))
    code, out, err = cli(capsys, "sweep", spec, "--out", tmp_path / "sw", "--quiet")
    assert code == 0, err
    assert "| kv1 | 1 |" in out and (tmp_path / "sw" / "kv1__seed0" / "final").is_dir()
    assert (tmp_path / "sw" / "summary.md").read_text() in out
    code, out, _ = cli(capsys, "sweep", "--out", tmp_path / "sw", "--summary-only")
    assert code == 0 and "| kv1 | 1 |" in out


def _flags(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_help_explains_every_flag(capsys):
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0
    for f in dataclasses.fields(TrainConfig):
        assert _flags(f.name) in out, f.name
    for flag in ["--task", "--d-vocab", "--seq-len", "--task-arg", "--layers", "--d-model",
                 "--heads", "--d-head", "--attn-only", "--mlp", "--shift", "--shift-window",
                 "--shift-param", "--shift-init", "--pos", "--norm", "--config", "--out",
                 "--resume", "--overwrite", "--no-bf16", "--no-progress", "(default: 1000)"]:
        assert flag in out, flag
    for argv in (["--help"], ["sweep", "--help"], ["eval", "--help"]):
        code, out, _ = cli(capsys, *argv)
        assert code == 0 and "usage: kvshift" in out

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)
            else:
                yield action

    for action in walk(build_parser()):
        assert action.help and action.help != argparse.SUPPRESS, action.dest


def test_train_under_torchrun_matches_one_process(tmp_path, capsys):
    """`torchrun -m kvshift_lens.cli train`: 2 CPU processes, same losses as 1, one summary."""
    code, _, err = cli(capsys, "train", *TINY, "--log-every", "1", "--out", tmp_path / "one")
    assert code == 0, err
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "kvshift_lens.cli", "train", *TINY, "--log-every", "1", "--out",
         str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished 4 steps") == 1  # rank 0 only
    one = [r for r in _metrics(tmp_path / "one") if r["kind"] == "train"]
    two = [r for r in _metrics(tmp_path / "two") if r["kind"] == "train"]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-6)
    assert (tmp_path / "two" / "final" / "config.json").is_file()


def test_installed_entry_point():
    exe = Path(sys.executable).parent / "kvshift"
    assert exe.is_file(), "run `pip install -e .` to install the kvshift entry point"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "sweep" in proc.stdout and "eval" in proc.stdout


def test_task_names_match_the_task_registry():
    """The command line lists task names without importing torch; they must be the real ones."""
    from kvshift_lens.data.tasks import TASKS
    from kvshift_lens.train.tasks import TASK_NAMES

    assert sorted(TASK_NAMES) == sorted([*TASKS, "text"])


def test_help_imports_neither_torch_nor_transformer_lens():
    code = ("import sys; from kvshift_lens.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'transformer_lens') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
