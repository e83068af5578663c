"""`dvl serve` under bad input and faults: a few hundred malformed or oversized requests mixed with good ones
(each bad one a one-line 4xx, each good one answered exactly, none hangs, memory flat), a full queue (429), a
deadline (504), a client that disconnects (its request cancelled, its slot freed) and SIGTERM (in-flight requests
finish, exit 0); an engine that fails (503, /health unhealthy); bad `dvl serve` options."""

import asyncio
import base64
import concurrent.futures
import gc
import io
import json
import os
import random
import signal
import socket
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
from PIL import Image

import dvl_jax as dvl
from dvl_jax.cli.commands import main
from dvl_jax.cli.serve import warm_up_images
from dvl_jax.core import mappings
from dvl_jax.serving.http.metrics import Metrics
from dvl_jax.serving.http.schema import ApiError
from dvl_jax.serving.engine import Engine
from dvl_jax.serving.http.worker import Worker
from dvl_jax.serving.request import Request
from tests.serving import http_server
from tests.serving.http_server import GEN, KEY, MODEL, PIXELS

served = http_server.served  # the session's server (a fixture)
QUESTION = "What is this ?"
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def chat(content=QUESTION, **fields):
  return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


def with_image(url, text=QUESTION, **fields):
  return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}], **fields)


def encoded(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def bad_requests(served):
  """(path, body, status, a fragment of the one-line reason): every way in which this API can be misused."""
  big_png = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), np.uint8)).save(big_png, "PNG")
  flat = io.BytesIO()
  Image.new("RGB", (300, 300)).save(flat, "PNG")  # a few hundred bytes, 90,000 pixels
  return [
      (CHAT, b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
      (CHAT, b"\xff\xfe{}", 400, "not valid JSON"),
      (CHAT, b"[1, 2]", 400, "JSON object"),
      (CHAT, chat(model="gpt-4o"), 404, "not served here"),
      (CHAT, {"messages": chat()["messages"]}, 400, "model: Field required"),
      (CHAT, chat(max_tokens="8"), 400, "max_tokens: Input should be a valid integer"),
      (CHAT, chat(max_tokens=0), 400, "max_tokens must be in"),
      (CHAT, chat(max_tokens=GEN + 1), 400, "max_tokens must be in"),
      (CHAT, chat(temperature="hot"), 400, "temperature"),
      (CHAT, chat(temperature=-1.0), 400, "temperature"),
      (CHAT, chat(top_p=1.5), 400, "top_p"),
      (CHAT, chat(top_k=-2), 400, "top_k"),
      (CHAT, chat(steps=0), 400, "steps"),
      (CHAT, chat(confidence_threshold=1.5), 400, "confidence_threshold"),
      (CHAT, chat(remasking_strategy="random"), 400, "remasking_strategy"),
      (CHAT, chat(algorithm="beam_search"), 400, "algorithm"),
      (CHAT, chat(seed=2 ** 40), 400, "seed"),
      (CHAT, chat(n=0), 400, "n must be in [1, 16]"),
      (CHAT, chat(n=17), 400, "n must be in [1, 16]"),
      (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported field 'tools'"),
      (CHAT, chat(stop=["\n", ""]), 400, "non-empty strings"),
      (CHAT, chat(stop=list("abcde")), 400, "at most 4"),
      (CHAT, chat(stop=5), 400, "stop"),
      (CHAT, chat(stream="yes"), 400, "stream"),
      (CHAT, chat(stream_options={"include_usage": False}), 400, "only allowed with stream: true"),
      (CHAT, chat(stream=True, stream_options={"include_usage": 1}), 400, "include_usage"),
      (CHAT, {"model": MODEL, "messages": []}, 400, "end with a user message"),
      (CHAT, {"model": MODEL, "messages": [*chat()["messages"], {"role": "assistant", "content": "x"}]}, 400,
       "end with a user message"),
      (CHAT, {"model": MODEL, "messages": [*chat()["messages"], {"role": "system", "content": "x"},
                                           *chat()["messages"]]}, 400, "may only come first"),
      (CHAT, {"model": MODEL, "messages": [{"role": "assistant", "content": [
          {"type": "image_url", "image_url": {"url": served.image}}]}, *chat()["messages"]]}, 400,
       "only user messages may hold images"),
      (CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
      (CHAT, chat([{"type": "video_url", "video_url": {"url": "x"}}]), 400, "does not match any of the expected tags"),
      (CHAT, chat([{"type": "text", "text": 5}]), 400, "valid string"),
      (CHAT, with_image("data:image/png;base64,@@@@"), 400, "not valid base64"),
      (CHAT, with_image("data:image/png,rawbytes"), 400, "data:image/png;base64"),
      (CHAT, with_image(encoded(b"GIF89a but not really")), 400, "not a format PIL can decode"),
      (CHAT, with_image(encoded(big_png.getvalue())), 400, "exceeds the server's limit of 32768 bytes"),
      (CHAT, with_image(encoded(flat.getvalue())), 400, "300x300 pixels exceeds"),
      (CHAT, with_image("https://example.com/cat.png"), 400, "not fetched"),
      (CHAT, with_image("file:///etc/hostname"), 400, "outside --allowed-local-media-path"),
      (CHAT, with_image(f"file://{served.media}/missing.png"), 400, "does not exist"),
      (CHAT, with_image("ftp://example.com/cat.png"), 400, "unsupported image URL"),
      (CHAT, chat([{"type": "image_url", "image_url": {"url": served.image}}] * 3), 400, "3 images exceed"),
      (CHAT, chat("<image> and <image>"), 400, "markers"),
      (CHAT, chat("word " * 150), 400, "exceeds the engine's max_prompt=128"),
      (TEXT, {"model": MODEL, "prompt": list(range(3, 140))}, 400, "max_prompt"),
      (TEXT, {"model": MODEL, "prompt": [300]}, 400, "not a text token"),
      (TEXT, {"model": MODEL, "prompt": [[5, 6], [300]]}, 400, "not a text token"),
      (TEXT, {"model": MODEL, "prompt": []}, 400, "prompt must be"),
      (TEXT, {"model": MODEL, "prompt": ["a", [5]]}, 400, "prompt must be"),
      (TEXT, {"model": MODEL, "prompt": ["a b", "c"] * 3, "n": 16}, 400, "asks for 96 answers"),
      (TEXT, {"model": MODEL, "prompt": [250]}, 400, "no image tokens"),
      (TEXT, {"model": MODEL, "prompt": [[1, True]]}, 400, "prompt must be"),
      (TEXT, {"model": MODEL, "prompt": [True]}, 400, "prompt must be"),
      (TEXT, {"model": MODEL, "prompt": "hi", "echo": True}, 400, "unsupported field 'echo'"),
      (TEXT, b'{"model": "tiny", "prompt": "' + b"a" * 200_000 + b'"}', 413, "--max-body-bytes"),
      ("/v1/embeddings", {"model": MODEL, "input": "x"}, 404, "Not Found"),
  ]


def good_requests(served):
  """(path, body, the answer's token ids as `dvl.generate` gives them alone)."""
  processor, image = served.processor, Image.open(io.BytesIO(base64.b64decode(served.image.partition(",")[2])))
  image = image.convert("RGB")
  config = dvl.SamplingConfig(gen_length=16)

  def alone(inputs):
    out = dvl.generate(served.model, inputs, config)
    return out.tokens[0, :out.lengths[0]].tolist()

  return [
      (CHAT, chat(return_token_ids=True, max_tokens=16, stream_options={}),  # empty: accepted unstreamed, as vLLM
       alone(processor([dvl.generation_prompt(QUESTION, 0)]))),
      (CHAT, with_image(served.image, return_token_ids=True, max_tokens=16),
       alone(processor([dvl.generation_prompt(QUESTION, 1)], [[image]]))),
      (TEXT, {"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 16, "return_token_ids": True}, alone([[7, 8, 9]])),
  ]


def send(client, path, body):
  content = body if isinstance(body, bytes) else json.dumps(body).encode()
  return client.post(path, content=content, headers={"Content-Type": "application/json"})


def test_bad_requests_mixed_with_good_ones(served):
  bad, good = bad_requests(served), good_requests(served)
  rng = random.Random(0)

  def one_round(copies):
    work = [("bad", case) for case in bad * copies] + [("good", case) for case in good * 4]
    rng.shuffle(work)
    with served.client(timeout=180) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
      replies = list(pool.map(lambda w: send(client, w[1][0], w[1][1]), work))  # a hang fails by the timeout
    for (kind, case), reply in zip(work, replies):
      if kind == "good":
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == case[2]
      else:
        message = reply.json()["error"]["message"]
        assert (reply.status_code, case[3] in message, "\n" in message) == (case[2], True, False), (case, message)
    return len(work)

  sent = one_round(2)  # warm: every code path has run once
  gc.collect()
  tracemalloc.start()
  try:
    sent += one_round(2)
    gc.collect()
    baseline = tracemalloc.get_traced_memory()[0]
    sent += one_round(2)
    gc.collect()
    growth = tracemalloc.get_traced_memory()[0] - baseline
  finally:
    tracemalloc.stop()
  assert sent >= 300
  assert served.metric('dvl_http_responses_total{code="413",route="/v1/completions"}') >= 6
  assert growth < 2 ** 20, f"{growth} bytes more after a round of {sent // 3} requests"
  assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
  served.wait_idle()


def test_a_full_queue_answers_429(served):
  worker = served.app.state.worker
  worker.max_queue = 0
  try:
    with served.client() as client:
      reply = send(client, TEXT, {"model": MODEL, "prompt": [5, 6], "max_tokens": 4})
  finally:
    worker.max_queue = 64
  assert reply.status_code == 429 and "--max-queue 0" in reply.json()["error"]["message"]
  with served.client() as client:
    assert send(client, TEXT, {"model": MODEL, "prompt": [5, 6], "max_tokens": 4}).status_code == 200


def test_near_the_mapping_limit_a_request_needing_a_new_program_gets_503_and_the_server_goes_on(served,
                                                                                             monkeypatch):
  engine = served.app.state.worker.engine
  body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 4}
  with served.client() as client:
    assert send(client, TEXT, body).status_code == 200  # its shape's insert is compiled
    monkeypatch.setattr(mappings, "usage", lambda *_: (95, 100))
    assert send(client, TEXT, body).status_code == 200  # the same shape: no new program
    monkeypatch.setattr(engine, "_inserted", set())  # as if no shape had been served yet
    reply = send(client, TEXT, body)
    assert reply.status_code == 503
    assert reply.json()["error"]["message"].startswith("a 2-token block_diffusion prompt needs a program this "
                                                       "server has not compiled, and the process holds 95 of the 100")
    monkeypatch.undo()
    assert send(client, TEXT, body).json()["choices"][0]["finish_reason"] == "length"


def test_a_request_past_its_deadline_is_cancelled_with_504(served):
  settings, cancelled = served.app.state.settings, served.metric('dvl_requests_total{outcome="timeout"}')
  settings.request_timeout = 1e-9
  try:
    with served.client() as client:
      replies = [send(client, TEXT, {"model": MODEL, "prompt": [5, 6], "max_tokens": GEN, "stream": stream})
                 for stream in (False, True)]
  finally:
    settings.request_timeout = 300.0
  for reply in replies:
    assert reply.status_code == 504 and "--request-timeout" in reply.json()["error"]["message"]
  served.wait_idle()
  assert served.metric('dvl_requests_total{outcome="timeout"}') == cancelled + 2


@pytest.mark.parametrize("choices", [1, 2])
def test_a_client_that_disconnects_cancels_its_request_and_frees_its_slot(served, monkeypatch, choices):
  served.wait_idle()
  engine = served.app.state.worker.engine
  step = engine.step
  monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # a slower model: 64 steps take > 1 s
  count = lambda outcome: served.metric(f'dvl_requests_total{{outcome="{outcome}"}}')  # noqa: E731
  before = count("cancelled"), count("finished")
  long = {"model": MODEL, "prompt": [5, 6], "max_tokens": GEN, "steps": 8, "n": choices}  # 64 forwards, 2 a step
  with served.client() as client, client.stream("POST", TEXT, json={**long, "stream": True}) as reply:
    lines = reply.iter_lines()  # kept: a dropped iterator would close the connection at once
    assert next(lines).startswith("data: {")  # the first block: the request holds a slot
    assert served.metric("dvl_slots_busy") == choices
  host, port = served.url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port))) as sock:  # a non-streamed request, gone once sent
    body = json.dumps(long).encode()
    sock.sendall(f"POST {TEXT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
  served.wait_idle()
  assert (count("cancelled"), count("finished")) == (before[0] + 2 * choices, before[1])


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(served, monkeypatch):
  """`dvl serve` in this process's main thread (where signals land), with the session server's engine settings
  (its compiles are reused) and a slower step, so the request is still decoding when SIGTERM arrives."""
  step, configs = Engine.step, []
  monkeypatch.setattr(Engine, "step", lambda self: (configs.append(self.config), time.sleep(0.03), step(self))[2])
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  url, lines, refused = f"http://127.0.0.1:{port}", [], []

  def client():
    end = time.monotonic() + 120
    while not _up(url):
      assert time.monotonic() < end, "the server did not start"
      time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", TEXT, json={
        "model": "ckpt", "prompt": [5, 6], "max_tokens": GEN, "steps": 8, "stream": True,
        "stream_options": {"include_usage": True}}) as reply:
      for line in reply.iter_lines():
        if not lines:
          os.kill(os.getpid(), signal.SIGTERM)
          time.sleep(0.4)  # uvicorn looks at its exit flag every 0.1 s
          refused.append(not _up(url))  # no new connections while this one finishes
        lines.append(line)

  thread = threading.Thread(target=client)
  thread.start()
  code = main(["serve", "--checkpoint", served.checkpoint, "--port", str(port), "--slots", str(http_server.SLOTS),
               "--max-prompt", "128", "--gen-length", str(GEN), "--chunk", "2", "--views", "4", "--grace-period", "60",
               "--min-pixels", str(PIXELS), "--max-pixels", str(PIXELS), "--log-level", "warning"])
  thread.join(60)
  assert code == 0 and refused == [True]
  assert configs[0].positions is None  # unresolved: AR requests take the model's (M-RoPE), as dvl.generate does
  events = [line for line in lines if line]
  assert events[-1] == "data: [DONE]"  # the in-flight request finished
  assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == GEN


def _up(url: str) -> bool:
  try:
    return httpx.get(f"{url}/health", timeout=5).status_code == 200
  except httpx.TransportError:
    return False


def test_an_engine_that_fails_fails_its_requests_with_503_and_turns_unhealthy():
  """No model: an engine whose step raises, as a lost device would."""

  class Broken:
    busy, waiting = 0, 0

    def submit(self, request):
      self.waiting = 1
      return 7

    def step(self):
      raise RuntimeError("device lost")

  worker = Worker(Broken(), Metrics(slots=1), max_queue=4)
  worker.start()

  async def ask():
    ticket = worker.submit(Request([5, 6]))
    return [await asyncio.wait_for(ticket.events.get(), 30) for _ in range(2)]

  accepted, failed = asyncio.run(ask())
  worker.stop()
  assert accepted.kind == "accepted" and failed.kind == "failed"
  assert failed.value.status == 503 and "RuntimeError: device lost" in failed.value.message
  assert not worker.healthy
  with pytest.raises(ApiError, match="device lost"):
    worker.submit(Request([5]))  # refused before it reaches the dead thread


def test_dvl_serve_refuses_bad_options_in_one_line_before_loading(served, capsys, monkeypatch):
  monkeypatch.setattr(dvl, "load", lambda *_, **__: pytest.fail("the model loaded before the options were checked"))
  busy = socket.create_server(("127.0.0.1", 0))  # another server's port
  port = busy.getsockname()[1]
  for argv, fragment in [(["--checkpoint", "/no/such/ckpt"], "checkpoint /no/such/ckpt does not exist"),
                         (["--checkpoint", served.checkpoint, "--port", "70000"], "--port must be in [0, 65535]"),
                         (["--checkpoint", served.checkpoint, "--port", str(port)],
                          f"cannot bind 127.0.0.1:{port} (Address already in use); pick a free --port"),
                         (["--checkpoint", served.checkpoint, "--host", "no-such-host.invalid"],
                          "--host no-such-host.invalid:"),
                         (["--checkpoint", served.checkpoint, "--slots", "0"], "--slots must be >= 1"),
                         (["--checkpoint", served.checkpoint, "--request-timeout", "0"], "--request-timeout > 0"),
                         (["--checkpoint", served.checkpoint, "--allowed-local-media-path", "/no/such/dir"],
                          "is not a folder"),
                         (["--checkpoint", served.checkpoint, "--warm-up-images", "448x448,448"],
                          "--warm-up-images takes sizes like 448x448,1280x720; got '448'"),
                         (["--checkpoint", served.checkpoint, "--max-prompt", "4000", "--gen-length", "128"],
                          "lower --max-prompt to 3968 or --gen-length")]:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
  busy.close()


def test_warm_up_images_are_blank_images_of_those_sizes_through_the_processor(served):
  """What `dvl serve --warm-up-images` hands the engine: the prompt, patches and grid of any image of that size."""
  requests = warm_up_images("56x56, 84x56", served.processor)
  for request, (width, height) in zip(requests, [(56, 56), (84, 56)], strict=True):
    want = served.processor([dvl.generation_prompt("", 1)], [[Image.new("RGB", (width, height), "white")]])
    assert request.prompt == [int(t) for t in want["input_ids"][0]]
    np.testing.assert_array_equal(request.image_grid_thw, want["image_grid_thw"])
    assert np.shape(request.pixel_values) == np.shape(want["pixel_values"])
