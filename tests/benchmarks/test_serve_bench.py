"""`benchmarks/serve.py --repeats`: the summary of alternating rounds is each row's median rate and the median of
the rounds' own continuous / static ratios (not the ratio of the medians), as its docstring says."""

import numpy as np

from benchmarks import serve


def test_medians_take_each_rounds_own_ratio():
  rates = {("block_diffusion", "continuous"): [100.0, 300.0, 200.0],
           ("block_diffusion", "static"): [50.0, 300.0, 100.0],  # ratios 2, 1, 2: median 2 (medians' ratio: 1.33)
           ("autoregressive", "continuous"): [40.0, 60.0]}  # no static row
  table = serve.medians(rates)
  cells = [line.strip("| ").split(" | ") for line in table[2:]]
  assert cells[0] == ["block_diffusion", "200.0", "100.0", f"{np.median([2.0, 1.0, 2.0]):.2f}x"]
  assert cells[1] == ["autoregressive", "50.0", "-", "-"]
