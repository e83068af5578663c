"""The run config and the dataclasses it fills keep one set of defaults: the `data` / `optimizer` sections
hold every field at the dataclass default, every field round-trips from a `--config.KEY=VALUE` override
into the dataclass, a key that does not exist fails with one line naming the fix, and the stage files
set the spec's recipes (§7)."""

import dataclasses
import os

import pytest

from dvl_jax import cli
from dvl_jax.data.pipeline import DataConfig
from dvl_jax.training.optimizer import OptimizerConfig
from dvl_jax.training.run_config import apply_override, check_keys, default_config, from_section, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig}
FROM_THE_RUN = {"data": {"seed"}, "optimizer": set()}  # fields the loop fills from the run's own settings
NOT_FIELDS = {"data": {"json", "image_folder", "min_pixels", "max_pixels"}, "optimizer": set()}  # the loop reads them


def _field_names(cls) -> set[str]:
  return {field.name for field in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", SECTIONS)
def test_a_section_holds_every_field_at_the_dataclass_default(name):
  cls, section = SECTIONS[name], default_config()[name]
  assert set(section) == _field_names(cls) - FROM_THE_RUN[name] | NOT_FIELDS[name]
  for field in dataclasses.fields(cls):
    if field.name not in FROM_THE_RUN[name]:
      assert section[field.name] == field.default, field.name
  assert from_section(cls, section) == cls()


def _other(value, kind):
  """A valid value of `kind` unlike the default `value`."""
  if kind is bool:
    return not value
  if kind is tuple:
    return (64, 128)
  if kind is float:
    return value / 2 if value else 0.5
  return 3 if value is None else value + 1


@pytest.mark.parametrize("name", SECTIONS)
def test_every_field_round_trips_from_an_override_into_the_dataclass(name):
  cls, c = SECTIONS[name], default_config()
  expected = {}
  for key in sorted(_field_names(cls) - FROM_THE_RUN[name]):
    expected[key] = _other(c[name][key], c[name].get_type(key))
    text = ",".join(map(str, expected[key])) if isinstance(expected[key], tuple) else str(expected[key])
    apply_override(c, f"{name}.{key}={text}")
  built = from_section(cls, c[name], **{key: 7 for key in FROM_THE_RUN[name]})
  assert {key: getattr(built, key) for key in expected} == expected
  assert all(getattr(built, key) == 7 for key in FROM_THE_RUN[name])
  assert all(getattr(built, field.name) != field.default for field in dataclasses.fields(cls))


def test_none_sets_only_fields_that_may_be_none_and_they_take_values_again():
  c = default_config()
  for item in ("optimizer.vision_learning_rate=none", "data.micro_batches=4", "data.micro_batches=None"):
    apply_override(c, item)
  assert c.optimizer.vision_learning_rate is None and c.data.micro_batches is None
  apply_override(c, "optimizer.vision_learning_rate=3e-6")
  assert c.optimizer.vision_learning_rate == 3e-6
  with pytest.raises(ValueError, match=r"^config key 'data.batch_size' needs a int, got 'none'$"):
    apply_override(c, "data.batch_size=none")
  with pytest.raises(ValueError, match=r"^config key 'data.buckets' needs a tuple of comma-separated ints"):
    apply_override(c, "data.buckets=short")


@pytest.mark.parametrize("item, message", [
    ("data.batch_szie=4", "unknown config key 'data.batch_szie' (did you mean 'data.batch_size'?)"),
    ("dat.json=x.json", "unknown config key 'dat.json' (did you mean 'data.json'?)"),
    ("optimizer.lr=1e-5", "unknown config key 'optimizer.lr' (known keys of optimizer: b1, b2, clip_norm, eps, "
                          "learning_rate, projector_learning_rate, vision_learning_rate, warmup_ratio, weight_decay)"),
])
def test_an_unknown_override_names_the_fix(item, message):
  with pytest.raises(ValueError) as error:
    apply_override(default_config(), item)
  assert str(error.value) == message


def test_a_key_a_config_file_adds_stops_dvl_train_with_one_line(tmp_path, capsys):
  c = default_config()
  c.data.batchsize = 4  # a ConfigDict takes new keys silently; nothing would read this one
  with pytest.raises(ValueError, match=r"^unknown config key 'data.batchsize' \(did you mean 'data.batch_size'\?\)$"):
    check_keys(c)
  path = tmp_path / "typo.py"
  path.write_text("from dvl_jax.training.run_config import default_config\n\n\ndef get_config():\n"
                  "  c = default_config()\n  c.checkpoint_evry = 5\n  return c\n")
  stage2 = os.path.join(REPO, "configs", "stage2.py")
  for argv in (["--config", str(path)], ["--config", stage2, "--config.data.foo=1"]):
    assert cli.main(["train", *argv, "--workdir", str(tmp_path / "run")]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-2] == "dvl train: error: unknown config key 'checkpoint_evry' (did you mean 'checkpoint_every'?)"
  assert lines[-1].startswith("dvl train: error: unknown config key 'data.foo' (known keys of data: batch_size, ")
  assert not os.path.exists(tmp_path / "run")


def test_the_stage_files_set_the_spec_recipes():
  stage2, stage1 = (load_config(os.path.join(REPO, "configs", f"{name}.py")) for name in ("stage2", "stage1"))
  for c in (stage1, stage2):
    check_keys(c)
    assert (c.epochs, c.compute_dtype, c.remat_policy, c.checkpoint_every) == (1, "bfloat16", "full", 800)
  assert from_section(OptimizerConfig, stage2.optimizer) == OptimizerConfig(
      learning_rate=1e-5, vision_learning_rate=2e-6, projector_learning_rate=None, warmup_ratio=0.03,
      weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  assert from_section(OptimizerConfig, stage1.optimizer) == dataclasses.replace(
      from_section(OptimizerConfig, stage2.optimizer), learning_rate=1e-3, vision_learning_rate=None)
  data2, data1 = from_section(DataConfig, stage2.data), from_section(DataConfig, stage1.data)
  assert (data2.batch_size, data2.micro_batches, data2.max_length, data2.block_aligned_eos) == (256, 8, 8192, True)
  assert (data1.batch_size, data1.micro_batches, data1.max_length, data1.block_aligned_eos) == (128, 1, 8192, False)
  assert data1.square_pad is None and data2.square_pad is None and data2.group_by_modality  # the family's own
  assert (stage1.stage, stage2.stage) == ("stage1", "stage2")
