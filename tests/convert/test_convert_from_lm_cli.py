"""`dvl convert --lm DIR --vision DIR [--stage 2 --projector BIN] DST`: the command line writes what
`convert_from_lm` writes, and a wrong mixture of the two forms of `dvl convert` is one line with exit code 2."""

import contextlib
import io

import numpy as np
import pytest
from flax import nnx

import dvl_jax as dvl
from checkpoints_convert import convert_from_lm, export_mm_projector
from dvl_jax import cli
from dvl_jax.testing.tiny import save_hf_checkpoint, tiny_siglip_config, tiny_text_config
from tests.models.test_diffusionvl_qwen_stage1 import _siglip

V = tiny_siglip_config().vision
IDS = dict(mask_token_id=255, image_token_id=250)  # the tiny vocabulary's (a Qwen2 config.json names neither)
ID_ARGS = ["--mask-token-id", "255", "--image-token-id", "250"]


def dvl_main(*argv: str) -> tuple[int, str]:
  """(exit code, stderr) of `dvl ARGV`."""
  err = io.StringIO()
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(argv))
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("from_lm_cli")
  save_hf_checkpoint(str(root / "lm"), tiny_text_config(), seed=1)
  _siglip(root / "siglip", V.depth + 1)
  return root


def params(ckpt_dir):
  model = dvl.load(str(ckpt_dir))
  return model.config, {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_checkpoint(got_dir, want_dir):
  """Same config and params; returns them."""
  (got_cfg, got), (want_cfg, want) = params(got_dir), params(want_dir)
  assert got_cfg == want_cfg and sorted(got) == sorted(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  return got_cfg, got


def test_both_stages_write_what_convert_from_lm_writes(sources, tmp_path):
  lm, siglip = str(sources / "lm"), str(sources / "siglip")
  code, err = dvl_main("convert", "--lm", lm, "--vision", siglip, "--seed", "4", *ID_ARGS,
                       "--no-progress", str(tmp_path / "s1"))
  assert code == 0, err
  want = convert_from_lm(lm, siglip, tmp_path / "want1", seed=4, progress=False, **IDS)
  assert assert_same_checkpoint(tmp_path / "s1", want)[0].vision.image_aspect_ratio == "square"

  bin_path = str(export_mm_projector(tmp_path / "s1", tmp_path / "mm_projector.bin"))
  code, err = dvl_main("convert", "--lm", lm, "--vision", siglip, "--stage", "2", "--projector", bin_path,
                       *ID_ARGS, "--dtype", "bfloat16", "--no-progress", str(tmp_path / "s2"))
  assert code == 0, err
  want = convert_from_lm(lm, siglip, tmp_path / "want2", projector=bin_path, stage=2, dtype="bfloat16",
                         progress=False, **IDS)
  cfg, got = assert_same_checkpoint(tmp_path / "s2", want)
  assert cfg.vision.image_aspect_ratio == "anyres_max_4"
  assert got[("projector", "linear_1", "kernel")].dtype == np.dtype("bfloat16")


@pytest.mark.parametrize("argv,message", [
    (["--lm", "LM", "dst"], "--lm needs --vision"),
    (["--vision", "V", "dst"], "--vision needs --lm"),
    (["--lm", "LM", "--vision", "V", "src", "dst"], "a positional source (src) and --lm/--vision both given"),
    (["--lm", "LM", "--vision", "V", "--projector", "p.bin", "dst"], "add --stage 2"),
    (["--stage", "2", "--projector", "p.bin", "src", "dst"], "--projector, --stage apply only with --lm/--vision"),
    (["dst"], "give a source checkpoint directory and dst, or --lm DIR --vision DIR"),
])
def test_wrong_combinations_are_one_line(argv, message, tmp_path):
  code, err = dvl_main("convert", *argv[:-1], str(tmp_path / argv[-1]))
  assert code == 2 and err.count("\n") == 1 and message in err, err
  assert not (tmp_path / argv[-1]).exists()


def test_a_bad_id_override_is_named_as_such_and_leaves_no_output(sources, tmp_path):
  code, err = dvl_main("convert", "--lm", str(sources / "lm"), "--vision", str(sources / "siglip"), "--mask-token-id",
                       "99999", "--image-token-id", "250", "--no-progress", str(tmp_path / "dst"))
  assert code == 2 and err.count("\n") == 1, err
  assert "no DiffusionVL-Qwen config from these (mask_token_id=99999 is outside the 256-row vocabulary" in err
  assert not (tmp_path / "dst").exists()
