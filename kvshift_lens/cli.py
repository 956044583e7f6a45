"""The ``kvshift`` command line: ``kvshift train``, ``kvshift sweep``, ``kvshift eval``,
``kvshift report``, and ``kvshift repro``.

Every flag is explained by ``--help`` at each level. Mistakes a user can fix (a bad flag or value, a
missing file, a task the model cannot represent, an existing run folder) end with one line on
stderr and exit code 2; a run whose loss became NaN/inf ends with exit code 3; only unexpected
failures show a traceback (set ``KVSHIFT_TRACEBACK=1`` to see one for the others too).

Data parallel training: ``torchrun --nproc_per_node 2 -m kvshift_lens.cli train ...``.

The parser imports neither torch nor TransformerLens (``kvshift --help`` answers at once); each
command imports what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from kvshift_lens.options import NormalizationType, PositionalEmbeddingType, ShiftInit, ShiftParam
from kvshift_lens.run_folder import FINAL_DIR, RUN_FILE, RunFolderError
from kvshift_lens.train.config import DEFAULT_SHIFT_INIT, DEFAULT_SHIFT_PARAM, TrainConfig
from kvshift_lens.train.tasks import task_names

PROG = "kvshift"
EXIT_ERROR = 2
EXIT_DIVERGED = 3
EXIT_RUNS_FAILED = 1

SHIFT_MODES = {
    "kv": {"shift_k": True, "shift_v": True, "shift_q": False},
    "k": {"shift_k": True, "shift_v": False, "shift_q": False},
    "v": {"shift_k": False, "shift_v": True, "shift_q": False},
    "q": {"shift_k": False, "shift_v": False, "shift_q": True},
    "qkv": {"shift_k": True, "shift_v": True, "shift_q": True},
    "none": {"shift_k": False, "shift_v": False, "shift_q": False},
}
"""``--shift`` choices: which projections are shifted."""

MODEL_FLAGS = {
    "layers": "n_layers",
    "d_model": "d_model",
    "heads": "n_heads",
    "d_head": "d_head",
    "n_ctx": "n_ctx",
    "attn_only": "attn_only",
    "shift_window": "shift_window",
    "shift_param": "shift_param",
    "shift_init": "shift_init",
    "pos": "positional_embedding_type",
    "norm": "normalization_type",
}
"""argparse dest -> KVShiftConfig field."""

TASK_FLAGS = {"d_vocab": "d_vocab", "seq_len": "seq_len"}
"""argparse dest -> task parameter."""

_TRAIN_HELP = {
    "steps": "optimiser steps",
    "batch_size": "global batch size (split evenly across processes under torchrun)",
    "lr": "peak AdamW learning rate (linear warm-up, then cosine decay)",
    "weight_decay": "AdamW weight decay, on weight matrices only",
    "shift_lr_scale": "the shift coefficients' learning rate is --lr times this (they live on a scale "
                      "of 1, the weights on init_range)",
    "betas": "AdamW betas",
    "warmup_steps": "linear learning-rate warm-up steps",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine decay target)",
    "grad_clip": "max global gradient norm (0 disables clipping)",
    "eval_every": "evaluate (task metrics + shift coefficients) every N steps and at the end",
    "eval_batches": "batches per evaluation (always the same evaluation data)",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "how many step checkpoints to keep",
    "seed": "seed of the model initialisation, data and evaluation generators",
    "device": "'auto' (cuda when available), 'cpu' or 'cuda[:index]'",
    "bf16": "bfloat16 autocast on CUDA (ignored on CPU)",
    "compile": "wrap the model in torch.compile",
    "target_accuracy": "report the first evaluated step whose accuracy reaches this",
    "stop_at_target": "stop training once --target-accuracy is reached",
    "log_every": "write the training loss to metrics.jsonl every N steps",
    "progress": "show a progress bar on stderr",
}
_TRAIN_DEFAULTS = TrainConfig()
assert set(_TRAIN_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}, \
    "every TrainConfig field needs a flag"


class CLIError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2."""


class _UsageError(Exception):
    pass


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), raised to :func:`main`."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON (plain text when it is not JSON)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (e.g. min_length=4, bos=false, source=stdlib)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _add_task_args(p: argparse.ArgumentParser, default_task: str | None, default_note: str) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=task_names(), default=default_task, metavar="NAME",
                   help=f"the task, one of {', '.join(task_names())}{default_note}")
    g.add_argument("--d-vocab", type=int, default=None, metavar="N",
                   help="the task's vocabulary size (None: the task's default; not for 'text', "
                        "whose vocabulary is its tokenizer's)")
    g.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="the task's sequence length (None: the task's default)")
    g.add_argument("--task-arg", action="append", type=_key_value, default=None,
                   metavar="KEY=VALUE",
                   help="any other task parameter, VALUE parsed as JSON (repeatable), e.g. "
                        "--task-arg min_length=4 --task-arg source=stdlib for 'text'")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (KVShiftConfig fields)")
    g.add_argument("--layers", type=int, default=1, metavar="N",
                   help="transformer blocks (n_layers)")
    g.add_argument("--d-model", type=int, default=64, metavar="N",
                   help="residual stream width (d_model)")
    g.add_argument("--heads", type=int, default=None, metavar="N",
                   help="attention heads (n_heads; None: d_model // d_head)")
    g.add_argument("--d-head", type=int, default=16, metavar="N", help="width of each head (d_head)")
    g.add_argument("--n-ctx", type=int, default=None, metavar="N",
                   help="context length (n_ctx; None: the task's seq_len)")
    mlp = g.add_mutually_exclusive_group()
    mlp.add_argument("--attn-only", dest="attn_only", action="store_const", const=True,
                     default=False, help="attention-only blocks, no MLPs (attn_only=True)")
    mlp.add_argument("--mlp", dest="attn_only", action="store_const", const=False,
                     default=False, help="blocks with MLPs (attn_only=False, the config's default)")
    g.add_argument("--shift", choices=list(SHIFT_MODES), default="kv",
                   help="which projections are shifted: kv = keys and values (the paper), k, v, q, "
                        "qkv, none = vanilla attention (sets shift_k, shift_v, shift_q)")
    g.add_argument("--shift-window", type=int, default=1, metavar="W",
                   help="shift window: mix positions t..t-W (shift_window; 1 is the paper)")
    g.add_argument("--shift-param", choices=list(get_args(ShiftParam)), default=DEFAULT_SHIFT_PARAM,
                   help="shift coefficients: free (the paper), convex (on the simplex) or "
                        "gain_mix (a simplex mix times a per-head gain; the default)")
    g.add_argument("--shift-init", choices=list(get_args(ShiftInit)), default=DEFAULT_SHIFT_INIT,
                   help="shift initialisation: identity (exactly vanilla), uniform (1/(W+1) per "
                        "lag), normal (identity + noise) or induction (the paper's one-layer "
                        "induction point)")
    g.add_argument("--pos", choices=list(get_args(PositionalEmbeddingType)), default="standard",
                   help="positional embedding (positional_embedding_type)")
    g.add_argument("--norm", choices=[*get_args(NormalizationType), "none"], default="LN",
                   help="normalisation (normalization_type; none = no normalisation)")
    g.add_argument("--model-arg", action="append", type=_key_value, default=None,
                   metavar="KEY=VALUE",
                   help="any other KVShiftConfig field, VALUE parsed as JSON (repeatable), e.g. "
                        "--model-arg act_fn=relu --model-arg d_vocab=128")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (TrainConfig fields)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(_TRAIN_DEFAULTS, f.name)
        helptext = _TRAIN_HELP[f.name]
        if isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=helptext)
        elif f.name == "betas":
            g.add_argument(flag, type=float, nargs=2, default=list(default),
                           metavar=("BETA1", "BETA2"), help=helptext)
        else:
            g.add_argument(flag, type=type(default), default=default,
                           metavar=type(default).__name__.upper(), help=helptext)


TRAIN_EPILOG = """\
Settings come from, in increasing priority: the defaults shown here (or, with --config, the file's
values and the configs' own defaults instead), then the flags given on the command line. With
--resume and no --config, the run folder's run.json is the base, so `kvshift train --out RUN
--resume` continues a run with its own settings.

Examples:
  kvshift train --task induction --d-vocab 64 --seq-len 64 --steps 2000 --out runs/kv1
  kvshift train --config run.json --lr 3e-4 --out runs/lr3e-4
  kvshift train --out runs/kv1 --resume
  torchrun --nproc_per_node 2 -m kvshift_lens.cli train --device cpu --out runs/ddp
"""

SWEEP_DESCRIPTION = """\
Run variants x seeds x sizes from one spec, in parallel, one run folder per run, and write
DIR/summary.json and DIR/summary.md (steps to the target accuracy, final accuracy and loss,
tokens/s per variant and size). Running again skips finished runs and resumes interrupted ones.

Spec (JSON):
  {"base":     {"model": {...}, "task": {...}, "train": {...}},     a RunSpec dict
   "variants": {"kvshift_1L": {"model": {"n_layers": 1}},
                "vanilla_2L": {"model": {"n_layers": 2, "shift_k": false, "shift_v": false}}},
   "seeds":    [0, 1, 2],                                           optional, default [0]
   "sizes":    {"d64": {"model": {"d_model": 64}}}}                 optional
Each run is deep_merge(base, variant, size) with train.seed = seed, in
DIR/<variant>[__<size>]__seed<k>/. Exit code 1 when some run failed (see the summary).
"""


REPRO_DESCRIPTION = """\
Reproduce the paper's toy results (REPRODUCTION.md). Each experiment is a sweep with one folder
per run under OUT/<experiment>/:

  kvshift repro run --out runs/repro --jobs 2          # every experiment, about 80 minutes
  kvshift repro run depth width --out runs/repro       # some of them
  kvshift repro report runs/repro                      # REPRODUCTION.md + docs/reproduction/*.png
  kvshift repro spec depth > depth.json                # a spec to edit and run with kvshift sweep
"""

REPORT_DESCRIPTION = """\
Write one self-contained HTML file about a run (it works offline): a text summary (steps to the
target accuracy, the induction phase change, final accuracy, the learned coefficients per head),
loss and accuracy curves, the final coefficients, their trajectories, the heads in the (alpha1,
beta1) plane, the loss landscape over that plane for one-layer models with shifted keys and values,
and circuitsvis attention patterns (plain and effective) and per-token losses on a repeated
sequence. Also writes PNG and SVG files of the figures beside it (FILE_figures/) when kaleido and
Chrome/Chromium are installed; the report says when it could not.
"""


def _grid_size(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} must be >= 2")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``kvshift`` argument parser."""
    from kvshift_lens import __version__

    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="Train, sweep and evaluate KV-shift transformers.",
                     epilog="Run 'kvshift COMMAND --help' for the flags of each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    p = sub.add_parser("train", formatter_class=_Formatter, help="train one model",
                       description="Train one model on a task and write a run folder (run.json, "
                                   "metrics.jsonl, checkpoints/, final/).",
                       epilog=TRAIN_EPILOG)
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, metavar="RUN_DIR",
                   help="the run folder to write (required)")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="a RunSpec JSON file ({\"model\": ..., \"task\": ..., \"train\": ...}, e.g. "
                        "another run's run.json); flags given on the command line override it")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", default=False,
                      help="continue the run in --out from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", default=False,
                      help="delete an existing --out folder and start again")
    _add_task_args(p, "induction", "; a --config file's task when not given")
    _add_model_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", formatter_class=_Formatter, help="run a sweep of runs",
                       description=SWEEP_DESCRIPTION)
    p.add_argument("spec", nargs="?", default=None, metavar="SPEC.json",
                   help="the sweep spec (not needed with --summary-only)")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, metavar="DIR",
                   help="the sweep folder (required)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="runs in parallel, each in its own worker process")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads per run (None: 1 per worker with --jobs > 1, torch's "
                        "default with --jobs 1)")
    p.add_argument("--overwrite", action="store_true", default=False,
                   help="rerun finished runs too, from scratch")
    p.add_argument("--summary-only", action="store_true", default=False,
                   help="only rebuild summary.json/summary.md from the run folders")
    p.add_argument("--quiet", action="store_true", default=False,
                   help="no per-run progress lines on stderr")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", formatter_class=_Formatter, help="evaluate a trained model",
                       description="Evaluate a run's final model (RUN_DIR/final) or a checkpoint "
                                   "folder (with config.json) on the run's task (from run.json) "
                                   "or the task given by the flags; print the metrics as JSON.")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (its final/ model is used) or a checkpoint folder")
    _add_task_args(p, None, " (None: the run's task, from its run.json)")
    p.add_argument("--batches", type=_positive_int, default=None, metavar="N",
                   help="evaluation batches (None: the run's eval_batches, else 4)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="sequences per batch (None: the run's batch_size, else 64)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the evaluation batches (None: the run's seed + 2, the trainer's "
                        "evaluation data, so the metrics match the run's last evaluation)")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda when available), 'cpu' or 'cuda[:index]'")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", formatter_class=_Formatter, help="write a run's HTML report",
                       description=REPORT_DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (written by kvshift train)")
    p.add_argument("--out", default=None, metavar="FILE.html",
                   help="the report file (None: RUN_DIR/report.html)")
    p.add_argument("--no-static", dest="static", action="store_false", default=True,
                   help="do not export PNG/SVG files of the figures (they need kaleido and "
                        "Chrome/Chromium)")
    p.add_argument("--no-landscape", dest="landscape", action="store_false", default=True,
                   help="skip the loss landscape (the slowest part)")
    p.add_argument("--landscape-grid", type=_grid_size, default=15, metavar="N",
                   help="landscape grid points per axis")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("repro", formatter_class=_Formatter,
                       help="reproduce the paper's toy results (REPRODUCTION.md)",
                       description=REPRO_DESCRIPTION)
    rsub = p.add_subparsers(dest="repro_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    r = rsub.add_parser("run", formatter_class=_Formatter, help="run experiments (sweeps)",
                        description="Run the named experiments (default: all) as sweeps into "
                                    "OUT/<experiment>/. Finished runs are skipped and "
                                    "interrupted ones resumed, so running again finishes a set.")
    r.add_argument("names", nargs="*", metavar="EXPERIMENT",
                   help="experiments to run (default: all): " + ", ".join(_repro_names()))
    r.add_argument("--out", default="runs/repro", metavar="DIR", help="the output folder")
    r.add_argument("--quick", action="store_true", default=False,
                   help="a few steps per run: a smoke test of the pipeline, numbers meaningless")
    r.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="runs in parallel, each in its own worker process")
    r.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads per run (None: 1 per worker with --jobs > 1)")
    r.add_argument("--overwrite", action="store_true", default=False,
                   help="rerun from scratch, also over a folder holding a different sweep")
    r.add_argument("--quiet", action="store_true", default=False,
                   help="no per-run progress lines on stderr")
    r.set_defaults(func=cmd_repro_run)
    r = rsub.add_parser("report", formatter_class=_Formatter,
                        help="write REPRODUCTION.md and its figures from the run folders",
                        description="Analyse the experiments under DIR and write the markdown "
                                    "report (claim, command, figure, numbers, verdict per "
                                    "experiment) and PNG figures. Notes between '<!-- notes:NAME "
                                    "-->' markers in an existing report are kept.")
    r.add_argument("root", metavar="DIR", help="the folder 'kvshift repro run --out' wrote")
    r.add_argument("--markdown", default=None, metavar="FILE.md",
                   help="the report to write (None: REPRODUCTION.md for a full set, DIR/"
                        "REPRODUCTION.md for a --quick one, which never replaces a full report)")
    r.add_argument("--figures", default=None, metavar="DIR",
                   help="where the PNG figures go (None: docs/reproduction for a full set, "
                        "DIR/figures for a --quick one)")
    r.add_argument("--no-static", dest="static", action="store_false", default=True,
                   help="write no PNG figures (they need kaleido and Chrome/Chromium)")
    r.add_argument("--landscape-grid", type=_grid_size, default=21, metavar="N",
                   help="landscape grid points per axis")
    r.set_defaults(func=cmd_repro_report)
    r = rsub.add_parser("spec", formatter_class=_Formatter,
                        help="print an experiment's sweep spec (JSON)",
                        description="Print the sweep spec of one experiment, e.g. to edit it and "
                                    "run it with 'kvshift sweep'.")
    r.add_argument("name", metavar="EXPERIMENT", help=", ".join(_repro_names()))
    r.add_argument("--quick", action="store_true", default=False, help="the smoke-test spec")
    r.set_defaults(func=cmd_repro_spec)
    return parser


def _repro_names() -> list[str]:
    from kvshift_lens.repro.experiments import EXPERIMENTS

    return list(EXPERIMENTS)


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        elif action.option_strings and action.dest != "help":
            action.default = argparse.SUPPRESS


def _explicit_args(argv: Sequence[str] | None) -> dict[str, Any]:
    """The flags given on the command line (no defaults)."""
    parser = build_parser()
    _suppress_defaults(parser)
    return vars(parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _read_json_file(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {p} does not exist")
    if not p.is_file():
        raise CLIError(f"{what} {p} is not a file")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{what} {p} is not valid JSON ({e})") from None
    except OSError as e:
        raise CLIError(f"cannot read {what} {p}: {e.strerror}") from None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _flag_sections(values: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Model fields, task parameters and train settings named by parsed flag values."""
    model: dict[str, Any] = {}
    for dest, name in MODEL_FLAGS.items():
        if dest not in values:
            continue
        value = values[dest]
        if dest == "norm":
            model[name] = None if value == "none" else value
        elif value is not None:
            model[name] = value
    if "shift" in values:
        model.update(SHIFT_MODES[values["shift"]])
    task = {name: values[dest] for dest, name in TASK_FLAGS.items()
            if values.get(dest) is not None}
    train = {f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name in values}
    if "betas" in train:
        train["betas"] = list(train["betas"])
    return model, task, train


def _apply_key_values(target: dict[str, Any], pairs: list[tuple[str, Any]] | None, flag: str,
                      named: Mapping[str, Any], flag_of: Mapping[str, str]) -> None:
    for key, value in pairs or []:
        if key == "name":
            raise CLIError(f"{flag} name=... is not allowed; choose the task with --task")
        if key in named and named[key] != value:
            raise CLIError(f"{flag} {key}={json.dumps(value)} conflicts with "
                           f"{flag_of.get(key, key)} {json.dumps(named[key])}")
        target[key] = value


def _task_spec(args: argparse.Namespace, explicit: Mapping[str, Any],
               base_task: Mapping[str, Any] | None, default_name: str | None,
               base_note: str) -> dict[str, Any]:
    name = explicit.get("task") or (base_task or {}).get("name") or default_name
    if name is None:
        raise CLIError(f"no task to evaluate on: {base_note}; pass --task")
    task = dict(base_task) if base_task and base_task.get("name") == name else {"name": name}
    _, named, _ = _flag_sections(explicit)
    if name == "text" and "d_vocab" in named:
        raise CLIError("--d-vocab does not apply to the 'text' task: its vocabulary is its "
                       "tokenizer's (use --task-arg tokenizer=bpe --task-arg bpe_vocab_size=N)")
    _apply_key_values(task, explicit.get("task_arg"), "--task-arg", named,
                      {"d_vocab": "--d-vocab", "seq_len": "--seq-len"})
    task.update(named)
    return task


def _train_spec_dict(args: argparse.Namespace, explicit: Mapping[str, Any]) -> dict[str, Any]:
    base, what = None, ""
    if args.config is not None:
        base = _read_json_file(args.config, "config file")
        what = f"config file {args.config}"
    elif args.resume and (Path(args.out) / RUN_FILE).is_file():
        base = _read_json_file(Path(args.out) / RUN_FILE, "run file")
        what = f"{Path(args.out) / RUN_FILE}"
    if base is not None:
        if not isinstance(base, dict):
            raise CLIError(f"{what} must hold a JSON object with 'model', 'task' and 'train'")
        for section in ("model", "task", "train"):
            if not isinstance(base.get(section, {}), dict):
                raise CLIError(f"{what}: {section!r} must be a JSON object")
        spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
        spec.setdefault("model", {})
        spec.setdefault("train", {})
        given: Mapping[str, Any] = explicit
    else:
        spec = {"model": {}, "task": {}, "train": {}}
        given = vars(args)  # the defaults shown by --help, then the flags given
    model, _, train = _flag_sections(given)
    spec["model"].update(model)
    spec["train"].update(train)
    exp_model, _, _ = _flag_sections(explicit)
    flag_of = {name: "--" + dest.replace("_", "-") for dest, name in MODEL_FLAGS.items()}
    flag_of.update({k: "--shift" for k in ("shift_k", "shift_v", "shift_q")})
    extra: dict[str, Any] = {}
    _apply_key_values(extra, explicit.get("model_arg"), "--model-arg", exp_model, flag_of)
    spec["model"].update(extra)
    spec["model"].update(exp_model)
    base_task = spec.get("task") if base is not None else None
    spec["task"] = _task_spec(args, explicit, base_task if isinstance(base_task, dict) else None,
                              args.task, "")
    return spec


def _fmt_metrics(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.train.config import resolve_run_spec
    from kvshift_lens.train.sweep import write_result
    from kvshift_lens.train.trainer import train

    if str(args.out).strip() == "":
        raise CLIError("--out is empty; name the run folder to write")
    spec_dict = _train_spec_dict(args, explicit)
    try:
        run = resolve_run_spec(spec_dict)
    except (ValueError, TypeError) as e:
        raise CLIError(f"invalid config: {e}") from None
    out = Path(args.out)
    try:
        result = train(run, out, resume=args.resume, overwrite=args.overwrite)
    except ValueError as e:  # run folder, checkpoint: passed on; device, batch vs processes
        if _is_user_error(e):
            raise
        raise CLIError(str(e)) from None
    finally:
        _destroy_process_group()
    if _is_main_process():
        write_result(out, result, resumed=args.resume)
        target = run.train.target_accuracy
        reached = (f"step {result.steps_to_target}" if result.steps_to_target is not None
                   else f"not reached in {result.steps} steps")
        print(f"finished {result.steps} steps in {out} ({result.tokens_per_second:,.0f} tokens/s)")
        print(f"steps to target (accuracy >= {target:g}): {reached}")
        print(f"final: {_fmt_metrics(result.final_metrics)}")
        print(f"model: {out / FINAL_DIR}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_sweep(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.train.sweep import progress_log, run_sweep, summarize

    if args.summary_only:
        try:
            summary = summarize(args.out)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    else:
        if args.spec is None:
            raise CLIError("the sweep spec SPEC.json is required (or pass --summary-only)")
        if not Path(args.spec).is_file():
            raise CLIError(f"sweep spec {args.spec} does not exist")
        try:
            summary = run_sweep(args.spec, args.out, jobs=args.jobs, overwrite=args.overwrite,
                                threads=args.threads, log=None if args.quiet else progress_log)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
    print(summary.to_markdown(), end="")
    print(f"\nsummary: {Path(args.out) / 'summary.md'}, {Path(args.out) / 'summary.json'}")
    return EXIT_RUNS_FAILED if summary.failed else 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _find_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) for a run folder or a checkpoint folder."""
    from kvshift_lens.checkpoint import CONFIG_FILE
    from kvshift_lens.run_folder import model_folder

    if not path.exists():
        raise CLIError(f"run folder or checkpoint {path} does not exist")
    if not path.is_dir():
        raise CLIError(f"{path} is not a folder (expected a run folder or a checkpoint folder)")
    if (path / CONFIG_FILE).is_file():
        for parent in (path.parent, path.parent.parent):
            if (parent / RUN_FILE).is_file():
                return path, parent
        return path, None
    if (path / RUN_FILE).is_file():
        found = model_folder(path)
        if found is None:
            raise CLIError(f"run {path} has no final/ model and no checkpoint yet")
        return found, path
    raise CLIError(f"{path} is neither a run folder (with final/) nor a checkpoint folder "
                   "(with config.json)")


def cmd_eval(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.model import HookedKVShiftTransformer
    from kvshift_lens.train.evaluation import evaluate
    from kvshift_lens.train.tasks import build_tasks
    from kvshift_lens.train.trainer import resolve_device

    ckpt, run_dir = _find_checkpoint(Path(args.path))
    run = _read_json_file(run_dir / RUN_FILE, "run file") if run_dir is not None else None
    if run is not None and not isinstance(run, dict):
        raise CLIError(f"{run_dir / RUN_FILE} must hold a JSON object")
    run_task = run.get("task") if run else None
    task_spec = _task_spec(args, explicit, run_task if isinstance(run_task, dict) else None, None,
                           f"{ckpt} has no run.json beside it")
    try:
        _, task = build_tasks(task_spec)  # text: the validation split
    except (ValueError, TypeError) as e:
        raise CLIError(f"invalid task: {e}") from None
    run_train = run.get("train", {}) if run else {}
    batch_size = args.batch_size or run_train.get("batch_size", 64)
    n_batches = args.batches or run_train.get("eval_batches", 4)
    seed = args.seed if args.seed is not None else run_train.get("seed", 0) + 2
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"bad --device: {e}") from None
    model = HookedKVShiftTransformer.from_pretrained(ckpt, device=str(device))
    if model.cfg.d_vocab < task.d_vocab:
        raise CLIError(f"model d_vocab={model.cfg.d_vocab} is smaller than task "
                       f"{task_spec['name']!r} d_vocab={task.d_vocab}")
    if model.cfg.n_ctx < task.seq_len:
        raise CLIError(f"model n_ctx={model.cfg.n_ctx} is shorter than the task's "
                       f"seq_len={task.seq_len}")
    metrics = evaluate(model, task, batch_size, n_batches, seed, device)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise CLIError(f"the model in {ckpt} gives a non-finite {bad[0]} ({metrics[bad[0]]}) on "
                       "this task; its weights are finite, so it has diverged numerically")
    print(json.dumps({"checkpoint": str(ckpt), "task": task_spec, "batches": n_batches,
                      "batch_size": batch_size, "seed": seed, "metrics": metrics}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.report import ReportError, generate_report

    out = Path(args.out) if args.out is not None else None
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise CLIError(f"--out {out} must name an .html file")
    try:
        outcome = generate_report(args.run_dir, out, static=args.static,
                                  landscape=args.landscape, landscape_grid=args.landscape_grid)
    except ReportError as e:
        raise CLIError(str(e)) from None
    print(f"report: {outcome.path}")
    if outcome.static is None:
        print("static figures: not asked for (--no-static)")
    elif outcome.static.status == "written":
        print(f"static figures: {outcome.static.directory} ({outcome.static.message})")
    else:
        print(f"static figures: {outcome.static.status}: {outcome.static.message}")
    print(outcome.summary.to_text())
    return 0


def cmd_repro_run(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.repro.run import run_experiments

    try:
        summaries = run_experiments(args.out, args.names, quick=args.quick, jobs=args.jobs,
                                    threads=args.threads, overwrite=args.overwrite,
                                    log=None if args.quiet else _log)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    failed = 0
    for name, summary in summaries.items():
        n_failed = len(summary.failed)
        failed += n_failed
        n_done = sum(r.status == "finished" for r in summary.runs)
        print(f"{name}: {n_done} runs finished" + (f", {n_failed} failed" if n_failed else ""))
        print(f"  {Path(args.out) / name / 'summary.md'}")
    print(f"next: kvshift repro report {args.out}")
    return EXIT_RUNS_FAILED if failed else 0


def cmd_repro_report(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.repro.report import build_report

    if args.markdown is not None and Path(args.markdown).suffix.lower() != ".md":
        raise CLIError(f"--markdown {args.markdown} must name a .md file")
    try:
        result = build_report(args.root, args.markdown or "", args.figures or "",
                              static=args.static, landscape_grid=args.landscape_grid)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    for s in result.sections:
        print(f"{s.name:10s} {s.verdict:15s} {s.reason}")
    print(f"report: {result.markdown}")
    print(f"figures: {len(result.figures)} written ({result.static_note})")
    return 0


def cmd_repro_spec(args: argparse.Namespace, explicit: Mapping[str, Any]) -> int:
    from kvshift_lens.repro.experiments import experiment

    try:
        exp = experiment(args.name)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(exp.spec(args.quick), indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _one_line(prog: str, message: str) -> str:
    text = " ".join(str(message).split())
    return f"{prog}: error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvshift`` command line; returns the exit code (never raises SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        explicit = _explicit_args(argv)
    except _UsageError as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    prog = f"{PROG} {args.command}"
    debug = bool(os.environ.get("KVSHIFT_TRACEBACK"))
    try:
        return args.func(args, explicit)
    except KeyboardInterrupt:
        print(_one_line(prog, "interrupted"), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors become one line, the rest a traceback
        if debug:
            raise
        if _is_diverged(e):
            print(_one_line(prog, f"training diverged: {e}"), file=sys.stderr)
            return EXIT_DIVERGED
        if isinstance(e, CLIError) or _is_user_error(e):
            print(_one_line(prog, str(e)), file=sys.stderr)
            return EXIT_ERROR
        if isinstance(e, OSError) and e.filename is not None:  # a path that cannot be read/written
            print(_one_line(prog, f"{e.strerror}: {e.filename}"), file=sys.stderr)
            return EXIT_ERROR
        raise


def _loaded_class(module: str, name: str) -> type | None:
    """A class from a module that is already imported (an exception of a module that was never
    imported cannot have been raised)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is_user_error(e: BaseException) -> bool:
    """A mistake the user can fix: a run folder or checkpoint problem."""
    classes = [RunFolderError, _loaded_class("kvshift_lens.checkpoint", "CheckpointError")]
    return any(c is not None and isinstance(e, c) for c in classes)


def _is_diverged(e: BaseException) -> bool:
    cls = _loaded_class("kvshift_lens.train.trainer", "TrainingDiverged")
    return cls is not None and isinstance(e, cls)


if __name__ == "__main__":
    sys.exit(main())
