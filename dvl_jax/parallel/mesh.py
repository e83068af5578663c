"""Device meshes with the fixed axes `('data', 'fsdp', 'tensor')` and explicit axis types."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None,
              axis_types: AxisType = AxisType.Auto) -> Mesh:
  """A `(data, fsdp, tensor)` mesh; `shape=None` puts every device on `fsdp`.

  Axis types are explicit: jax >= 0.10 makes `Explicit` the default of `jax.make_mesh`, which changes
  how shardings propagate; we use `Auto` (GSPMD) unless asked otherwise.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (1, len(devices), 1) if shape is None else tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape} must have 3 entries for axes {AXES}")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices but {len(devices)} are given")
  return jax.make_mesh(shape, AXES, axis_types=(axis_types,) * 3, devices=devices)
