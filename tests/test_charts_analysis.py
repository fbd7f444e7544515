"""Analysis figure builders: data in, figure out, with the expected traces (no browser needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app import charts
from engine.analysis.compare import learning_curves, method_summary, pareto_front
from engine.analysis.importance import router_load_table, router_mean_table, sharing_table

SIGMAS = {"layer.0.q": np.array([3.0, 1.0, 0.0]), "layer.0.v": np.array([2.0, 0.5]), "layer.1.q": np.array([1.0])}


def _types(fig: go.Figure) -> list[str]:
    return [t.type for t in fig.data]


def test_spectra_heatmap_pads_and_logs():
    fig = charts.spectra_heatmap(SIGMAS)
    assert _types(fig) == ["heatmap"]
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (3, 3)
    assert z[0, 0] == pytest.approx(np.log10(3.0)) and np.isnan(z[0, 2]) and np.isnan(z[2, 1])
    assert list(fig.data[0].y) == list(SIGMAS)
    assert np.array(charts.spectra_heatmap(SIGMAS, max_index=2).data[0].z).shape == (3, 2)


def test_spectra_curves_and_energy():
    fig = charts.spectra_curves(SIGMAS)
    assert _types(fig) == ["scatter"] * 3 and fig.layout.yaxis.type == "log"
    energy = charts.spectra_curves(SIGMAS, layers=["layer.0.q"], energy=True)
    assert len(energy.data) == 1
    np.testing.assert_allclose(energy.data[0].y, [0.9, 1.0, 1.0])


def test_spectra_overlay_of_runs_on_one_layer():
    fig = charts.spectra_overlay({"run a": [4.0, 2.0], "run b": [1.0, 0.5, 0.25]}, "layer.0.q", normalise=True)
    assert _types(fig) == ["scatter", "scatter"]
    np.testing.assert_allclose(fig.data[0].y, [1.0, 0.5])


def test_table_figure():
    table = pd.DataFrame({"layer": ["a", "b"], "effective_rank": [1.23456789, 2.0]})
    fig = charts.table_figure(table)
    assert _types(fig) == ["table"] and fig.data[0].cells.values[1][0] == "1.235"


def test_head_importance_heatmap_marks_masked_heads():
    fig = charts.head_importance_heatmap([[0.1, 0.2, 0.3], [0.4, None, 0.6]], [[1, 0, 1], [0, 1, 1]], blocks=[2, 3])
    assert _types(fig) == ["heatmap", "scatter"]
    assert list(fig.data[1].x) == [1, 0] and list(fig.data[1].y) == [2, 3]
    assert _types(charts.head_importance_heatmap([[0.1, 0.2]])) == ["heatmap"]


def test_sharing_chart_kept_and_pruned_bars():
    table = sharing_table(
        [[0.9, 0.2], [0.1, 0.5]], [[False, True], [True, False]], [[None, 1], [0, None]], col_labels=["attn", "mlp"]
    )
    fig = charts.sharing_chart(table)
    assert _types(fig) == ["bar", "bar"]
    assert len(fig.data[0].x) == 2 and list(fig.data[1].text) == ["→ 1", "→ 0"]


LOADS = {
    "l0": {"history_steps": [1, 2], "history": [[0.5, 0.5], [0.7, 0.3]], "mean": [0.6, 0.4]},
    "l1": {"history_steps": [1, 2], "history": [[0.1, 0.9], [0.3, 0.7]], "mean": [0.2, 0.8]},
}


def test_router_load_charts():
    history = router_load_table(LOADS)
    fig = charts.router_loads_chart(history)
    assert _types(fig) == ["scatter", "scatter"] and fig.data[0].stackgroup == "loads"
    np.testing.assert_allclose(fig.data[0].y, [0.3, 0.5])  # expert 0 averaged over the layers
    single = charts.router_loads_chart(history, layer="l1")
    np.testing.assert_allclose(single.data[1].y, [0.9, 0.7])
    heat = charts.router_mean_heatmap(router_mean_table(LOADS))
    assert _types(heat) == ["heatmap"] and np.array(heat.data[0].z).shape == (2, 2)


def test_norm_profile_lines_and_heatmap():
    table = pd.DataFrame(
        {
            "step": [1, 1, 2, 2],
            "layer": ["a", "b", "a", "b"],
            "grad_norm": [1.0, 2.0, 0.5, 1.5],
            "update_norm": [0.1, 0.2, 0.3, 0.4],
        }
    )
    assert _types(charts.norm_profile_chart(table)) == ["scatter", "scatter"]
    heat = charts.norm_profile_chart(table, value="update_norm", kind="heatmap", log_y=False)
    assert _types(heat) == ["heatmap"]
    np.testing.assert_allclose(np.array(heat.data[0].z, dtype=float), [[0.1, 0.3], [0.2, 0.4]])


def _surface():
    alphas = np.linspace(-1, 1, 5)
    betas = np.linspace(-1, 1, 3)
    losses = alphas[:, None] ** 2 + 2 * betas[None, :] ** 2
    return {"kind": "2d", "alphas": alphas, "betas": betas, "losses": losses, "accuracies": 1 - losses / 10}


def test_landscape_contour_and_surface_orientation():
    result = _surface()
    contour = charts.landscape_contour(result)
    assert _types(contour) == ["contour", "scatter"]
    z = np.array(contour.data[0].z)
    assert z.shape == (3, 5) and z[2, 4] == pytest.approx(1 + 2)  # z[β index][α index]
    assert _types(charts.landscape_surface(result, accuracy=True)) == ["surface"]
    with pytest.raises(KeyError):
        charts.landscape_contour({k: v for k, v in result.items() if k != "accuracies"}, accuracy=True)


def test_landscape_curves_overlay():
    runs = {
        f"run {i}": {"kind": "interpolation", "alphas": np.linspace(0, 1, 4), "losses": np.arange(4.0) + i}
        for i in range(3)
    }
    fig = charts.landscape_curves(runs, log_y=True)
    assert _types(fig) == ["scatter"] * 3 and fig.layout.xaxis.title.text.startswith("t")


RUNS = pd.DataFrame(
    {
        "run_id": list("abcd"),
        "method": ["lora", "lora", "full", "probe"],
        "trainable_params": [100, 100, 10_000, 10],
        "eval_accuracy": [0.8, 0.82, 0.85, 0.6],
        "ms_per_step": [10.0, 12.0, 40.0, 5.0],
        "peak_rss_mb": [500.0, 520.0, 900.0, 400.0],
    }
)


def test_pareto_chart_has_points_per_method_and_the_front_line():
    fig = charts.pareto_chart(RUNS, pareto_front(RUNS))
    assert _types(fig) == ["scatter"] * 4
    assert [t.mode for t in fig.data] == ["markers", "markers", "markers", "lines"]
    assert list(fig.data[-1].x) == [10, 100, 10_000] and fig.layout.xaxis.type == "log"


def test_learning_curve_bands_two_traces_per_group():
    metrics = pd.DataFrame(
        {"run_id": list("aabbcc"), "step": [0, 10] * 3, "key": "eval_loss", "value": [1.0, 0.5, 1.2, 0.7, 2.0, 1.0]}
    )
    curves = learning_curves(metrics, RUNS, "eval_loss")
    fig = charts.learning_curve_bands(curves, log_y=True)
    assert _types(fig) == ["scatter"] * 4
    assert fig.data[0].fill == "toself" and fig.data[1].mode == "lines" and fig.layout.yaxis.type == "log"
    np.testing.assert_allclose(
        fig.data[0].y,
        [
            1.1 + np.std([1.0, 1.2], ddof=1),
            0.6 + np.std([0.5, 0.7], ddof=1),
            0.6 - np.std([0.5, 0.7], ddof=1),
            1.1 - np.std([1.0, 1.2], ddof=1),
        ],
    )


def test_resource_bars_one_bar_trace_per_measure():
    fig = charts.resource_bars(method_summary(RUNS))
    assert _types(fig) == ["bar", "bar"]
    np.testing.assert_allclose(fig.data[0].y, [11.0, 40.0, 5.0])
    assert fig.data[0].error_y.array[0] == pytest.approx(np.std([10.0, 12.0], ddof=1))
