"""Figure functions on data with known content: every plotted number is the number given."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from kvshift_lens.train.sweep import RunRecord
from kvshift_lens.viz import figures as F
from kvshift_lens.viz.landscape import Landscape
from tests.helpers import build


def _traces(fig: go.Figure, **meta) -> list:
    return [t for t in fig.data if isinstance(t.meta, dict)
            and all(t.meta.get(k) == v for k, v in meta.items())]


def _one(fig: go.Figure, **meta):
    found = _traces(fig, **meta)
    assert len(found) == 1, (meta, [t.meta for t in fig.data])
    return found[0]


def _records(seed: int = 0, n_layers: int = 2, n_heads: int = 3, n_lags: int = 2,
             steps=(0, 10, 20, 35)) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Eval records with random coefficients [eval, layer, head, lag], plus train records."""
    g = torch.Generator().manual_seed(seed)
    coeffs = {w: torch.randn(len(steps), n_layers, n_heads, n_lags, generator=g) for w in "kv"}
    records = []
    for i, s in enumerate(steps):
        records.append({"step": s, "kind": "train", "train/loss": 3.0 - 0.01 * s})
        records.append({"step": s, "kind": "eval", "eval/accuracy": 0.02 * i, "eval/loss": 2.0,
                        "coefficients": {w: coeffs[w][i].tolist() for w in "kv"}})
    return records, coeffs


# ------------------------------------------------------------------ coefficient heatmaps


@pytest.mark.parametrize("window,shift_q", [(1, False), (3, True)])
def test_heatmap_values_are_the_models_coefficients(window, shift_q):
    model = build(shift_window=window, shift_q=shift_q, n_layers=2)
    coeffs = model.shift_coefficients()
    fig = F.coefficient_heatmaps(coeffs, view="raw")
    shifted = ["k", "v", "q"] if shift_q else ["k", "v"]
    assert len(fig.data) == len(shifted) * (window + 1)
    for which in shifted:
        for lag in range(window + 1):
            trace = _one(fig, which=which, lag=lag)
            z = torch.tensor(trace.z, dtype=torch.float32)
            assert torch.equal(z, coeffs[which][:, :, lag])  # exact: float32 -> float64 -> float32
            assert list(trace.x) == list(range(model.cfg.n_key_value_heads if which != "q"
                                               else model.cfg.n_heads))
            assert list(trace.y) == [0, 1]
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("α1") and any(t.startswith("β2") for t in titles)
    if window == 3:
        assert any(t.startswith("α4") for t in titles) and any(t.startswith("γ1") for t in titles)


def test_heatmap_takes_a_plain_dict_and_rejects_bad_input():
    values = {"k": [[[0.25, 0.75]]], "v": np.array([[[1.0, 0.0]]])}
    fig = F.coefficient_heatmaps(values, which=["v"], view="raw")
    assert [t.meta for t in fig.data] == [{"which": "v", "lag": 0, "quantity": "raw"},
                                          {"which": "v", "lag": 1, "quantity": "raw"}]
    assert np.array(fig.data[0].z).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="not shifted here"):
        F.coefficient_heatmaps(values, which=["q"])
    with pytest.raises(ValueError, match="empty"):
        F.coefficient_heatmaps({})
    with pytest.raises(ValueError, match="3 dimensions"):
        F.coefficient_heatmaps({"k": [[0.5, 0.5]]})
    with pytest.raises(ValueError, match="view='gain'"):
        F.coefficient_heatmaps(values, view="gain")


def test_heatmap_mix_view_is_gain_times_mix():
    """Default view: per projection a gain panel sum_l |c_l| and one mix panel per lag c_l / gain,
    computed here by hand from the coefficients."""
    values = {"k": [[[0.311, 4.368], [-0.5, 0.5]]], "v": [[[3.441, -0.006], [0.0, 0.0]]]}
    fig = F.coefficient_heatmaps(values)
    assert len(fig.data) == 2 * 3
    for which in "kv":
        c = np.array(values[which])
        gain = np.abs(c).sum(-1)
        assert np.allclose(_one(fig, which=which, quantity="gain").z, gain)
        for lag in range(2):
            mix = np.where(gain > 0, c[..., lag] / np.where(gain > 0, gain, 1), float(lag == 0))
            assert np.allclose(_one(fig, which=which, lag=lag, quantity="mix").z, mix)
    # gain x mix gives the raw values back, which the hover also carries
    k_mix = np.array(_one(fig, which="k", lag=1, quantity="mix").z)
    assert k_mix[0, 0] * 4.679 == pytest.approx(4.368)
    assert "α2 4.368" in _one(fig, which="k", quantity="gain").customdata[0][0]
    assert fig.layout.coloraxis.cmin == -1 and fig.layout.coloraxis.cmax == 1


# ------------------------------------------------------------------ trajectories and the plane


def test_trajectory_traces_are_the_logged_coefficients():
    records, coeffs = _records()
    fig = F.coefficient_trajectories(records, view="raw")
    steps = [0, 10, 20, 35]
    assert len(fig.data) == 2 * 2 * 2 * 3  # which x lag x layer x head
    for which in "kv":
        for lag in range(2):
            for layer in range(2):
                for head in range(3):
                    t = _one(fig, which=which, lag=lag, layer=layer, head=head)
                    assert list(t.x) == steps
                    expected = coeffs[which][:, layer, head, lag]
                    assert torch.equal(torch.tensor(t.y, dtype=torch.float32), expected)
    # one legend entry per head
    assert sum(bool(t.showlegend) for t in fig.data) == 6


def test_trajectory_mix_view_is_the_gain_and_the_mix():
    records, coeffs = _records()
    fig = F.coefficient_trajectories(records)
    assert len(fig.data) == 2 * 3 * 2 * 3  # which x (gain, 2 lags) x layer x head
    c = coeffs["k"][:, 1, 2].double()  # [eval, lag]
    gain = c.abs().sum(-1)
    t = _one(fig, which="k", quantity="gain", layer=1, head=2)
    assert torch.allclose(torch.tensor(t.y, dtype=torch.float64), gain)
    t = _one(fig, which="k", quantity="mix", lag=1, layer=1, head=2)
    assert torch.allclose(torch.tensor(t.y, dtype=torch.float64), c[:, 1] / gain)


def test_trajectories_need_logged_coefficients():
    with pytest.raises(ValueError, match="coefficients"):
        F.coefficient_trajectories([{"step": 0, "kind": "eval", "eval/accuracy": 0.1}])


def test_plane_final_points_are_the_final_coefficients():
    records, coeffs = _records(n_layers=2, n_heads=3)
    fig = F.coefficient_plane(records, view="raw")
    final = _one(fig, role="final")
    a1_final = coeffs["k"][-1, :, :, 0].flatten()  # (layer, head) order
    b1_final = coeffs["v"][-1, :, :, 0].flatten()
    assert torch.equal(torch.tensor(final.x, dtype=torch.float32), a1_final)
    assert torch.equal(torch.tensor(final.y, dtype=torch.float32), b1_final)
    assert list(final.text) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    start = _one(fig, role="start")
    assert torch.equal(torch.tensor(start.x, dtype=torch.float32), coeffs["k"][0, :, :, 0].flatten())
    path = _one(fig, layer=1, head=2)
    assert torch.equal(torch.tensor(path.x, dtype=torch.float32), coeffs["k"][:, 1, 2, 0])
    assert torch.equal(torch.tensor(path.y, dtype=torch.float32), coeffs["v"][:, 1, 2, 0])
    assert path.mode == "lines+markers"
    induction, vanilla = _one(fig, reference="induction"), _one(fig, reference="vanilla")
    assert (induction.x[0], induction.y[0]) == (0.0, 1.0)
    assert (vanilla.x[0], vanilla.y[0]) == (1.0, 1.0)

    mixed = F.coefficient_plane(records)
    k, v = coeffs["k"][-1].double(), coeffs["v"][-1].double()  # [layer, head, lag]
    assert torch.allclose(torch.tensor(_one(mixed, role="final").x, dtype=torch.float64),
                          (k[..., 0] / k.abs().sum(-1)).flatten())
    assert torch.allclose(torch.tensor(_one(mixed, role="final").y, dtype=torch.float64),
                          (v[..., 0] / v.abs().sum(-1)).flatten())
    assert "share of the current position" in mixed.layout.xaxis.title.text

    only_layer_1 = F.coefficient_plane(records, layers=[1])
    assert list(_one(only_layer_1, role="final").text) == ["L1H0", "L1H1", "L1H2"]
    with pytest.raises(ValueError, match="layers"):
        F.coefficient_plane(records, layers=[5])


def test_plane_needs_keys_and_values():
    records = [{"step": 0, "kind": "eval", "coefficients": {"k": [[[1.0, 0.0]]]}}]
    with pytest.raises(ValueError, match="keys and values"):
        F.coefficient_plane(records)


# ------------------------------------------------------------------ curves and comparisons


def test_phase_change_definitions():
    steps = list(range(0, 110, 10))
    acc = [0.0, 0.0, 0.02, 0.05, 0.1, 0.6, 0.85, 0.9, 0.92, 0.93, 0.93]
    assert F.phase_change_step(steps, acc) == 45.0  # fastest rise: 0.1 -> 0.6 between 40 and 50
    assert F.phase_change_step(steps, acc, method="threshold") == 50.0
    assert F.phase_change_step(steps, acc, method="threshold", threshold=0.95) is None
    assert F.phase_change_step(steps, [0.1] * len(steps)) is None  # nothing happened
    assert F.phase_change_step([0, 10, 30], [0.0, 0.3, 0.9]) == 20.0  # per step, not per eval
    with pytest.raises(ValueError, match="method"):
        F.phase_change_step(steps, acc, method="fastest")
    with pytest.raises(ValueError, match="equal length"):
        F.phase_change_step(steps, acc[:-1])


def test_loss_curves_plot_the_records_and_mark_the_phase_change():
    steps = list(range(0, 110, 10))
    acc = [0.0, 0.0, 0.02, 0.05, 0.1, 0.6, 0.85, 0.9, 0.92, 0.93, 0.93]
    records = [{"step": s, "kind": "train", "train/loss": 4.0 - s / 50} for s in range(1, 101)]
    records += [{"step": s, "kind": "eval", "eval/accuracy": a, "eval/loss": 3 - a}
                for s, a in zip(steps, acc)]
    records.append({"step": 100, "kind": "summary", "elapsed_s": 1.0})
    fig = F.loss_curves(records, target=0.9)
    train = _one(fig, series="train/loss")
    assert list(train.x) == list(range(1, 101)) and train.y[0] == 4.0 - 1 / 50
    accuracy = _one(fig, series="eval/accuracy")
    assert list(accuracy.y) == acc and accuracy.yaxis == "y2"
    assert fig.layout.meta["phase_change"] == 45.0
    assert fig.layout.meta["steps_to_target"] == 70.0
    vlines = sorted(s.x0 for s in fig.layout.shapes if s.x0 == s.x1)
    assert vlines == [45.0, 70.0]
    with pytest.raises(ValueError, match="no 'train' or 'eval'"):
        F.loss_curves([{"step": 1, "kind": "summary"}])


def test_steps_to_accuracy_from_a_dict():
    fig = F.steps_to_accuracy({"kvshift_1L": [100, 150, 125], "vanilla_2L": [400, None, 600]},
                              target=0.9)
    boxes = [t for t in fig.data if isinstance(t, go.Box)]
    assert [t.meta["variant"] for t in boxes] == ["kvshift_1L", "vanilla_2L"]
    assert list(boxes[0].y) == [100.0, 150.0, 125.0]
    assert list(boxes[1].y) == [400.0, 600.0]
    assert boxes[1].name == "vanilla_2L (1 not reached)"
    assert boxes[0].boxpoints == "all"
    assert "90%" in fig.layout.title.text


def test_steps_to_accuracy_from_a_sweep_summary():
    runs = [RunRecord(name=f"{v}__seed{s}", variant=v, size=None, seed=s, status="finished",
                      steps=steps, steps_to_target=reached, target_accuracy=0.9)
            for v, s, steps, reached in [("kv", 0, 300, 120), ("kv", 1, 300, 180),
                                         ("vanilla", 0, 500, None), ("vanilla", 1, 500, 450)]]
    runs.append(RunRecord(name="kv__seed2", variant="kv", size=None, seed=2, status="failed"))
    summary = {"groups": [{"variant": "kv", "size": None, "label": "kv", "target_accuracy": 0.9},
                          {"variant": "vanilla", "size": None, "label": "vanilla",
                           "target_accuracy": 0.9}],
               "runs": [r.__dict__ for r in runs]}
    fig = F.steps_to_accuracy(summary)
    kv = _one(fig, variant="kv")
    assert list(kv.y) == [120.0, 180.0]  # the failed run is left out
    vanilla = [t for t in _traces(fig, variant="vanilla")]
    box = next(t for t in vanilla if isinstance(t, go.Box))
    censored = next(t for t in vanilla if t.meta.get("censored"))
    assert list(box.y) == [450.0] and list(censored.y) == [500.0]
    assert "90%" in fig.layout.title.text


def test_score_heatmap_and_ablation_bars_show_the_data():
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    fig = F.score_heatmap(scores, "induction score", zmin=0, zmax=1)
    assert torch.equal(torch.tensor(fig.data[0].z, dtype=torch.float32), scores)
    assert fig.layout.title.text == "induction score" and fig.data[0].zmax == 1
    with pytest.raises(ValueError, match="2 dimensions"):
        F.score_heatmap(torch.zeros(3), "x")

    fig = F.ablation_bars({"L0H0": 0.1, "L0H1": 1.5, "L1H0": -0.2})
    assert list(fig.data[0].x) == ["L0H1", "L0H0", "L1H0"]
    assert list(fig.data[0].y) == [1.5, 0.1, -0.2]
    fig = F.ablation_bars({"a": 0.1, "b": 1.5}, sort=False)
    assert list(fig.data[0].x) == ["a", "b"]
    with pytest.raises(ValueError, match="no ablations"):
        F.ablation_bars({})


# ------------------------------------------------------------------ landscape figure


def _fake_landscape(grad: tuple[float, float] = (1.0, 0.0)) -> Landscape:
    a1 = torch.linspace(-0.5, 1.5, 5, dtype=torch.float64)
    b1 = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    loss = a1[:, None] * 10 + b1[None, :]  # [n_a, n_b], distinct per point
    g = torch.tensor(grad, dtype=torch.float64).expand(5, 3, 2).clone()
    return Landscape(a1=a1, b1=b1, loss=loss, grad=g, layer=0, heads=[1],
                     positions={"L0H1": (0.2, 0.9)}, model_loss=1.0, n_sequences=4)


def test_landscape_figure_shows_the_grid_the_descent_direction_and_the_heads():
    land = _fake_landscape(grad=(1.0, 0.0))
    fig = F.landscape_figure(land, paths={"L0H1": ([0.5, 0.3, 0.2], [0.5, 0.7, 0.9])})
    contour = _one(fig, role="loss")
    assert list(contour.x) == land.a1.tolist() and list(contour.y) == land.b1.tolist()
    assert np.array_equal(np.array(contour.z), land.loss.T.numpy())  # rows are beta1
    arrows = _one(fig, role="arrows")
    xs, ys = list(arrows.x), list(arrows.y)
    # first shaft: from the first grid point towards -grad, i.e. to smaller alpha1
    assert (xs[0], ys[0]) == (-0.5, 0.0) and xs[1] < xs[0] and ys[1] == pytest.approx(0.0)
    heads = _one(fig, role="heads")
    assert (heads.x[0], heads.y[0]) == (0.2, 0.9) and heads.text[0] == "L0H1"
    assert list(_one(fig, path="L0H1").x) == [0.5, 0.3, 0.2]
    assert "head 1" in fig.layout.title.text

    no_grad = Landscape(**{**land.__dict__, "grad": None})
    assert not _traces(F.landscape_figure(no_grad), role="arrows")
    with pytest.raises(ValueError, match="loss must be"):
        F.landscape_figure(Landscape(**{**land.__dict__, "loss": land.loss.T}))


def test_seed_band_curves_median_and_band() -> None:
    from kvshift_lens.viz.figures import seed_band_curves

    values = np.array([[0.1, 0.5, 0.9, np.nan], [0.3, 0.4, 0.8, np.nan], [0.2, 0.9, 1.0, 0.95]])
    fig = seed_band_curves({"a": ([0, 25, 50, 75], values)}, "t", "acc", hline=0.9)
    band, line = fig.data
    assert line.meta == {"series": "a"} and "median of 3" in line.name
    assert list(line.x) == [0, 25, 50, 75]
    # the median ignores seeds without a value at a step (runs stopped early)
    assert list(line.y) == pytest.approx([0.2, 0.5, 0.9, 0.95])
    assert list(band.y) == pytest.approx([0.3, 0.9, 1.0, 0.95, 0.95, 0.8, 0.4, 0.1])
    with pytest.raises(ValueError, match="have 4 steps, steps has 2"):
        seed_band_curves({"a": ([0, 1], values)}, "t", "acc")
    with pytest.raises(ValueError, match="no series"):
        seed_band_curves({}, "t", "acc")


def test_seed_points_median_with_range() -> None:
    from kvshift_lens.viz.figures import seed_points

    fig = seed_points({"kv": {"8": [0.2, 0.6, 0.4], "16": [1.0], "32": [None]}}, "t", "x", "y")
    line, dots = fig.data
    assert list(line.x) == ["8", "16"] and list(line.y) == pytest.approx([0.4, 1.0])
    assert list(line.error_y.array) == pytest.approx([0.2, 0.0])
    assert list(line.error_y.arrayminus) == pytest.approx([0.2, 0.0])
    assert list(dots.y) == pytest.approx([0.2, 0.6, 0.4, 1.0])
