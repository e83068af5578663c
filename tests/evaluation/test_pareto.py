"""The accuracy-vs-tokens/s plot: the Pareto front on hand-made points, and the PNG's points read back from the
figure equal to the results it was drawn from."""

from __future__ import annotations

import pytest
from PIL import Image

from dvl_jax.evaluation import pareto
from dvl_jax.evaluation.settings import EvalSettings


@pytest.mark.parametrize("points, front", [
    ([(10.0, 0.5), (20.0, 0.4), (15.0, 0.6), (12.0, 0.45)], [1, 2]),  # (10, .5) and (12, .45) lose to (15, .6)
    ([(10.0, 0.5), (10.0, 0.5)], [0, 1]),  # equal points are both on the front
    ([(10.0, 0.5), (10.0, 0.6)], [1]),  # as fast, more accurate
    ([(5.0, 0.9)], [0]),
])
def test_pareto_front(points, front):
  assert pareto.pareto_front(points) == front


def _results() -> dict:
  """Rows as `runner.run` writes them: the ar, dynamic and two swept threshold decoders."""
  configs = EvalSettings("synthetic", decoders=("ar", "dynamic"), sweep=(0.5, 0.9)).configs
  speed_accuracy = {"ar": (100.0, 0.80), "dynamic": (150.0, 0.78), "threshold@0.5": (260.0, 0.70),
                    "threshold@0.9": (140.0, 0.76)}
  return {"task": "synthetic", "metric": "exact_match", "samples": 10, "decoders": {
      name: {"metrics": {"exact_match": acc, "acc/color": 0.0}, "speed": {"tokens_per_s": tps},
             "config": {"confidence_threshold": configs[name].confidence_threshold}}
      for name, (tps, acc) in speed_accuracy.items()}}


def test_plot_writes_the_png_of_the_results(tmp_path):
  results, path = _results(), tmp_path / pareto.PLOT_FILE
  points = pareto.plot(results, str(path))
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (640, 480)
  assert [(p["decoder"], p["tokens_per_s"], p["accuracy"]) for p in points] == [
      (name, r["speed"]["tokens_per_s"], r["metrics"]["exact_match"]) for name, r in results["decoders"].items()]
  # threshold@0.9 (140 tokens/s, 0.76) is slower and less accurate than dynamic (150, 0.78); the rest trade off
  assert [p["decoder"] for p in points if p["pareto"]] == ["ar", "dynamic", "threshold@0.5"]


def test_plot_leaves_the_matplotlib_backend_and_pyplot_alone(tmp_path):
  """A notebook that evaluates and then draws its own figures keeps its inline backend and open figures."""
  import matplotlib
  from matplotlib import pyplot as plt

  before = matplotlib.get_backend()
  matplotlib.use("svg")  # a backend other than the Agg a headless default resolves to
  try:
    figure = plt.figure()
    pareto.plot(_results(), str(tmp_path / pareto.PLOT_FILE))
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [figure.number]
  finally:
    plt.close("all")
    matplotlib.use(before)
