"""`dvl generate`: answers questions about images with a converted checkpoint, one prompt or a JSONL file.

Every `SamplingConfig` field is an option, derived from the dataclass so the two never drift. Without
`--json` the answer streams to the terminal block by block as the sampler finishes blocks
(`generate(on_block=...)`); with `--json` each request prints one JSON object. `--clean-answer` prints
answers cleaned as the original evaluation scored them (whole: the clean-up needs the end). Bad inputs
(checkpoint, images, requests file, prompt length) are found before any weights load. A long requests file
compiles per prompt shape; near the process's limit on memory mappings (`mappings.make_room`) the compiled programs
are dropped before the next batch, as `dvl eval` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from typing import Any

import numpy as np

from dvl_jax.cli.checkpoint_args import (add_layer_layout, add_pixel_bounds, check_checkpoint, load_options,
                                         load_processor)
from dvl_jax.core import mappings
from dvl_jax.diffusion.sampling_config import (ABLATION_SCHEDULES, ALGORITHMS, CONFIDENCES, MODES, POSITIONS,
                                             STRATEGIES, Prompts, SamplingConfig)

SAMPLING_HELP = {  # one entry per SamplingConfig field; the default is appended from the dataclass
    "gen_length": "tokens to generate per request",
    "steps": "denoising passes per block for the low_confidence strategies",
    "block_size": "tokens per diffusion block; unset: the checkpoint's block size",
    "remasking_strategy": "which masked tokens a denoising pass fixes: the most confident `block_size / steps` "
                          "(static), every one above --confidence-threshold or else that many (dynamic), or every "
                          "one above it, at least one (threshold)",
    "confidence_threshold": "confidence above which the dynamic / threshold strategies fix a token",
    "mode": "fused: commit a finished block in the next block's first forward; reference: a separate commit "
            "pass as in the original (same tokens, one forward more per block)",
    "temperature": "0: greedy; > 0: sample at this temperature",
    "top_k": "sample among the k most likely tokens (0: all)",
    "top_p": "sample from the smallest set of tokens with this probability mass (1: all)",
    "algorithm": "block_diffusion, or autoregressive: token-by-token decoding of the same model (the baseline)",
    "positions": "position ids; unset: flat for block diffusion, the checkpoint's position mode for autoregressive",
    "confidence": "a sampled token's confidence (temperature > 0): its probability under the sampling distribution "
                  "(sampled) or the unmodified softmax; unset: the model family's",
    "ablation_schedule": "the unmasking schedule when the answer fits in the prompt's one block: num_transfer over "
                         "block_size or over gen_length tokens; unset: the model family's",
    "length_bucket": "prompts are padded to a multiple of this many tokens (one compile per bucket)",
    "max_len": "KV-cache length; unset: padded prompt + gen_length, rounded up to a block",
    "fused_window_share": "fused mode: the share of a batch's decoding rows that must be committing a block for "
                          "the forward to fuse the commits (a window twice as wide for every row); fewer commit "
                          "in a pass of their own (same tokens). 0: always fuse (accelerators)",
    "packed_commit_share": "fused mode, one device: when at most this share of the rows commit a block, their "
                           "commits ride in the next forward anyway, the decoder computing only those rows' "
                           "previous blocks besides every row's current one (same tokens). 0: never; try 0.25 on "
                           "an accelerator",
    "compact_rows": "rows that finish leave the batch, which halves as they do, so it does not compute every "
                    "row until its slowest is done (same tokens; longer compiles). Pays on a CPU; one device, "
                    "not while streaming. dvl serve: a chunk runs only the slots, halved as they empty, that hold "
                    "its busy requests (one compile per cache view and width, at warm-up)",
}
CHOICES = {"remasking_strategy": STRATEGIES, "mode": MODES, "algorithm": ALGORITHMS, "positions": POSITIONS,
           "confidence": CONFIDENCES, "ablation_schedule": ABLATION_SCHEDULES}


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str
  images: list[str]


def add_parser(sub: Any) -> argparse.ArgumentParser:
  cmd = sub.add_parser(
      "generate", help="answer a question about images (or a JSONL file of them) with a converted checkpoint",
      description="Streams the answer to the terminal block by block, or prints one JSON object per request "
      "with --json. Errors in the inputs end with one line and exit code 2 (`dvl --debug generate ...` shows "
      "the traceback).")
  cmd.add_argument("--checkpoint", required=True,
                   help="converted checkpoint directory: config.json, params/ and tokenizer.json, as written by "
                   "`dvl convert` or training; may be a gs:// URL (required)")
  source = cmd.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="the question; the chat template and one <image> per --image are added "
                      "(required unless --requests)")
  source.add_argument("--requests", help='JSONL file with one {"prompt": "...", "images": ["a.png", ...]} per '
                      "line; relative image paths start at the file's folder (required unless --prompt)")
  cmd.add_argument("--image", action="append", default=[],
                   help="an image file for --prompt; repeat for several images (default: none, a text-only prompt)")
  cmd.add_argument("--batch-size", type=int, default=8,
                   help="requests decoded together; in text mode the first of each batch streams and the others "
                   "print when their batch ends (default: 8)")
  add_sampling_options(cmd.add_argument_group("sampling options (dvl.SamplingConfig)"))
  cmd.add_argument("--seed", type=int, default=0, help="PRNG seed of sampling (temperature > 0) (default: 0)")
  cmd.add_argument("--mesh", default=None,
                   help="device mesh data,fsdp,tensor (e.g. 1,2,4), or auto: dvl.suggest_mesh for the batch size "
                   "(default: one device)")
  cmd.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights to this dtype while loading, e.g. bfloat16 on a GPU/TPU (default: the "
                   "checkpoint's stored dtype)")
  add_pixel_bounds(cmd)
  add_layer_layout(cmd)
  cmd.add_argument("--clean-answer", action="store_true",
                   help="print each answer as DiffusionVL's evaluation scores it: up to its first line, stripped, "
                   "one trailing '.' dropped; text mode then prints it whole instead of streaming (default: the "
                   "decoded text as it is)")
  cmd.add_argument("--json", action="store_true",
                   help="print one JSON object per request: request, text, tokens (up to EOS), nfe (model "
                   "forwards), tokens_per_forward, seconds (its batch's wall time, the first batch's with "
                   "compilation) (default: stream text)")
  cmd.add_argument("--no-progress", action="store_true",
                   help="hide the per-request progress bar of --requests --json (default: shown)")
  return cmd


def add_sampling_options(group: Any) -> None:
  """One `--field-name` per `SamplingConfig` field, typed and defaulted by the field itself."""
  hints = typing.get_type_hints(SamplingConfig)
  for field in dataclasses.fields(SamplingConfig):
    kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
    if kind not in (int, float, str, bool):
      raise TypeError(f"SamplingConfig.{field.name}: the CLI has no option type for {kind}")
    default = "unset" if field.default is None else field.default
    flag, help_text = f"--{field.name.replace('_', '-')}", f"{SAMPLING_HELP[field.name]} (default: {default})"
    if kind is bool:
      group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                         help=help_text)
    else:
      group.add_argument(flag, dest=field.name, type=kind, default=field.default, choices=CHOICES.get(field.name),
                         help=help_text)


def run(args: argparse.Namespace) -> int:
  import jax

  import dvl_jax as dvl

  config = SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})
  if args.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
  requests = _requests(args)
  check_checkpoint(args.checkpoint)
  processor = load_processor(args)
  config = config.resolve(processor.config)
  batch_size = min(args.batch_size, len(requests))
  progress = _progress(len(requests), args)
  model, key = None, jax.random.key(args.seed)
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    inputs = processor([dvl.generation_prompt(r.prompt, len(r.images)) for r in chunk],
                       [[_open_image(p) for p in r.images] for r in chunk])
    _check_fits(inputs, config, processor.config, _label(args, start, len(chunk)))
    if model is None:
      model = dvl.load(args.checkpoint, mesh=load_mesh(args.mesh, processor.config, batch_size), dtype=args.dtype,
                       **load_options(args))
    live = None if args.json else _LiveText(processor.tokenizer, processor.config.eos_token_id)
    if live and args.requests:
      print(f"[{start + 1}/{len(requests)}] {chunk[0].prompt}", flush=True)
    mappings.make_room()  # a long file compiles per prompt shape: past the process's limit a compile would abort
    tic = time.perf_counter()
    out = dvl.generate(model, inputs, config, rng=jax.random.fold_in(key, start), tokenizer=processor.tokenizer,
                       on_block=None if live is None or args.clean_answer else live.on_block)
    seconds = time.perf_counter() - tic
    texts = out.clean_text if args.clean_answer else out.text
    for row, request in enumerate(chunk):
      result = {"request": start + row, "text": texts[row], "tokens": out.tokens[row, :out.lengths[row]].tolist(),
                "nfe": int(out.nfe[row]), "tokens_per_forward": float(out.tokens_per_forward[row]),
                "seconds": round(seconds, 4)}
      if live is None:
        print(json.dumps(result), flush=True)
      else:
        _print_text(live, row, request, result, len(requests) if args.requests else 0)
    progress.update(len(chunk))
  progress.close()
  return 0


def _requests(args: argparse.Namespace) -> list[Request]:
  """The `--prompt` / `--image` request or the `--requests` file's, every image path checked."""
  if args.requests is None:
    requests = [Request(args.prompt, list(args.image))]
  elif args.image:
    raise ValueError("--image goes with --prompt; each line of a --requests file lists its own images")
  else:
    requests = _read_jsonl(args.requests)
  for path in (p for r in requests for p in r.images):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"image {path} does not exist")
  return requests


def _read_jsonl(path: str) -> list[Request]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"requests file {path} does not exist")
  folder, requests = os.path.dirname(os.path.abspath(path)), []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
      images = row.get("images", []) if isinstance(row, dict) else None
      if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(images, list)
              and all(isinstance(p, str) for p in images)):
        raise ValueError(f'{path}:{number}: a request looks like {{"prompt": "...", "images": ["a.png"]}}')
      unknown = sorted(set(row) - {"prompt", "images"})  # a misspelt "images" would drop the images silently
      if unknown:
        raise ValueError(f'{path}:{number}: unknown key {unknown[0]!r}; a request has "prompt" and "images" only')
      requests.append(Request(row["prompt"], [os.path.join(folder, p) for p in images]))
  if not requests:
    raise ValueError(f"{path} holds no requests")
  return requests


def _open_image(path: str) -> Any:
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{path} is not an image PIL can read ({type(e).__name__})") from e


def _check_fits(inputs: dict[str, Any], config: SamplingConfig, model_cfg: Any, label: str) -> None:
  """The sampler's own prompt-length checks, run before the weights load and naming the requests."""
  try:
    Prompts.coerce(inputs).bucketed(config, model_cfg)
  except ValueError as e:
    raise ValueError(f"{label}{e}") from e


def _label(args: argparse.Namespace, start: int, rows: int) -> str:
  """Which requests an error is about (nothing for --prompt)."""
  if args.requests is None:
    return ""
  return f"{args.requests}: request{'s' * (rows > 1)} {start + 1}{f'-{start + rows}' * (rows > 1)}: "


def load_mesh(spec: str | None, model_cfg: Any, batch: int) -> Any:
  """The mesh `--mesh` names for `batch` rows (None: one device; "auto": `suggest_mesh`), for `dvl.load`."""
  if spec is None:
    return None
  from dvl_jax.parallel.mesh import make_mesh
  from dvl_jax.diffusion.sampling_mesh import suggest_mesh

  return make_mesh(suggest_mesh(model_cfg, batch=batch) if spec == "auto" else suggest_mesh(model_cfg, override=spec))


def _progress(total: int, args: argparse.Namespace) -> Any:
  from tqdm import tqdm

  return tqdm(total=total, unit="request", file=sys.stderr,
              disable=args.no_progress or not args.json or args.requests is None)


class _LiveText:
  """The first row's answer as text while it streams: the tokens so far, cut at EOS, decoded; what is new
  goes to stdout. Text ending in an incomplete UTF-8 character (U+FFFD) waits for the next block."""

  def __init__(self, tokenizer: Any, eos_id: int):
    self.tokenizer, self.eos_id = tokenizer, eos_id
    self.tokens: list[int] = []
    self.shown = ""

  def on_block(self, row: int, tokens: np.ndarray) -> None:
    if row or self.eos_id in self.tokens:
      return
    self.tokens += tokens.tolist()
    if self.eos_id in self.tokens:
      self.tokens = self.tokens[:self.tokens.index(self.eos_id) + 1]
    text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
      self.show(text)

  def show(self, text: str) -> None:
    if text.startswith(self.shown):
      sys.stdout.write(text[len(self.shown):])
      sys.stdout.flush()
      self.shown = text


def _print_text(live: _LiveText, row: int, request: Request, result: dict[str, Any], total: int) -> None:
  """Text mode: the streamed row's rest, or another row whole; statistics on stderr."""
  if row == 0:
    live.show(result["text"])
  else:
    print(f"[{result['request'] + 1}/{total}] {request.prompt}\n{result['text']}", end="")
  print(flush=True)
  print(f"({len(result['tokens'])} tokens, {result['nfe']} forwards, {result['tokens_per_forward']:.2f} tokens "
        f"per forward, {result['seconds']:.2f} s)", file=sys.stderr, flush=True)
