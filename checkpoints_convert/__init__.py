"""Checkpoint conversion between PyTorch/Hugging Face safetensors and Orbax, streaming both ways.

`convert` reads every layout of spec §8 (Hub Qwen2.5-VL, in-memory transformers >= 4.52, DiffusionVL
training output, released DiffusionVL); `export` writes the Hub Qwen2.5-VL layout back.
"""

from checkpoints_convert.errors import (ConversionError, CorruptCheckpointError, DestinationExistsError,
                                        NotACheckpointError, OutputIsInputError, UnknownLayoutError,
                                        WeightsMismatchError)
from checkpoints_convert.from_lm import convert_from_lm
from checkpoints_convert.mm_projector import export_mm_projector
from checkpoints_convert.to_hf import export
from checkpoints_convert.to_orbax import convert
from dvl_jax.checkpoints.loading import restore_params

__all__ = [
    "ConversionError", "CorruptCheckpointError", "DestinationExistsError", "NotACheckpointError",
    "OutputIsInputError", "UnknownLayoutError", "WeightsMismatchError", "convert", "convert_from_lm", "export",
    "export_mm_projector", "restore_params",
]
