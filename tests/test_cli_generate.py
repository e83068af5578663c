"""`dvl generate` and `dvl bench` end to end on a tiny random checkpoint with a word tokenizer; every
subcommand's --help; user mistakes as one-line errors with exit code 2."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from flax import nnx

import dvl_jax as dvl
from dvl_jax import cli
from dvl_jax.cli import bench as bench_cli
from dvl_jax.checkpoints import saving
from dvl_jax.testing.tiny import tiny_model
from tests.data.helpers import make_processor, noise_image

PIXELS = 56 * 56  # 4 image tokens per image
QUESTION = "What is this ?"
SAMPLING = {"gen_length": 16}


class Recorder(io.StringIO):
  """stdout that remembers each write: streaming shows up as several."""

  def __init__(self):
    super().__init__()
    self.writes: list[str] = []

  def write(self, s: str) -> int:
    self.writes.append(s)
    return super().write(s)


def dvl_main(*argv: str) -> tuple[int, Recorder, str]:
  """(exit code, stdout, stderr) of `dvl ARGV`."""
  out, err = Recorder(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(argv))
    except SystemExit as e:
      code = e.code
  return code, out, err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  processor = make_processor()
  # A random model whose lm_head never picks a special token: its answers are visible words that run to
  # --gen-length, i.e. over two blocks, whatever the tokenizer's word ids (streaming needs >= 2 pieces).
  model = tiny_model(processor.config)
  kernel = model.lm_head.kernel
  special = [i for i, token in processor.tokenizer.added_tokens_decoder.items() if token.special]
  kernel.set_value(kernel.get_value().at[:, special].set(0.0))  # logit 0, below the max of the random others
  ckpt = saving.save(model, str(root / "ckpt"))
  processor.tokenizer.save_pretrained(ckpt)
  for i, size in enumerate((56, 84)):
    noise_image(size, size, seed=i).save(root / f"image{i}.png")
  (root / "notes.txt").write_text("not an image")
  return {"root": root, "ckpt": ckpt, "image": str(root / "image0.png")}


def generate_args(files, *extra: str) -> list[str]:
  return ["generate", "--checkpoint", files["ckpt"], "--min-pixels", str(PIXELS), "--max-pixels", str(PIXELS),
          "--gen-length", str(SAMPLING["gen_length"]), *extra]


def direct(files, prompts, images):
  """`dvl.generate` called as a library user would, for the same requests."""
  processor = dvl.Processor.from_pretrained(files["ckpt"], min_pixels=PIXELS, max_pixels=PIXELS)
  inputs = processor([dvl.generation_prompt(p, len(i)) for p, i in zip(prompts, images)],
                     [[_open(path) for path in paths] for paths in images])
  return dvl.generate(dvl.load(files["ckpt"]), inputs, dvl.SamplingConfig(**SAMPLING), tokenizer=processor.tokenizer)


def _open(path):
  from PIL import Image

  with Image.open(path) as image:
    return image.convert("RGB")


@pytest.fixture(scope="module")
def json_answer(files):
  code, out, err = dvl_main(*generate_args(files, "--prompt", QUESTION, "--image", files["image"], "--json"))
  assert code == 0, err
  return json.loads(out.getvalue())


def test_every_option_of_every_subcommand_has_help_with_its_default():
  parser = cli.commands._parser()
  subcommands = parser._subparsers._group_actions[0].choices
  assert set(subcommands) == {"convert", "export", "generate", "train", "demo", "bench", "eval", "serve"}
  for name, sub in [("", parser), *subcommands.items()]:
    code, out, _ = dvl_main(*([name] if name else []), "--help")
    assert code == 0
    for action in sub._actions:
      if action.option_strings and action.dest != "help":
        assert action.option_strings[-1] in out.getvalue(), (name, action.option_strings)
        assert "default" in action.help or "required" in action.help, (name, action.option_strings)
  generate = subcommands["generate"]
  options = {a.dest for a in generate._actions}
  assert set(dvl.SamplingConfig.__dataclass_fields__) <= options


def test_json_output_equals_dvl_generate(files, json_answer):
  want = direct(files, [QUESTION], [[files["image"]]])
  assert json_answer["tokens"] == want.tokens[0, :want.lengths[0]].tolist()
  assert json_answer["text"] == want.text[0]
  assert json_answer["nfe"] == int(want.nfe[0]) and json_answer["request"] == 0
  assert json_answer["tokens_per_forward"] > 0 and json_answer["seconds"] > 0


def test_dtype_casts_the_weights_while_loading(files, monkeypatch):
  """`--dtype bfloat16` loads bf16 params (and the answer is that model's answer)."""
  loaded = []
  real_load = dvl.load
  monkeypatch.setattr(dvl, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
  code, out, err = dvl_main(*generate_args(files, "--prompt", QUESTION, "--image", files["image"], "--json",
                                           "--dtype", "bfloat16"))
  assert code == 0, err
  assert {x.dtype.name for x in jax.tree.leaves(nnx.state(loaded[0], nnx.Param))} == {"bfloat16"}
  assert json.loads(out.getvalue())["tokens"]


def test_text_mode_streams_blocks_that_make_up_the_final_text(files, json_answer):
  code, out, err = dvl_main(*generate_args(files, "--prompt", QUESTION, "--image", files["image"]))
  assert code == 0, err
  assert out.getvalue() == json_answer["text"] + "\n"
  pieces = [w for w in out.writes if w and w != "\n"]
  assert len(pieces) >= 2 and "".join(pieces) == json_answer["text"]  # streamed, not printed at the end
  assert f"{len(json_answer['tokens'])} tokens" in err


@pytest.fixture
def untidy_answers(monkeypatch):
  """`dvl.generate` answering with extra lines, spaces and a full stop around its own text."""
  real_generate = dvl.generate

  def generate(*args, **kwargs):
    out = real_generate(*args, **kwargs)
    return dataclasses.replace(out, text=[f"  {t}.\nsecond line" for t in out.text])

  monkeypatch.setattr(dvl, "generate", generate)


@pytest.mark.parametrize("mode", ["json", "text"])
def test_clean_answer_prints_the_answer_as_the_evaluation_scored_it(files, json_answer, untidy_answers, mode):
  code, out, err = dvl_main(*generate_args(files, "--prompt", QUESTION, "--image", files["image"], "--clean-answer",
                                           *(["--json"] if mode == "json" else [])))
  assert code == 0, err
  clean = dvl.clean_answer(f"  {json_answer['text']}.")
  if mode == "json":
    result = json.loads(out.getvalue())
    assert result["text"] == clean and result["tokens"] == json_answer["tokens"]
  else:
    assert out.getvalue() == clean + "\n" and out.writes[0] == clean  # whole, not streamed


def test_pixel_bounds_default_to_the_checkpoints(files, json_answer, tmp_path):
  """Without --min-pixels / --max-pixels the checkpoint's bounds apply (here the ones json_answer passed)."""
  ckpt = shutil.copytree(files["ckpt"], tmp_path / "ckpt")
  (ckpt / "preprocessor_config.json").write_text(json.dumps({"min_pixels": PIXELS, "max_pixels": PIXELS}))
  code, out, err = dvl_main("generate", "--checkpoint", str(ckpt), "--prompt", QUESTION, "--image", files["image"],
                            "--gen-length", str(SAMPLING["gen_length"]), "--json")
  assert code == 0, err
  assert json.loads(out.getvalue())["tokens"] == json_answer["tokens"]


def test_requests_file_batches_every_line(files):
  root = files["root"]
  lines = [{"prompt": QUESTION, "images": ["image0.png"]}, {"prompt": "Tell me more about it .", "images": []},
           {"prompt": "What is this ?", "images": ["image1.png", str(root / "image0.png")]}]
  path = root / "requests.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
  code, out, err = dvl_main(*generate_args(files, "--requests", str(path), "--json"))
  assert code == 0, err
  results = [json.loads(line) for line in out.getvalue().splitlines()]
  want = direct(files, [line["prompt"] for line in lines],
                [[os.path.join(root, p) for p in line["images"]] for line in lines])
  assert [r["request"] for r in results] == [0, 1, 2]
  assert [r["tokens"] for r in results] == [want.tokens[i, :want.lengths[i]].tolist() for i in range(3)]
  assert "3/3" in err  # the per-request progress bar


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "missing image", "not an image",
                                  "unknown option value", "invalid sampling option", "prompt too long",
                                  "bad requests line", "misspelt requests key", "image with requests"])
def test_user_mistakes_end_in_one_line_and_exit_code_2(files, case):
  root, image = files["root"], files["image"]
  (root / "empty").mkdir(exist_ok=True)
  (root / "bad.jsonl").write_text('{"prompt": "hi"}\n{"images": []}\n')
  (root / "misspelt.jsonl").write_text('{"prompt": "hi", "image": ["a.png"]}\n')
  prompt = ["--prompt", QUESTION]
  argv = {
      "missing checkpoint": ["generate", "--checkpoint", str(root / "nope"), *prompt],
      "not a checkpoint": ["generate", "--checkpoint", str(root / "empty"), *prompt],
      "missing image": generate_args(files, *prompt, "--image", str(root / "nope.png")),
      "not an image": generate_args(files, *prompt, "--image", str(root / "notes.txt")),
      "unknown option value": generate_args(files, *prompt, "--mode", "bogus"),
      "invalid sampling option": generate_args(files, *prompt, "--steps", "0"),
      "prompt too long": generate_args(files, *prompt, "--image", image, "--max-len", "16"),
      "bad requests line": generate_args(files, "--requests", str(root / "bad.jsonl")),
      "misspelt requests key": generate_args(files, "--requests", str(root / "misspelt.jsonl")),
      "image with requests": generate_args(files, "--requests", str(root / "bad.jsonl"), "--image", image),
  }[case]
  code, out, err = dvl_main(*argv)
  assert code == 2 and not out.getvalue()
  assert len(err.splitlines()) == 1 and err.startswith("dvl generate: error: "), err
  want = {"missing checkpoint": "does not exist", "not a checkpoint": "not a converted checkpoint",
          "missing image": "nope.png does not exist", "not an image": "not an image",
          "unknown option value": "invalid choice: 'bogus'", "invalid sampling option": "steps must be >= 1",
          "prompt too long": "exceeds the context of 16 tokens", "bad requests line": "bad.jsonl:2:",
          "misspelt requests key": "misspelt.jsonl:1: unknown key 'image'",
          "image with requests": "--image goes with --prompt"}[case]
  assert want in err


def test_debug_shows_the_traceback(files):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cli.main(["--debug", "generate", "--checkpoint", str(files["root"] / "nope"), "--prompt", QUESTION])


def test_bench_runs_the_script_with_the_remaining_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 3)
  assert dvl_main("bench", "sampling", "--small", "--gen", "8")[0] == 3
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sampling.py")
  assert calls == [[sys.executable, script, "--small", "--gen", "8"]] and os.path.isfile(script)


def test_bench_lists_exactly_the_runnable_scripts_of_benchmarks():
  """Every script with a `__main__` entry in benchmarks/ is a `dvl bench` name, and every name is such a script."""
  runnable = {os.path.splitext(f)[0] for f in os.listdir(bench_cli.FOLDER)
              if f.endswith(".py") and '__name__ == "__main__"' in open(os.path.join(bench_cli.FOLDER, f)).read()}
  assert set(bench_cli.BENCHMARKS) == runnable


def test_bench_without_the_benchmarks_folder_says_so(monkeypatch, tmp_path):
  monkeypatch.setattr(bench_cli, "FOLDER", str(tmp_path))
  code, _, err = dvl_main("bench", "train")
  assert code == 2 and len(err.splitlines()) == 1 and "ship with the source repository" in err


def test_requests_near_the_mapping_limit_drop_the_compiled_programs_before_each_batch(files, monkeypatch):
  from dvl_jax.core import mappings
  root = files["root"]
  lines = [{"prompt": QUESTION, "images": ["image0.png"]}, {"prompt": "Tell me more about it .", "images": []}]
  path = root / "near_limit.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  outputs, real = {}, jax.clear_caches
  for near in (False, True):
    with monkeypatch.context() as patch:
      clears = []
      patch.setattr(jax, "clear_caches", lambda: (clears.append(1), real()))
      if near:
        patch.setattr(mappings, "usage", lambda *_: (95, 100))
      code, out, err = dvl_main(*generate_args(files, "--requests", str(path), "--json", "--batch-size", "1"))
    assert code == 0, err
    assert len(clears) == (2 if near else 0)  # before every batch, or never
    outputs[near] = [json.loads(line)["tokens"] for line in out.getvalue().splitlines()]
  assert outputs[True] == outputs[False] and len(outputs[True]) == 2
