"""One `dvl serve` app over a tiny random checkpoint, served by uvicorn on 127.0.0.1 (an ephemeral port) in a
thread for the whole session: the HTTP tests share its engine, hence its compiles."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn

import dvl_jax as dvl
from dvl_jax.evaluation.client import png_data_url as png_url_of
from dvl_jax.serving.http import MediaLimits, Settings, create_app
from dvl_jax.testing.tiny import save_tiny_checkpoint
from tests.data.helpers import make_processor, noise_image

PIXELS = 56 * 56  # 4 image tokens per image
MODEL = "tiny"
KEY = "secret-key"
GEN = 64  # the engine's longest answer; the tests ask for less unless they need a long one
SLOTS = 4


@dataclasses.dataclass
class Served:
  url: str
  checkpoint: str
  app: Any
  model: Any
  processor: Any
  media: str  # the folder file:// images may come from
  image: str  # a data: URL of a 56x56 PNG

  # Generous: a CI machine shared with other jobs ran the first (compiling) requests for over a minute; a hang
  # still fails, by the timeout.
  def client(self, timeout: float = 300) -> httpx.Client:
    return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)

  def metric(self, name: str, default: float | None = None) -> float:
    """A sample's value from /metrics, e.g. 'dvl_requests_total{outcome="cancelled"}' (`default` if absent: a
    labelled counter appears with its first count)."""
    for line in httpx.get(f"{self.url}/metrics").text.splitlines():
      if line.startswith(name + " "):
        return float(line.split()[-1])
    if default is None:
      raise KeyError(name)
    return default

  def wait_idle(self, timeout: float = 20.0) -> None:
    """Until no request holds a slot or waits for one (bounded)."""
    end = time.monotonic() + timeout
    while self.metric("dvl_slots_busy") or self.metric("dvl_queue_depth"):
      assert time.monotonic() < end, "the engine did not become idle"
      time.sleep(0.02)


def png_data_url(width: int, height: int, seed: int = 0) -> str:
  return png_url_of(noise_image(width, height, seed))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  made = make_processor()  # EOS 2, which this random model never picks: every answer runs to max_tokens
  ckpt = save_tiny_checkpoint(str(root / "ckpt"), made.config, tokenizer=made.tokenizer)
  processor = dvl.Processor.from_pretrained(ckpt, min_pixels=PIXELS, max_pixels=PIXELS)
  model = dvl.load(ckpt)
  engine = dvl.Engine(model, dvl.SamplingConfig(gen_length=GEN), slots=SLOTS, max_prompt=128, chunk=2, views=4)
  media = root / "media"
  media.mkdir()
  noise_image(56, 56, seed=1).save(media / "local.png")
  settings = Settings(MODEL, api_key=KEY, max_queue=64, request_timeout=300.0, max_body_bytes=2 ** 17, max_images=2,
                      media=MediaLimits(max_bytes=2 ** 15, max_pixels=256 * 256, local_root=str(media)))
  app = create_app(engine, processor, settings, slots=SLOTS)
  sock = socket.create_server(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  end = time.monotonic() + 60
  while not server.started:
    assert time.monotonic() < end and thread.is_alive(), "the server did not start"
    time.sleep(0.02)
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  yield Served(url, ckpt, app, model, processor, str(media), png_data_url(56, 56))
  server.should_exit = True
  thread.join(30)
