"""The accuracy-vs-speed picture of an evaluation: one point per decoder row (and per swept threshold), the
Pareto front through the rows no other row beats on both accuracy and tokens/s.

`plot` returns the points as the figure holds them (read back from its artists, not from its input), so
results.json records what the PNG shows and a test can compare the two with the results.
"""

from __future__ import annotations

from typing import Any, Sequence

PLOT_FILE = "pareto.png"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points (tokens/s, accuracy) that no other point matches or beats on both and beats on one."""
  return [i for i, (x, y) in enumerate(points)
          if not any(qx >= x and qy >= y and (qx, qy) != (x, y) for qx, qy in points)]


def plot(results: dict[str, Any], path: str) -> list[dict[str, Any]]:
  """Writes the PNG of `results` (`runner.run`'s dict) to `path`; returns the drawn points:
  `[{"decoder", "tokens_per_s", "accuracy", "pareto"}]` in row order."""
  # A Figure without pyplot: no global backend switch (matplotlib.use would stop a notebook's later figures
  # from showing) and no figure registry to close.
  from matplotlib.figure import Figure

  metric, rows = results["metric"], results["decoders"]
  xy = [(r["speed"]["tokens_per_s"], r["metrics"][metric]) for r in rows.values()]
  fig = Figure(figsize=(6.4, 4.8))
  ax = fig.subplots()
  for (name, r), (x, y) in zip(rows.items(), xy):
    swept = "@" in name
    ax.scatter([x], [y], label=name, marker="o" if swept else "s", s=30 if swept else 50)
    if swept:
      ax.annotate(f"τ={r['config']['confidence_threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                  fontsize=8)
  swept = sorted((r["config"]["confidence_threshold"], x, y) for (name, r), (x, y) in zip(rows.items(), xy)
                 if "@" in name)
  if len(swept) > 1:  # the threshold sweep as a curve
    ax.plot([x for _, x, _ in swept], [y for _, _, y in swept], color="0.6", linewidth=1, zorder=0)
  front = sorted(xy[i] for i in pareto_front(xy))
  (line,) = ax.plot(*zip(*front), "k--", linewidth=1, label="Pareto front")
  ax.set_xlabel("tokens/s")
  ax.set_ylabel(metric)
  ax.set_title(f"{results['task']}: {metric} vs decoding speed ({results['samples']} samples)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  on_front = {tuple(p) for p in line.get_xydata().tolist()}
  drawn = [(c.get_label(), *map(float, c.get_offsets()[0])) for c in ax.collections]
  return [{"decoder": name, "tokens_per_s": x, "accuracy": y, "pareto": (x, y) in on_front} for name, x, y in drawn]
