"""`benchmarks/accelerator.py --tiny` on the CPU: the one table the accelerator run prints, every number in it
re-derived here from what it stands on (the sampler's own outputs, the BD3-LM mask of spec §5.4, the FLOP
formula, the device limits), so the script that only runs for real on a GPU / TPU host cannot rot."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import accelerator, devices, sampling
from dvl_jax import cli
from dvl_jax.models import layers

TINY = accelerator.shapes(tiny=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(printed text, returned report, JSON file) of one tiny run of every section."""
  path = tmp_path_factory.mktemp("accelerator") / "out.json"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    report = accelerator.main(["--tiny", "--json", str(path), "--budget-s", "1800"])  # no cell cut on a busy CPU
  return out.getvalue(), report, json.loads(path.read_text())


def rows(report, section):
  return [r for r in report["rows"] if r["section"] == section]


def test_one_markdown_table_with_every_planned_cell_measured(run):
  text, report, saved = run
  assert saved == report
  header, *table = text.strip().splitlines()
  assert "cpu" in header and "measured" in header and "shapes tiny" in header and report["budget_s"] == 1800
  assert table[0] == "| " + " | ".join(accelerator.COLUMNS) + " |" and table[1] == "|" + "---|" * 8
  cells = [line.strip("| ").split(" | ") for line in table[2:]]
  assert all(len(c) == len(accelerator.COLUMNS) for c in cells)
  assert [c[:3] for c in cells] == [[r["section"], r["setting"], r["shape"]] for r in report["rows"]]
  assert [c[3:] for c in cells] == [r["cells"] for r in report["rows"]]
  assert all(r["na"] is None for r in report["rows"]), [r["na"] for r in report["rows"] if r["na"]]
  backends = [r["values"]["backend"] for r in rows(report, "attention")]
  assert backends == ["xla", "pallas_gpu", "splash"] * len(TINY.lengths)
  assert [r["setting"] for r in rows(report, "sampler")] == list(sampling.SETTINGS) * len(TINY.batches)
  assert len(rows(report, "train")) == 1


def spec_54_mask(two_l: int, block: int) -> np.ndarray:
  """Spec §5.4 restated: clean(q) = q >= L, blk(q) = (q - L clean(q)) // bs; block-diagonal, offset
  block-causal (noisy to earlier clean blocks), block-causal among clean tokens."""
  i = np.arange(two_l)
  clean = i >= two_l // 2
  blk = (i - (two_l // 2) * clean) // block
  cq, ck, bq, bk = clean[:, None], clean[None, :], blk[:, None], blk[None, :]
  return ((bq == bk) & (cq == ck)) | (~cq & ck & (bq > bk)) | (cq & ck & (bq >= bk))


def test_attention_skips_exactly_the_empty_tiles_of_the_mask(run):
  tile = {"xla": None, "pallas_gpu": (128, 64), "splash": (128, 128)}  # q x kv tiles at 2L = 256 (splash: lanes)
  for r in rows(run[1], "attention"):
    v = r["values"]
    mask, t = spec_54_mask(v["length"], TINY.sampler.block_size), tile[v["backend"]]
    empty = 0.0 if t is None else 1.0 - mask.reshape(v["length"] // t[0], t[0], -1, t[1]).any(axis=(1, 3)).mean()
    assert v["skipped"] == pytest.approx(empty) and r["cells"][3] == f"{empty:.1%} tiles skipped"
    assert 0 < empty < 1 or t is None
    assert r["cells"][0] == f"{v['ms']:.2f}" and v["tflops"] == pytest.approx(v["useful_flops"] / v["ms"] / 1e9)
    xla = next(x["values"]["ms"] for x in rows(run[1], "attention") if x["values"]["backend"] == "xla")
    assert v["vs_xla"] is None if v["backend"] == "xla" else v["vs_xla"] == pytest.approx(xla / v["ms"])


def test_sampler_numbers_follow_from_its_outputs_and_the_bandwidth_bound(run):
  t = TINY.sampler.text
  layer = (2 * t.hidden_size + t.hidden_size * t.num_heads * t.head_dim + t.num_heads * t.head_dim
           + 2 * (t.hidden_size * t.num_kv_heads * t.head_dim + t.num_kv_heads * t.head_dim)
           + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
  read_bytes = 2 * (t.num_layers * layer + t.hidden_size + t.hidden_size * t.vocab_size)  # bf16, no embedding
  bandwidth = run[1]["device"]["bandwidth_gbs"] * 1e9
  for r in rows(run[1], "sampler"):
    v, (ms, rate, efficiency, detail, compile_s) = r["values"], r["cells"]
    tokens, nfe = np.array(v["tokens"]), np.array(v["nfe"])
    assert (tokens == TINY.gen).all() and len(tokens) == v["batch"]  # EOS never emitted: every token decoded
    np.testing.assert_allclose(tokens / nfe, v["sampler_tokens_per_forward"], rtol=1e-6)
    assert v["forwards"] >= nfe.max() and (r["setting"] != "AR greedy" or (nfe == TINY.gen).all())
    assert v["tokens_per_forward"] == pytest.approx(tokens.sum() / nfe.sum())
    assert v["tokens_s"] == pytest.approx(tokens.sum() / v["seconds"])
    assert v["ms_per_forward"] == pytest.approx(1e3 * v["seconds"] / v["forwards"])
    assert v["weight_bytes"] == read_bytes and v["bound_ms"] == pytest.approx(1e3 * read_bytes / bandwidth)
    assert ms == f"{v['ms_per_forward']:.2f}" and rate == f"{v['tokens_s']:.1f} tok/s"
    assert efficiency == f"{v['bound_ms'] / v['ms_per_forward']:.0%} of {v['bound_ms']:.3g} ms bound"
    assert detail == f"{v['tokens_per_forward']:.2f} tok/fwd, NFE {nfe.mean():.0f}"
    assert (compile_s == "cached") == (v["compile_s"] is None)
  first = rows(run[1], "sampler")[0]
  assert first["setting"] == "AR greedy" and first["values"]["compile_s"] > 0


def test_every_batch_runs_the_first_settings_before_any_batch_runs_the_rest(monkeypatch):
  s = accelerator.dataclasses.replace(TINY, batches=(1, 2))
  report = accelerator.Report(devices.DeviceLimits("cpu", "cpu", 1.0, "test", 1.0, "test"), "tiny", 1.0)
  order = []
  monkeypatch.setattr(accelerator, "measure", lambda row, deadline, cell: order.append((row.shape, row.setting)))
  accelerator.run_sampler(accelerator.plan_sampler(report, s), s, 1.0, float("inf"))
  first = [(f"batch {b}, {s.gen} new", name) for b in (1, 2) for name in accelerator.FIRST_SETTINGS]
  assert order[:len(first)] == first and sorted(order) == sorted((r.shape, r.setting) for r in report.rows)


def test_batches_and_settings_choose_the_sampler_rows(tmp_path):
  """Only the sampler asked for, two of its settings at batch 3: their rows alone are measured, in the order
  asked, the other sections say why not; the JSON records the compiler flags the cells ran under."""
  settings = ["dynamic t0.85 fused", "AR greedy"]
  report = accelerator.main(["--tiny", "--sections", "sampler", "--batches", "3", "--settings", *settings,
                             "--json", str(tmp_path / "a.json"), "--budget-s", "1800"])
  sampler_rows = rows(report, "sampler")
  assert [r["setting"] for r in sampler_rows] == settings and all(r["na"] is None for r in sampler_rows)
  assert {r["shape"] for r in sampler_rows} == {f"batch 3, {TINY.gen} new"}
  assert all(r["na"] == "not asked for (--sections)" for r in report["rows"] if r["section"] != "sampler")
  assert report["xla_flags"] == os.environ.get("XLA_FLAGS", "")


def test_plain_one_row_products_turn_the_gpu_workaround_off_and_say_so(tmp_path, monkeypatch):
  monkeypatch.setattr(layers, "ONE_ROW_AS_TWO", layers.ONE_ROW_AS_TWO)  # restored after the test
  assert accelerator.main(["--tiny", "--sections", "attention", "--json", str(tmp_path / "a.json"),
                           "--budget-s", "1800"])["one_row_as_two"] == ["gpu"]
  report = accelerator.main(["--tiny", "--sections", "attention", "--plain-one-row-products",
                             "--json", str(tmp_path / "b.json"), "--budget-s", "1800"])
  assert report["one_row_as_two"] == [] and layers.ONE_ROW_AS_TWO == ()


def test_train_mfu_is_the_analytic_flops_over_time_over_peak(run):
  (r,) = rows(run[1], "train")
  v, m = r["values"], r["values"]["model"]
  weights = m["hidden"] * m["head_dim"] * (2 * m["heads"] + 2 * m["kv_heads"]) + 3 * m["hidden"] * m["mlp"]
  flops = 6 * v["rows"] * (2 * v["length"] * m["layers"] * weights + v["length"] * m["hidden"] * m["vocab"])
  assert (v["rows"], v["length"]) == (TINY.train_rows, TINY.train_length) and v["flops"] == flops
  assert v["peak_flops"] == pytest.approx(run[1]["device"]["peak_tflops"] * 1e12)
  assert v["mfu"] == pytest.approx(flops / v["step_s"] / v["peak_flops"])
  assert v["tokens_s"] == pytest.approx(v["rows"] * v["length"] / v["step_s"]) and np.isfinite(v["loss"])
  assert r["cells"][:3] == [f"{1e3 * v['step_s']:.1f}", f"{v['tokens_s']:.0f} tok/s", f"MFU {v['mfu']:.1%}"]


def test_a_failing_unsupported_or_late_cell_says_why_in_one_line():
  row = accelerator.Row("attention", "cudnn", "2L=2048 fwd+bwd")

  def raises(error):
    raise error

  accelerator.measure(row, float("inf"), lambda: raises(RuntimeError("RESOURCE_EXHAUSTED: out of | 3 GiB\nmore")))
  assert row.na == "RuntimeError: RESOURCE_EXHAUSTED: out of / 3 GiB"
  assert row.markdown() == "| attention | cudnn | 2L=2048 fwd+bwd | n/a: " + row.na + " | - | - | - | - |"
  accelerator.measure(row, float("inf"), lambda: raises(accelerator.NotHere("cuDNN needs a GPU")))
  assert row.na == "cuDNN needs a GPU"
  accelerator.measure(row, -float("inf"), lambda: (("1",) * 5, {}))
  assert row.na == "past this section's share of --budget-s"
  accelerator.measure(row, float("inf"), lambda: (("1",) * 5, {"ms": 1.0}))
  assert row.na is None and row.values == {"ms": 1.0} and row.markdown().count(" 1 ") == 5


def test_device_table_picks_the_specific_name_first_and_overrides_win():
  assert devices.known("NVIDIA H100 80GB HBM3") == (3350.0, 989.0)
  assert devices.known("NVIDIA H100 PCIe") == (2000.0, 756.0)
  assert devices.known("NVIDIA GH200 480GB") != devices.known("NVIDIA H200")
  assert devices.known("NVIDIA A100-SXM4-40GB")[0] == 1555.0 and devices.known("NVIDIA A100-SXM4-80GB")[0] == 2039.0
  assert devices.known("TPU v5 lite") == (819.0, 197.0) and devices.known("TPU v5") == (2765.0, 459.0)
  assert devices.known("TPU v6 lite") == (1640.0, 918.0) and devices.known("cpu") is None
  given = devices.limits(123.0, 4.5, copy_bytes=2**20, matmul_n=16)
  assert (given.bandwidth, given.bandwidth_source, given.peak, given.peak_source) == (123e9, "given", 4.5e12, "given")


def test_bad_options_are_one_line_errors(capsys):
  for argv, message in ((["--tiny", "--budget-s", "0"], "--budget-s must be positive; got 0.0"),
                        ([], "JAX sees no GPU or TPU"),
                        (["--tiny", "--sections", "kernels"], "invalid choice: 'kernels'"),
                        (["--tiny", "--batches", "4", "0"], "--batches must be >= 1; got [4, 0]"),
                        (["--tiny", "--settings", "AR"], "invalid choice: 'AR'")):
    with pytest.raises(SystemExit) as stop:
      accelerator.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and message in err[-1], err


def test_dvl_bench_accelerator_runs_the_script(monkeypatch):
  calls = []
  monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
  assert cli.main(["bench", "accelerator", "--tiny"]) == 0
  assert calls == [[sys.executable, os.path.join(os.path.dirname(accelerator.__file__), "accelerator.py"), "--tiny"]]
