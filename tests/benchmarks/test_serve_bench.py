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
            ("block_diffusion", "in process"): [(150.0, 3.0), (600.0, 3.0), (100.0, 6.0)],  # 3, 2, 1; 0.25, 0.5, 1.5
            ("autoregressive", "continuous"): [(40.0, 2.0), (60.0, 3.0)]}  # no static row
  table = serve.medians(rounds)
  assert len(table) == 2 + len(rounds) and all(len(line.split(" | ")) == 6 for line in table[:1] + table[2:])
  cells = [line.strip("| ").split(" | ") for line in table[2:]]
  assert cells[0] == ["block_diffusion", "continuous", "200.0", "6000", "2.00x", "1.25x"]
  assert cells[1] == ["block_diffusion", "static", "100.0", "6000", "-", "-"]
  assert cells[2] == ["block_diffusion", "in process", "150.0", "3000", "2.00x", "0.50x"]
  assert cells[3] == ["autoregressive", "continuous", "50.0", "2500", "-", "-"]


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


class FakeEngine:
  """`engine_schedule`'s engine: a request of `max_tokens` decodes one 8-token block per step (`seconds` each)
  and finishes with its last; it records the submit times and how many requests each step held."""

  def __init__(self, seconds: float):
    self.seconds, self.left, self.submitted, self.held, self.start = seconds, {}, {}, [], time.perf_counter()

  def submit(self, i: int) -> int:
    rid = 100 + i  # not the job's index: the schedule must map them back
    self.left[rid], self.submitted[i] = JOBS[i].max_tokens // 8, time.perf_counter() - self.start
    return rid

  def step(self):
    time.sleep(self.seconds)
    self.held.append(len(self.left))
    for rid in self.left:
      self.left[rid] -= 1
    finished = [rid for rid, left in self.left.items() if not left]
    for rid in finished:
      del self.left[rid]
    out = lambda rid: types.SimpleNamespace(lengths=[JOBS[rid - 100].max_tokens], nfe=[2 * JOBS[rid - 100].max_tokens])
    return types.SimpleNamespace(pieces=[(rid, None) for rid in [*self.left, *finished]],
                                 finished=[(rid, out(rid)) for rid in finished])


def test_in_process_clients_send_the_next_job_when_theirs_is_done_and_time_every_block():
  """Two clients over jobs of 1-4 blocks: job 2 goes in when job 0 (1 block) is done, job 3 when job 1 is."""
  step = 0.1
  fake = FakeEngine(step)
  timings, wall = serve.engine_schedule(JOBS, 2, None, fake.submit, fake.step)
  assert fake.held == [2, 2, 2, 2, 1, 1]
  assert [t.tokens for t in timings] == [8, 16, 24, 32] and [t.forwards for t in timings] == [16, 32, 48, 64]
  assert [len(t.gaps) for t in timings] == [0, 1, 2, 3] and all(step <= g < 2 * step for t in timings for g in t.gaps)
  assert all(step <= t.ttft < 2 * step for t in timings)  # the step after each was sent
  assert all(step * n <= t.latency < step * (n + 1) for n, t in zip([1, 2, 3, 4], timings))  # its blocks' steps
  assert fake.submitted[2] >= step and fake.submitted[3] >= 2 * step and 6 * step <= wall < 7 * step


def test_in_process_arrivals_are_sent_at_their_times_and_timed_from_them():
  """Jobs 0 and 1 arrive at once; the engine is idle from when they are done until job 2 arrives."""
  fake = FakeEngine(0.1)
  arrivals = np.array([0.0, 0.0, 0.8, 0.85])
  timings, wall = serve.engine_schedule(JOBS, 1, arrivals, fake.submit, fake.step)  # concurrency: unused
  assert fake.submitted[0] < 0.1 and 0.8 <= fake.submitted[2] < 0.85 <= fake.submitted[3]
  assert fake.held == [2, 1, 1, 2, 2, 1, 1]  # job 3 joins after job 2's first step
  assert 0.3 <= timings[2].latency < 0.4 and 0.45 <= timings[3].latency < 0.6  # from their arrivals
  assert 1.3 <= wall < 1.45
