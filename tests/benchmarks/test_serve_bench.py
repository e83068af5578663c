"""`benchmarks/serve.py`: the summary of alternating rounds (`--repeats`) is each row's median rate and p99 and
the medians of the rounds' own continuous / static ratios (not the ratios of the medians); the static rows batch
as a static server would, in a closed loop or under the server rows' arrivals (`--request-rate`)."""

import time
import types

import numpy as np

from benchmarks import serve


def test_medians_take_each_rounds_own_ratios():
  rounds = {("block_diffusion", "continuous"): [(100.0, 6.0), (300.0, 9.0), (200.0, 5.0)],
            # tok/s ratios 2, 1, 2: median 2 (medians' ratio 1.33); p99 ratios 0.5, 1.5, 1.25: median 1.25 (1.0)
            ("block_diffusion", "static"): [(50.0, 12.0), (300.0, 6.0), (100.0, 4.0)],
            ("autoregressive", "continuous"): [(40.0, 2.0), (60.0, 3.0)]}  # no static row
  table = serve.medians(rounds)
  assert len(table[0].split(" | ")) == len(table[2].split(" | ")) == 6
  cells = [line.strip("| ").split(" | ") for line in table[2:]]
  assert cells[0] == ["block_diffusion", "200.0", "100.0", "2.00x", "6000 / 6000", "1.25x"]
  assert cells[1] == ["autoregressive", "50.0", "-", "-", "2500 / -", "-"]


class FakeBatches:
  """`static_schedule`'s `generate`: each batch takes `seconds` (the first also `compile` seconds off the clock)
  and decodes every job's `max_tokens`; it records the batches."""

  def __init__(self, seconds: float, compile: float = 0.0):
    self.seconds, self.compile, self.groups = seconds, compile, []

  def __call__(self, group):
    untimed, self.compile = self.compile, 0.0
    time.sleep(self.seconds + untimed)
    self.groups.append([job.question for job in group])
    lengths = np.array([job.max_tokens for job in group])
    return types.SimpleNamespace(lengths=lengths, nfe=lengths), untimed


JOBS = [serve.Job(str(i), None, 8 * (i + 1)) for i in range(4)]


def test_a_closed_loop_static_batch_waits_only_for_itself():
  fake = FakeBatches(0.3)
  timings, wall = serve.static_schedule(JOBS, 3, fake, None)
  assert fake.groups == [["0", "1", "2"], ["3"]]
  assert all(0.3 <= t.latency < 0.55 and t.ttft == t.latency for t in timings)  # not the first batch's time too
  assert [t.tokens for t in timings] == [8, 16, 24, 32] and wall >= 0.6


def test_arriving_requests_queue_behind_the_running_batch_and_a_compile_is_off_the_clock():
  """Jobs 1 and 2 arrive while job 0's batch runs (its compile not counted) and go together once it is done;
  job 3 arrives to an idle server. A latency counts the wait from arrival."""
  fake = FakeBatches(0.3, compile=1.0)
  arrivals = np.array([0.0, 0.01, 0.02, 2.0])
  timings, wall = serve.static_schedule(JOBS, 2, fake, arrivals)
  assert fake.groups == [["0"], ["1", "2"], ["3"]]
  latency = [t.latency for t in timings]
  assert 0.3 <= latency[0] < 0.9  # not the 1 s compile
  assert latency[1] >= 0.59 and latency[2] >= 0.58 and latency[1] > latency[2]  # waited for job 0's batch
  assert 0.3 <= latency[3] < 0.9 and 2.3 <= wall < 3.0
