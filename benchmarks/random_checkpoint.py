"""A random checkpoint with a real checkpoint's vocabulary, for the serving benchmark (`dvl bench random_checkpoint`).

The demo's trained model has a 128-token vocabulary, so its lm_head costs nothing and hides what a real
checkpoint's 151,680-row one costs every forward; weights cannot be downloaded here. This writes
`benchmarks/sampling.py`'s random model (hidden 512, 8 layers, GQA 8 / 2, the lm_head scaled so confidences
spread as a trained model's do and EOS never chosen, so every request decodes all its `max_tokens`) with a small
Qwen2.5-VL vision tower whose merger feeds the decoder (image requests work), plus a word-level tokenizer of the
demo's synthetic corpus padded to the vocabulary: what `dvl serve`, `dvl generate` and `benchmarks/serve.py`
load. Same seed, same checkpoint. The full vocabulary's model has 179M parameters (0.7 GB in fp32; about a
minute to write on two cores).

    python benchmarks/random_checkpoint.py --out /tmp/fv [--vocab full] [--seed 0]
    dvl serve --checkpoint /tmp/fv --slots 8 --max-prompt 128 --gen-length 128 --port 0 &
    python benchmarks/serve.py --url URL --checkpoint /tmp/fv --image-fraction 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import sampling  # noqa: E402
from dvl_jax.core.config import VisionConfig  # noqa: E402

LM_HEAD_SCALE = 40.0  # `benchmarks/sampling.py`'s default: a trained model's spread of confidences


def write(out: str, vocab: int, *, small: bool = False, seed: int = 0) -> str:
  """Writes the checkpoint to `out` (a new directory) -> `out`. `small`: sampling.py's small decoder."""
  from dvl_jax.checkpoints.saving import save
  from dvl_jax.data import synthetic
  from dvl_jax.data.word_tokenizer import word_tokenizer

  hidden = 256 if small else 512
  vision = VisionConfig(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=hidden,
                        fullatt_block_indexes=(1,))
  model = sampling.bench_model(small, LM_HEAD_SCALE, vocab, "per-layer", vision=vision, seed=seed,
                               image_token_id=vocab - 6, video_token_id=vocab - 5, vision_start_token_id=vocab - 4,
                               vision_end_token_id=vocab - 3)
  with tempfile.TemporaryDirectory() as side:
    word_tokenizer(synthetic.corpus(), model.config).save_pretrained(side)
    return save(model, out, side_files_from=side)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="a new directory for the checkpoint")
  parser.add_argument("--vocab", default="full", help=f"'full' ({sampling.FULL_VOCAB:,} rows, Qwen2.5-VL's) or a "
                      "number of rows (default: full)")
  parser.add_argument("--small", action="store_true", help="sampling.py's small decoder (hidden 256, 4 layers)")
  parser.add_argument("--seed", type=int, default=0, help="params seed (default: 0)")
  args = parser.parse_args(argv)
  if args.vocab != "full" and not (args.vocab.isdigit() and int(args.vocab) >= 512):
    parser.error(f"--vocab must be 'full' or a number of rows >= 512 (the synthetic corpus' words must fit); "
                 f"got {args.vocab!r}")
  vocab = sampling.FULL_VOCAB if args.vocab == "full" else int(args.vocab)
  out = write(args.out, vocab, small=args.small, seed=args.seed)
  print(f"random checkpoint ({vocab:,}-row vocabulary) written to {out}")
  return out


if __name__ == "__main__":
  main()
