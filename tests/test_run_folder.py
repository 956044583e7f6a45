"""What kvshift never does to your files: it deletes only its own runs, never before a new run has
started, never ".", "/", your home or a git work tree; one writer per folder (a kernel lock, so a
killed writer leaves none behind); a failed start leaves nothing; a folder made by another sweep
spec is not reported as this spec's results."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvshift_lens import HookedKVShiftTransformer
from kvshift_lens.cli import main
from kvshift_lens.run_folder import (
    LOCK_FILE,
    FolderInUse,
    FolderLock,
    RunFolderError,
    check_deletable_run,
    read_metrics,
    truncate_metrics,
)
from kvshift_lens.train import RunSpec, TrainConfig, resolve_run_spec, train
from kvshift_lens.train.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--batch-size", "4", "--d-model", "16", "--d-head", "4", "--layers", "1",
        "--seq-len", "12", "--d-vocab", "10", "--eval-every", "2", "--no-progress",
        "--device", "cpu"]


def spec(steps: int = 2, **train) -> RunSpec:
    return RunSpec(model=dict(d_model=16, d_head=4, n_layers=1, attn_only=True),
                   task=dict(name="induction", d_vocab=10, seq_len=12),
                   train=TrainConfig(steps=steps, batch_size=4, eval_every=2, eval_batches=1,
                                     progress=False, device="cpu", **train))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (the lock file aside) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture
def user_data(tmp_path) -> Path:
    folder = tmp_path / "mydata"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("a month of notes")
    (folder / "sub" / "data.csv").write_text("1,2,3\n")
    return folder


# ------------------------------------------------------------------ what --overwrite deletes


def test_empty_out_is_an_error_and_touches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = cli(capsys, "train", *TINY, "--out", "", "--overwrite")
    assert code == 2 and "--out is empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_overwrite_refuses_a_folder_that_is_not_a_run(user_data, capsys):
    before = snapshot(user_data)
    code, _, err = cli(capsys, "train", *TINY, "--out", user_data, "--overwrite")
    assert code == 2 and "not a kvshift run folder" in err
    assert snapshot(user_data) == before


def test_overwrite_refuses_a_run_holding_files_kvshift_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    train(spec(), run)
    (run / "analysis.ipynb").write_text("{}")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", *TINY, "--out", run, "--overwrite")
    assert code == 2 and "analysis.ipynb, which kvshift did not write" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("bad", [["--betas", "1.5", "0.9"], ["--grad-clip", "nan"],
                                 ["--weight-decay", "nan"], ["--model-arg", "init_range=NaN"],
                                 ["--model-arg", "eps=-1"], ["--model-arg", "rotary_base=0"]])
def test_overwrite_with_a_bad_argument_keeps_the_old_run(tmp_path, capsys, bad):
    run = tmp_path / "run"
    train(spec(), run)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", *TINY, "--out", run, "--overwrite", *bad)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before


def test_overwrite_never_deletes_dangerous_paths(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(spec(), run)
    monkeypatch.chdir(run)
    with pytest.raises(RunFolderError, match="current folder"):
        check_deletable_run(".")
    with pytest.raises(RunFolderError, match="current folder"):
        check_deletable_run("")
    monkeypatch.chdir(run / "checkpoints")
    with pytest.raises(RunFolderError, match="current folder or one of its parents"):
        check_deletable_run(run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunFolderError, match="filesystem root"):
        check_deletable_run("/")
    monkeypatch.setenv("HOME", str(run))
    with pytest.raises(RunFolderError, match="home folder"):
        check_deletable_run(run)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    (run / ".git").mkdir()
    with pytest.raises(RunFolderError, match="git work tree"):
        check_deletable_run(run)
    (run / ".git").rmdir()
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(RunFolderError, match="symbolic link"):
        check_deletable_run(link)
    check_deletable_run(run)  # the run itself may go


def test_overwrite_replaces_a_run_only_once_the_new_one_has_started(tmp_path):
    run = tmp_path / "run"
    train(spec(seed=1), run)
    old = snapshot(run)

    class Boom(Exception):
        pass

    failing = resolve_run_spec(spec(seed=2))

    def sample(batch_size, generator):  # the first draw: the step-0 evaluation
        raise Boom

    failing.eval_task = type("T", (), {"sample": staticmethod(sample),
                                       "metrics": failing.task.metrics})()
    with pytest.raises(Boom):
        train(failing, run, overwrite=True)
    assert snapshot(run) == old  # the failed start lost nothing
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK_FILE]
    result = train(spec(seed=2), run, overwrite=True)
    assert result.steps == 2
    assert json.loads((run / "run.json").read_text())["train"]["seed"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


def test_a_failed_start_leaves_no_run_behind(tmp_path):
    run = tmp_path / "new_run"
    failing = resolve_run_spec(spec())
    failing.eval_task = None  # the step-0 evaluation fails
    with pytest.raises(AttributeError):
        train(failing, run)
    assert not run.exists()
    train(spec(), run)  # the corrected rerun does not hit "already exists"
    assert (run / "final").is_dir()


# ------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    train(spec(steps=2, checkpoint_every=2), run)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from kvshift_lens.run_folder import FolderLock; "
         f"FolderLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cli(capsys, "train", "--out", run, "--resume")
        assert code == 2 and f"pid {holder.pid}" in err and "another process" in err
        # readers need no lock
        assert cli(capsys, "eval", run)[0] == 0
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait(timeout=30)
        code, _, err = cli(capsys, "train", "--out", run, "--resume")
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    FolderLock(tmp_path).acquire().release()


def test_two_sweeps_on_one_folder(tmp_path):
    sweep = {"base": spec().to_dict(), "variants": {"a": {}}, "seeds": [0]}
    (tmp_path / "s").mkdir()
    with FolderLock(tmp_path / "s", "sweep"):
        with pytest.raises(FolderInUse, match="another process"):
            run_sweep(sweep, tmp_path / "s", log=None)


# ------------------------------------------------------------------ sweeps of another spec


def test_sweep_refuses_a_folder_of_another_spec_but_may_grow(tmp_path, capsys):
    a = {"base": spec().to_dict(), "variants": {"kv": {}}, "seeds": [0]}
    run_sweep(a, tmp_path / "s", log=None)
    b = json.loads(json.dumps(a))
    b["base"]["train"]["lr"] = 3e-3
    with pytest.raises(RunFolderError, match="holds a different sweep"):
        run_sweep(b, tmp_path / "s", log=None)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(b))
    code, out, err = cli(capsys, "sweep", path, "--out", tmp_path / "s")
    assert code == 2 and "holds a different sweep" in err
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["base"]["train"]["lr"] != 3e-3
    grown = json.loads(json.dumps(a))
    grown["seeds"] = [0, 1]
    summary = run_sweep(grown, tmp_path / "s", log=None)
    assert summary.skipped == ["kv__seed0"] and summary.ran == ["kv__seed1"]


# ------------------------------------------------------------------ history and NaN guard


def test_metrics_rewrite_drops_later_and_duplicated_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "kind": "eval", "v": 1}, {"step": 2, "kind": "train", "v": 2},
             {"step": 2, "kind": "train", "v": 3}, {"step": 4, "kind": "train", "v": 4},
             {"step": 4, "kind": "summary"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "ki')
    assert [r["v"] for r in read_metrics(path) if "v" in r] == [1, 2, 3, 4]  # torn line skipped
    truncate_metrics(path, 2)
    assert read_metrics(path) == [{"step": 0, "kind": "eval", "v": 1},
                                  {"step": 2, "kind": "train", "v": 3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_nan_guard_never_writes_a_nonfinite_checkpoint(tmp_path):
    """A finite loss and finite gradients, then an update that leaves a weight at inf: no
    checkpoint is written for that step; the error names the weight."""
    s = spec(steps=8, checkpoint_every=2)
    s.train.eval_every = 8  # the checkpoint at step 4 comes before any evaluation sees it
    model = HookedKVShiftTransformer(resolve_run_spec(s).model,
                                     generator=torch.Generator().manual_seed(0))
    steps = {"n": 0}
    real = model.constrain_shift_

    def explode_after_step_4():
        real()
        steps["n"] += 1
        if steps["n"] == 4:
            with torch.no_grad():
                model.blocks[0].attn.W_O[0, 0, 0] = float("inf")

    model.constrain_shift_ = explode_after_step_4
    from kvshift_lens.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"blocks.0.attn.W_O holds 1 non-finite"):
        train(s, tmp_path / "run", model=model)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002"]
    for folder in (tmp_path / "run" / "checkpoints").glob("step_*"):
        HookedKVShiftTransformer.from_pretrained(folder)  # finite: loads


def test_eval_of_nonfinite_weights_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(spec(), run)
    model = HookedKVShiftTransformer.from_pretrained(run / "final")
    with torch.no_grad():
        model.embed.W_E[3, 1] = float("nan")
    model.save_pretrained(run / "final")
    code, out, err = cli(capsys, "eval", run)
    assert code == 2 and "embed.W_E holds 1 non-finite" in err and out == ""


@pytest.mark.parametrize("damage", ["state_json", "missing_key", "rng", "shape", "tensors"])
def test_damaged_trainer_state_is_one_line_naming_the_file(tmp_path, capsys, damage):
    run = tmp_path / "run"
    train(spec(steps=2, checkpoint_every=2), run)
    ckpt = run / "checkpoints" / "step_00000002"
    meta_path, tensors_path = ckpt / "trainer_state.json", ckpt / "trainer_state.safetensors"
    meta = json.loads(meta_path.read_text())
    if damage == "state_json":
        meta_path.write_text("{broken")
    elif damage == "missing_key":
        del meta["optimizer"]
        meta_path.write_text(json.dumps(meta))
    elif damage in ("rng", "shape"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(tensors_path))
        if damage == "rng":
            del tensors["rng.data"]
        else:
            name = next(k for k in tensors if k.endswith(".exp_avg"))
            tensors[name] = torch.zeros(3)
        save_file(tensors, str(tensors_path))
        del meta["state_sha256"]  # as if saved before checksums: the structure check must catch it
        meta_path.write_text(json.dumps(meta))
    else:
        tensors_path.write_bytes(tensors_path.read_bytes()[:-50])
    code, _, err = cli(capsys, "train", "--out", run, "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(ckpt) in err


def test_stop_at_target_saves_the_target_step_once(tmp_path):
    s = resolve_run_spec(spec(steps=6, stop_at_target=True, target_accuracy=0.5))
    metrics = s.task.metrics

    def reached_at_step_2(logits, batch):  # the evaluations at steps 0 and 2
        reached_at_step_2.calls += 1
        return {**metrics(logits, batch), "accuracy": 1.0 if reached_at_step_2.calls > 1 else 0.0}

    reached_at_step_2.calls = 0
    s.eval_task = type("T", (), {"sample": staticmethod(s.task.sample),
                                 "metrics": staticmethod(reached_at_step_2)})()
    result = train(s, tmp_path / "run")
    assert result.steps == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_resume_without_a_checkpoint_does_not_duplicate_metrics(tmp_path):
    run = tmp_path / "run"
    straight = tmp_path / "straight"
    train(spec(steps=4, log_every=1), straight)
    s = resolve_run_spec(spec(steps=4, log_every=1))
    real = s.task.sample
    calls = {"n": 0}

    class Crash(Exception):
        pass

    def crash_on_third(batch_size, generator):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return real(batch_size, generator)

    s.task = type("T", (), {"sample": staticmethod(crash_on_third),
                            "metrics": s.task.metrics})()
    with pytest.raises(Crash):
        train(s, run)
    assert not (run / "checkpoints").exists()
    train(spec(steps=4, log_every=1), run, resume=True)
    strip = lambda rs: [r for r in rs if r["kind"] != "summary"]  # noqa: E731
    assert strip(read_metrics(run / "metrics.jsonl")) == strip(read_metrics(straight / "metrics.jsonl"))


def test_a_lock_holder_that_dies_releases_the_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c",
                             "import time; from kvshift_lens.run_folder import FolderLock; "
                             f"FolderLock({str(tmp_path)!r}).acquire(); print('x', flush=True); "
                             "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "x"
    with pytest.raises(FolderInUse):
        FolderLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while True:
        try:
            FolderLock(tmp_path).acquire().release()
            break
        except FolderInUse:
            assert time.time() < deadline
            time.sleep(0.05)
