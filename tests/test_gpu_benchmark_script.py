"""benchmarks/gpu_lm.py is a GPU benchmark (CI has no GPU): here its --tiny mode runs on the CPU so
the script cannot rot, and its FLOP count is checked against PyTorch's own FLOP counter."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_lm():
    spec = importlib.util.spec_from_file_location("gpu_lm", ROOT / "benchmarks" / "gpu_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHAPE = argparse.Namespace(layers=2, d_model=64, heads=4, seq=32)


def test_flops_per_token_matches_pytorchs_counter(gpu_lm) -> None:
    """6N + 12 L T d against FlopCounterMode on a training step of the plain model (it counts
    every matmul forward and backward, attention over the full square)."""
    model = gpu_lm.build("plain", SHAPE, 100, "cpu")
    tokens = torch.randint(0, 100, (3, SHAPE.seq))
    # The math backend spells attention as matmuls the counter sees (the fused CPU kernel is not
    # in its registry).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    counted = counter.get_total_flops() / tokens.numel()
    n = gpu_lm.non_embedding_params(model)
    ours = gpu_lm.flops_per_token(n, SHAPE.layers, SHAPE.seq, SHAPE.d_model)
    # exactly, once the biases and norm weights (6 FLOPs each in 6N, elementwise work for the
    # counter) are set aside
    elementwise = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 1)
    assert ours - 6 * elementwise == pytest.approx(counted, rel=1e-6)


def test_models_share_the_shape(gpu_lm) -> None:
    params = {v: gpu_lm.build(v, SHAPE, 100, "cpu") for v in gpu_lm.VARIANTS}
    n = {v: sum(p.numel() for p in m.parameters()) for v, m in params.items()}
    assert n["plain"] == n["vanilla"]
    # 4 coefficients per KV head and layer: (alpha1, alpha2, beta1, beta2)
    assert n["kvshift"] - n["vanilla"] == 4 * SHAPE.heads * SHAPE.layers
    emb = SHAPE.d_model * (100 + SHAPE.seq)
    assert {gpu_lm.non_embedding_params(m) for v, m in params.items() if v != "kvshift"} == {
        n["plain"] - emb}


def test_tiny_run_on_cpu(gpu_lm, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = gpu_lm.main(["--tiny", "--device", "cpu", "--modes", "eager", "--json", str(out)])
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    assert set(result["runs"]) == {"plain/eager", "vanilla/eager", "kvshift/eager"}
    for run in result["runs"].values():
        assert run["tokens_per_second"] > 0 and math.isfinite(run["mfu"])
        assert run["tokens_per_second"] == pytest.approx(2 * 64 / run["seconds_per_step"])
    assert set(result["ratios"]) == {"kvshift/vanilla eager", "vanilla/plain eager",
                                     "kvshift/plain eager"}


def test_bad_flags_are_refused(gpu_lm, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_lm.main(["--tiny", "--device", "cpu", "--modes", "jit"])
    assert "'jit' is not one of" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_lm.main(["--tiny"])
        assert "no CUDA device here" in capsys.readouterr().err
