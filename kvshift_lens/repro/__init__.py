"""Reproductions of the paper's toy results (REPRODUCTION.md): experiment specs, a runner and
the report that turns the sweeps into figures, numbers and verdicts.

    kvshift repro run --out runs/repro --jobs 2        # every experiment (about 80 minutes)
    kvshift repro report runs/repro --markdown REPRODUCTION.md --figures docs/reproduction
"""

from kvshift_lens.repro.experiments import EXPERIMENTS, Experiment, experiment
from kvshift_lens.repro.run import run_experiments

__all__ = ["EXPERIMENTS", "Experiment", "experiment", "run_experiments"]
