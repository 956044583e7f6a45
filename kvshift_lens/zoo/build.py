"""Build zoo models: train from the spec with the project's trainer, export the weights in float16
to the zoo folder, measure the card.

``python -m kvshift_lens.zoo build NAME [NAME ...] [--out runs/zoo] [--jobs 2] [--threads 1]``

A run folder ``OUT/NAME`` whose training has finished (``final/`` exists) is reused: the build
then only exports and measures. ``--retrain`` replaces it (``train(..., overwrite=True)``, which
only ever deletes a kvshift run). ``--jobs N`` builds up to N models at once, each in its own
process with ``--threads`` torch threads.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvshift_lens import zoo
from kvshift_lens.run_folder import FINAL_DIR, RUN_FILE
from kvshift_lens.zoo.registry import EXPORT_DTYPE, TRAIN_INFO

logger = logging.getLogger(__name__)

def check_run_matches_spec(name: str, run_dir: Path) -> None:
    """Raise ValueError naming the differing settings when the run in ``run_dir`` was not made
    from ``name``'s spec (every model, task and train setting the spec pins)."""
    from kvshift_lens.train.config import EXECUTION_ONLY

    run = json.loads((run_dir / RUN_FILE).read_text())
    spec = zoo.spec(name)
    diff = [f"{section}.{k}" for section in ("model", "task", "train")
            for k, v in spec[section].items()
            if k not in EXECUTION_ONLY and run[section].get(k) != v]
    if diff:
        raise ValueError(f"the run in {run_dir} differs from the spec of {name!r} in {diff}; "
                         "pass --retrain to replace it")


def train_model(name: str, out: Path, retrain: bool = False) -> Path:
    """Train ``name`` from its spec into ``out/name`` (reusing a finished run unless ``retrain``);
    return the run folder."""
    import torch

    from kvshift_lens.train import train

    run_dir = out / name
    info_file = run_dir / TRAIN_INFO
    if (run_dir / FINAL_DIR).is_dir() and info_file.is_file() and not retrain:
        check_run_matches_spec(name, run_dir)
        logger.info("%s: reusing the finished run in %s", name, run_dir)
        return run_dir
    resume = (run_dir / RUN_FILE).is_file() and not retrain
    start = time.perf_counter()
    train(zoo.spec(name), run_dir, resume=resume, overwrite=retrain)
    wall = time.perf_counter() - start
    info = {"wall_seconds": wall, "resumed": resume, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return run_dir


def export_model(name: str, run_dir: Path, dest: Path | None = None) -> Path:
    """Save the run's final model in :data:`EXPORT_DTYPE` to ``dest`` (default the zoo folder)."""
    import torch

    from kvshift_lens.model import HookedKVShiftTransformer

    dest = zoo.MODELS_DIR / name if dest is None else dest
    model = HookedKVShiftTransformer.from_pretrained(run_dir / FINAL_DIR, device="cpu")
    model.to(getattr(torch, EXPORT_DTYPE))
    model.save_pretrained(dest)
    return dest


def build(name: str, out: str | os.PathLike = "runs/zoo", retrain: bool = False,
          dest: Path | None = None) -> dict[str, Any]:
    """Train (or reuse), export and measure ``name``; return its card."""
    zoo.spec(name)  # unknown names fail before anything is written
    out = Path(out)
    run_dir = train_model(name, out, retrain=retrain)
    from kvshift_lens.zoo.card import measure_card, write_card

    folder = export_model(name, run_dir, dest)
    card = measure_card(name, folder, run_dir)
    write_card(card, folder)
    logger.info("%s: val loss %.4f, card in %s", name, card["val_loss"], folder)
    return card


def build_many(names: list[str], out: str, jobs: int, threads: int, retrain: bool) -> int:
    """Build ``names`` with up to ``jobs`` child processes; return the number that failed."""
    pending, running, failed = list(names), [], 0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "kvshift_lens.zoo", "build", name, "--out", out,
                   "--jobs", "1", "--threads", str(threads)] + (["--retrain"] if retrain else [])
            logger.info("starting %s", " ".join(cmd))
            running.append((name, subprocess.Popen(cmd, env=env)))
        time.sleep(1.0)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                if proc.returncode:
                    failed += 1
                    logger.error("%s failed with exit status %d", name, proc.returncode)
    return failed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvshift_lens.zoo",
                                     description="List or build the model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="print the zoo's model names")
    ls.add_argument("--table", action="store_true",
                    help="print a markdown table of the built models' cards instead")
    b = sub.add_parser("build", help="train, export and measure zoo models")
    b.add_argument("names", nargs="+", metavar="NAME", help=f"one of {zoo.list_models()} or 'all'")
    b.add_argument("--out", default="runs/zoo", help="where the run folders go (default runs/zoo)")
    b.add_argument("--jobs", type=int, default=1, help="models built at once (default 1)")
    b.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1)")
    b.add_argument("--retrain", action="store_true", help="replace finished runs in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "list":
        if args.table:
            from kvshift_lens.zoo.card import zoo_table

            sys.stdout.write(zoo_table())
        else:
            sys.stdout.write("\n".join(zoo.list_models()) + "\n")
        return 0
    names = zoo.list_models() if args.names == ["all"] else args.names
    for name in names:
        if not zoo.is_zoo_name(name):
            parser.error(f"unknown zoo model {name!r}; the zoo has {zoo.list_models()}")
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs={args.jobs} and --threads={args.threads} must be >= 1")
    if len(names) > 1 and args.jobs > 1:
        return 1 if build_many(names, args.out, args.jobs, args.threads, args.retrain) else 0
    import torch

    torch.set_num_threads(args.threads)
    for name in names:
        build(name, args.out, retrain=args.retrain)
    return 0
