"""`dvl serve`: a converted checkpoint behind an OpenAI-compatible HTTP API, batched continuously by `dvl.Engine`.

The engine compiles its programs for text requests before the port opens (`--warm-up`), and for images of the
sizes `--warm-up-images` names, so the first client does not pay for them. SIGTERM / Ctrl-C stop accepting
connections, let in-flight requests finish for up to --grace-period seconds, cancel the rest and exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
from typing import Any, Sequence

from dvl_jax.cli.checkpoint_args import (add_layer_layout, add_pixel_bounds, check_checkpoint, load_options,
                                         load_processor)
from dvl_jax.cli.generate import add_sampling_options, load_mesh
from dvl_jax.diffusion.sampling_config import SamplingConfig
from dvl_jax.serving.engine import DEFAULT_VIEWS, MAX_PROMPT, longest_prompt

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "slots": 8, "max_prompt": None, "chunk": 16, "admit_every": 2,
            "views": None,
            "max_queue": 64, "request_timeout": 600.0, "grace_period": 30.0, "max_body_bytes": 64 * 2 ** 20,
            "max_images": 8, "max_image_bytes": 20 * 2 ** 20, "max_image_pixels": 4096 * 4096}


def add_parser(sub: Any) -> argparse.ArgumentParser:
  d = DEFAULTS
  cmd = sub.add_parser(
      "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching",
      description="POST /v1/chat/completions (text and image_url parts), POST /v1/completions (text or token ids), "
      "GET /v1/models (and /v1/models/ID), /health and /metrics (Prometheus). Requests take OpenAI's fields plus "
      "dvl's algorithm, remasking_strategy, steps, confidence_threshold, top_k and return_token_ids; the sampling "
      "options below are their defaults.")
  cmd.add_argument("--checkpoint", required=True,
                   help="converted checkpoint directory (config.json, params/, tokenizer.json), as written by "
                   "`dvl convert` or training (required)")
  cmd.add_argument("--host", default=d["host"], help=f"address to bind; 0.0.0.0 exposes the server to the network "
                   f"(default: {d['host']}, this machine only)")
  cmd.add_argument("--port", type=int, default=d["port"], help=f"port to bind; 0 picks a free one, printed at start "
                   f"(default: {d['port']})")
  cmd.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint folder's name)")
  cmd.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); also read from the "
                   "DVL_API_KEY environment variable (default: none, no authentication)")
  engine = cmd.add_argument_group("engine")
  engine.add_argument("--slots", type=int, default=d["slots"], help="requests decoded at once (rows of the KV "
                      f"cache; a multiple of the mesh's data axis) (default: {d['slots']})")
  engine.add_argument("--max-prompt", type=int, default=d["max_prompt"], help="longest prompt in tokens, image "
                      f"tokens included; longer ones get a 400 (default: {MAX_PROMPT}, or less where the model's "
                      "max_position_embeddings would not hold it and --gen-length more)")
  engine.add_argument("--chunk", type=int, default=d["chunk"], help="decoding forwards between two looks at the "
                      "queue while every slot is busy; a look also comes as soon as a request finishes (latency of "
                      f"streamed blocks vs. host overhead) (default: {d['chunk']})")
  engine.add_argument("--admit-every", type=int, default=d["admit_every"], help="decoding forwards between two "
                      "looks at the queue while a slot is free: a request that arrives waits at most this long for "
                      f"its slot (default: {d['admit_every']})")
  engine.add_argument("--views", type=int, default=d["views"], help="cache lengths a decoding chunk may attend to "
                      "(the whole cache, then each about 0.71 of the one before: 7 reach down to 1/8): each chunk "
                      "reads the shortest that holds its requests, at one compile per view (default: "
                      f"{DEFAULT_VIEWS} where attention reads the whole view, as on a CPU; 1 on GPUs and TPUs, "
                      "whose decoding kernels read only each row's live part of the cache, for the head dims and "
                      "dtypes they take)")
  engine.add_argument("--mesh", default=None, help="device mesh data,fsdp,tensor (e.g. 1,2,4), or auto: "
                      "dvl.suggest_mesh for --slots (default: one device)")
  engine.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="cast the weights to this dtype while loading (default: the checkpoint's stored dtype)")
  engine.add_argument("--warm-up", default=None,
                      help="algorithms (comma-separated) whose text programs compile for every prompt-length bucket "
                      "before the port opens, or none (image requests still compile on first use) (default: "
                      "--algorithm's)")
  engine.add_argument("--warm-up-images", default=None,
                      help="image sizes WIDTHxHEIGHT in pixels (comma-separated, e.g. 448x448,1280x720) whose "
                      "prefill also compiles for every prompt-length bucket before the port opens: an image size "
                      "first met under load stalls every slot for a compile (default: none)")
  add_pixel_bounds(engine)
  add_layer_layout(engine)
  limits = cmd.add_argument_group("limits and faults")
  limits.add_argument("--max-queue", type=int, default=d["max_queue"], help="requests that may wait for a slot; "
                      f"more get a 429 (default: {d['max_queue']})")
  limits.add_argument("--request-timeout", type=float, default=d["request_timeout"], help="seconds a request may "
                      f"take from arrival to its last token; then it is cancelled with a 504 (default: "
                      f"{d['request_timeout']:g})")
  limits.add_argument("--grace-period", type=float, default=d["grace_period"], help="seconds in-flight requests "
                      f"get to finish after SIGTERM before they are cancelled (default: {d['grace_period']:g})")
  limits.add_argument("--max-body-bytes", type=int, default=d["max_body_bytes"], help="largest request body; "
                      f"larger ones get a 413 (default: {d['max_body_bytes']})")
  limits.add_argument("--max-images", type=int, default=d["max_images"],
                      help=f"images per chat request (default: {d['max_images']})")
  limits.add_argument("--max-image-bytes", type=int, default=d["max_image_bytes"],
                      help=f"an image's encoded size (default: {d['max_image_bytes']})")
  limits.add_argument("--max-image-pixels", type=int, default=d["max_image_pixels"], help="an image's width x "
                      f"height, checked before decoding (default: {d['max_image_pixels']})")
  limits.add_argument("--allowed-local-media-path", default=None, help="a folder whose files requests may name as "
                      "file:///... image URLs (default: none; only data: URLs, never network fetches)")
  cmd.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default: info)")
  add_sampling_options(cmd.add_argument_group(
      "decoding defaults (dvl.SamplingConfig)", "--gen-length is the longest answer a request may ask and its "
      "default max_tokens; a request's own algorithm, remasking_strategy, steps, confidence_threshold, "
      "temperature, top_p and top_k override these."))
  return cmd


def warm_up_images(sizes: str | None, processor: Any) -> list[Any]:
  """`--warm-up-images`: one request per size, a blank image of it through the processor (its token count and
  patch layout are those of any image the processor sizes the same)."""
  from PIL import Image

  from dvl_jax.data.chat_template import generation_prompt
  from dvl_jax.serving.request import Request

  requests = []
  for size in sizes.split(",") if sizes else []:
    width, _, height = size.strip().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
      raise ValueError(f"--warm-up-images takes sizes like 448x448,1280x720; got {size!r}")
    inputs = processor([generation_prompt("", 1)], [[Image.new("RGB", (int(width), int(height)))]])
    requests.append(Request([int(t) for t in inputs["input_ids"][0]], max_tokens=1,
                            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]))
  return requests


def check(args: argparse.Namespace) -> argparse.Namespace:
  """`args` if its checkpoint exists and its values are in range; else a one-line error."""
  check_checkpoint(args.checkpoint)
  for name in ("slots", "max_prompt", "chunk", "admit_every", "views", "max_images", "max_body_bytes",
               "max_image_bytes", "max_image_pixels"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.max_queue < 0 or args.request_timeout <= 0 or args.grace_period < 0:
    raise ValueError("--max-queue and --grace-period must be >= 0 and --request-timeout > 0")
  if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
    raise FileNotFoundError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a folder")
  return args


def run(args: argparse.Namespace) -> int:
  sock = reserve(check(args).host, args.port)
  try:
    return _serve(args, sock)
  finally:
    sock.close()


def reserve(host: str, port: int) -> socket.socket:
  """The server's socket, bound before anything loads (a busy port or a bad address fails at once, not after the
  warm-up's minutes) and listening only once uvicorn serves on it: meanwhile a client is refused, not queued."""
  if not 0 <= port <= 65535:
    raise ValueError(f"--port must be in [0, 65535], got {port}")
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
  except OSError as e:
    raise OSError(f"--host {host}: {e.strerror or e}") from e
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise OSError(f"cannot bind {host}:{port} ({e.strerror or e}); pick a free --port (0: any free one)") from e
  return sock


def parse(argv: Sequence[str]) -> argparse.Namespace:
  """`dvl serve`'s options from `argv` (what follows `dvl serve`), defaults filled in: `benchmarks/serve.py
  --in-process` builds a server's engine from the same options without serving it."""
  parser = argparse.ArgumentParser(prog="dvl")
  add_parser(parser.add_subparsers(dest="command", required=True))
  return check(parser.parse_args(["serve", *argv]))


def build_engine(args: argparse.Namespace) -> tuple[Any, Any]:
  """The engine `dvl serve` puts behind its API, loaded and warmed up as `args` say, and the checkpoint's
  processor its requests go through -> (engine, processor)."""
  import dvl_jax as dvl

  processor = load_processor(args)
  images = warm_up_images(args.warm_up_images, processor)  # a bad size fails before the model loads
  config = SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})
  config.resolve(processor.config)  # checks the options against the model before it loads; the engine keeps
  # the config unresolved, so AR requests take the model's positions (M-RoPE) and block diffusion flat ones
  fits = longest_prompt(processor.config, config, cap=args.max_prompt or MAX_PROMPT)
  max_prompt = args.max_prompt or fits
  if fits < max_prompt:
    raise ValueError(f"--max-prompt {max_prompt} + --gen-length {config.gen_length} exceed the model's "
                     f"{processor.config.text.max_position_embeddings} positions (max_position_embeddings); lower "
                     f"--max-prompt to {fits} or --gen-length")
  model = dvl.load(args.checkpoint, mesh=load_mesh(args.mesh, processor.config, args.slots), dtype=args.dtype,
                   **load_options(args))
  engine = dvl.Engine(model, config, slots=args.slots, max_prompt=max_prompt, chunk=args.chunk,
                      admit_every=args.admit_every, views=args.views)
  warm = args.warm_up or config.algorithm
  if warm != "none":
    engine.warm_up(warm.split(","), images=images)
  return engine, processor


def settings(args: argparse.Namespace) -> Any:
  """The HTTP layer's `Settings` (model name, key and limits) from `args`."""
  from dvl_jax.serving.http import MediaLimits, Settings

  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  return Settings(name, api_key=args.api_key or os.environ.get("DVL_API_KEY"), max_queue=args.max_queue,
                  request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                  max_images=args.max_images, media=MediaLimits(args.max_image_bytes, args.max_image_pixels,
                                                                args.allowed_local_media_path))


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
  import uvicorn

  from dvl_jax.serving.http import create_app

  engine, processor = build_engine(args)
  served = settings(args)
  app = create_app(engine, processor, served, slots=args.slots)
  host, port = sock.getsockname()[:2]
  server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=args.grace_period, log_level=args.log_level))
  print(f"dvl serve: {served.model_name} on http://{host}:{port}/v1", flush=True)
  # uvicorn re-raises the signal that stopped it once it is done; a no-op handler then lets the command exit 0.
  previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    server.run(sockets=[sock])
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  return 0
