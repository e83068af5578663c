"""`dvl serve`'s API: greedy (and seeded) answers through both endpoints are `dvl.generate`'s on the same prompt
alone, whatever shares the slots; the official `openai` client works unchanged; SSE sends one chunk per block
and `[DONE]`; the API key guards /v1; /metrics counts; an answer stops at EOS."""

import asyncio
import base64
import concurrent.futures
import io
import json
import math
import urllib.request

import jax
import numpy as np
import openai
from PIL import Image

import dvl_jax as dvl
from benchmarks import serve
from dvl_jax.core import mappings
from dvl_jax.serving.http.responses import Answer, usage
from tests.serving import http_server
from tests.serving.http_server import GEN, KEY, MODEL, PIXELS

served = http_server.served  # the session's server (a fixture)

QUESTION = "What is this ?"


def image_of(url):
  return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")


def alone(served, prompt, images=(), *, chat=True, seed=0, **config):
  """`dvl.generate` on this one prompt, built as `dvl generate` builds it (chat) or as raw text / ids."""
  if isinstance(prompt, list):
    inputs = [prompt]
  else:
    inputs = served.processor([dvl.generation_prompt(prompt, len(images)) if chat else prompt], [list(images)])
  return dvl.generate(served.model, inputs, dvl.SamplingConfig(**config), rng=jax.random.key(seed),
                      tokenizer=served.processor.tokenizer)


def chat_body(content, **fields):
  return {"model": MODEL, "messages": [{"role": "user", "content": content}], "return_token_ids": True, **fields}


def test_answers_through_both_endpoints_equal_dvl_generate_alone(served):
  image = {"type": "image_url", "image_url": {"url": served.image}}
  local = {"type": "image_url", "image_url": {"url": f"file://{served.media}/local.png"}}
  check_concurrently(served, [  # (endpoint, body, the same request in process)
      ("chat", chat_body([image, {"type": "text", "text": QUESTION}], max_tokens=16),
       lambda: alone(served, QUESTION, [image_of(served.image)], gen_length=16)),
      ("chat", chat_body([{"type": "text", "text": "What is"}, {"type": "text", "text": "this ?"}], max_tokens=16),
       lambda: alone(served, "What is\nthis ?", gen_length=16)),
      ("chat", chat_body([{"type": "text", "text": QUESTION}, local], max_tokens=16, steps=4),
       lambda: alone(served, QUESTION, [Image.open(f"{served.media}/local.png").convert("RGB")], gen_length=16,
                     steps=4)),
      ("text", {"model": MODEL, "prompt": QUESTION, "max_tokens": 16, "return_token_ids": True},
       lambda: alone(served, QUESTION, chat=False, gen_length=16)),
      ("text", {"model": MODEL, "prompt": [5, 9, 11, 7], "max_tokens": 16, "return_token_ids": True,
                "remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.6},
       lambda: alone(served, [5, 9, 11, 7], gen_length=16, remasking_strategy="low_confidence_dynamic",
                     confidence_threshold=0.6)),
  ])


def test_a_conversation_with_a_system_message_is_the_chat_format_of_its_turns(served):
  chatml = ("<|im_start|>system\nBe brief .<|im_end|>\n<|im_start|>user\n<image>\nWhat is this ?<|im_end|>\n"
            "<|im_start|>assistant\na cat<|im_end|>\n<|im_start|>user\nWhat is it ?<|im_end|>\n"
            "<|im_start|>assistant\n")
  messages = [{"role": "developer", "content": "Be brief ."},
              {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": served.image}}]},
              {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
              {"role": "user", "content": "What is it ?"}]
  check_concurrently(served, [
      ("chat", {"model": MODEL, "messages": messages, "max_tokens": 16, "return_token_ids": True},
       lambda: alone(served, chatml, [image_of(served.image)], chat=False, gen_length=16)),
      ("chat", {"model": MODEL, "messages": [{**messages[0], "role": "system"}, messages[-1]], "max_tokens": 16,
                "return_token_ids": True},
       lambda: alone(served, chatml.replace(chatml[chatml.index("<|im_start|>user"):chatml.rindex("<|im_start|>user")],
                                            ""), chat=False, gen_length=16)),
  ])


def test_several_prompts_and_choices_each_equal_dvl_generate_alone(served):
  """`prompt` as a list and `n`: a choice per prompt and seed (choice j samples with seed + j), in that order."""
  prompts, seeds = [[6, 8, 10], [5, 9, 11, 7]], (3, 4)
  body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 16, "temperature": 0.9, "seed": 3,
          "return_token_ids": True}
  with served.client() as client:
    reply = client.post("/v1/completions", json=body).json()
  wants = [alone(served, p, chat=False, seed=seed, gen_length=16, temperature=0.9) for p in prompts for seed in seeds]
  assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
  assert [c["token_ids"] for c in reply["choices"]] == [w.tokens[0].tolist() for w in wants]
  assert reply["choices"][0]["token_ids"] != reply["choices"][1]["token_ids"]  # another seed, another sample
  assert reply["usage"]["prompt_tokens"] == 3 + 4 and reply["usage"]["completion_tokens"] == 4 * 16
  with served.client() as client:  # a list of text prompts
    texts = client.post("/v1/completions", json={"model": MODEL, "prompt": [QUESTION, QUESTION], "max_tokens": 16})
  text = alone(served, QUESTION, chat=False, gen_length=16).text[0]
  assert [c["text"] for c in texts.json()["choices"]] == [text] * 2


def test_a_streamed_chat_with_several_choices_interleaves_them_and_ends_with_the_usage(served):
  want = alone(served, QUESTION, gen_length=16)
  with served.client() as client, client.stream("POST", "/v1/chat/completions", json=chat_body(
      QUESTION, max_tokens=16, n=2, stream=True, stream_options={"include_usage": True})) as streamed:
    lines = [line for line in streamed.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
  for index in (0, 1):
    deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == index]
    assert deltas[0]["role"] == "assistant" and "".join(d.get("content", "") for d in deltas) == want.text[0]
    assert [c["token_ids"] for e in events for c in e["choices"] if c["index"] == index and "token_ids" in c] != []
    ends = [c["finish_reason"] for e in events for c in e["choices"] if c["index"] == index and c["finish_reason"]]
    assert ends == ["length"]
  assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2 * 16
  assert all(e["usage"] is None for e in events[:-1])  # as OpenAI's chunks say it


def test_per_request_algorithm_and_sampling_equal_dvl_generate_alone(served):
  check_concurrently(served, [
      ("chat", chat_body(QUESTION, max_tokens=16, algorithm="autoregressive"),
       lambda: alone(served, QUESTION, gen_length=16, algorithm="autoregressive")),
      ("text", {"model": MODEL, "prompt": [5, 9, 11, 7], "max_tokens": 16, "return_token_ids": True,
                "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 3},
       lambda: alone(served, [5, 9, 11, 7], seed=3, gen_length=16, temperature=0.9, top_k=20, top_p=0.95)),
  ])


def check_concurrently(served, cases):
  """Sends every case at once (they share the slots), then compares each answer with its in-process twin."""
  path = {"chat": "/v1/chat/completions", "text": "/v1/completions"}
  with served.client() as client, concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    replies = list(pool.map(lambda case: client.post(path[case[0]], json=case[1]), cases))
  for (kind, _, reference), reply in zip(cases, replies):
    assert reply.status_code == 200, reply.text
    want, choice, usage = reference(), reply.json()["choices"][0], reply.json()["usage"]
    assert choice["token_ids"] == want.tokens[0, :want.lengths[0]].tolist()
    assert (choice["message"]["content"] if kind == "chat" else choice["text"]) == want.text[0]
    assert usage["completion_tokens"] == want.lengths[0]
    blocks = -(-want.tokens.shape[1] // served.model.config.block_size) + 1  # the prompt's partial block too
    assert want.nfe[0] <= usage["nfe"] <= want.nfe[0] + blocks  # sharing the slots, a commit may run alone
    decoded = want.tokens_per_forward[0] * want.nfe[0]
    assert math.isclose(usage["tokens_per_forward"], decoded / usage["nfe"])
    assert choice["finish_reason"] == "length"  # this model never picks EOS


def test_the_openai_client_works_unchanged(served):
  client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY)
  assert [m.id for m in client.models.list()] == [MODEL] and client.models.retrieve(MODEL).id == MODEL
  try:
    client.models.retrieve("gpt-4o")
    raise AssertionError("an unknown model was retrieved")
  except openai.NotFoundError as e:
    assert "not served here" in e.message
  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": served.image}},
                                           {"type": "text", "text": QUESTION}]}]
  want = alone(served, QUESTION, [image_of(served.image)], gen_length=16)
  reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
  assert reply.choices[0].message.content == want.text[0]
  assert reply.usage.completion_tokens == 16 and reply.usage.model_extra["nfe"] == want.nfe[0]
  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"return_token_ids": True}))
  *chunks, counted = chunks  # the usage comes last, alone
  assert counted.choices == [] and counted.usage.completion_tokens == 16 and counted.usage.model_extra["nfe"] > 0
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text[0]
  streamed = [t for c in chunks[:-1] for t in c.choices[0].model_extra["token_ids"]]
  assert streamed == want.tokens[0].tolist()
  prompt = reply.usage.prompt_tokens
  assert len(chunks) - 1 == len({(prompt + i) // 8 for i in range(16)})  # one chunk per block, then the end
  assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
  assert all(c.usage is None for c in chunks)
  text = alone(served, QUESTION, chat=False, gen_length=16).text[0]
  assert client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=16).choices[0].text == text
  pieces = list(client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=16, stream=True))
  assert "".join(c.choices[0].text for c in pieces) == text and all(c.usage is None for c in pieces)  # not asked
  several = client.completions.create(model=MODEL, prompt=[QUESTION, QUESTION], n=2, max_tokens=16,
                                      stop=text.split()[2])
  assert [c.text for c in several.choices] == [text[:text.index(text.split()[2])]] * 4
  assert [c.finish_reason for c in several.choices] == ["stop"] * 4
  try:
    client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=GEN + 1)
    raise AssertionError("max_tokens over the engine's limit was accepted")
  except openai.BadRequestError as e:
    assert "max_tokens" in e.message



def test_sse_sends_one_chunk_per_block_then_done(served):
  prompt = [5, 9, 11, 7, 3]  # 5 tokens: the 16-token answer spans blocks 0, 1 and 2 (positions 5..20)
  with served.client() as client, client.stream("POST", "/v1/completions", json={
      "model": MODEL, "prompt": prompt, "max_tokens": 16, "stream": True, "return_token_ids": True,
      "stream_options": {"include_usage": True}}) as reply:
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in reply.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
  *events, counted = events
  assert [len(e["choices"][0].get("token_ids", [])) for e in events] == [3, 8, 5, 0]
  want = alone(served, prompt, gen_length=16)
  assert sum((e["choices"][0].get("token_ids", []) for e in events), []) == want.tokens[0].tolist()
  assert events[-1]["choices"][0]["finish_reason"] == "length"
  assert counted["choices"] == [] and counted["usage"]["nfe"] == want.nfe[0]


def test_the_serve_benchmark_times_each_block_and_reads_the_usage_it_asks_for(served):
  """`benchmarks/serve.py`'s client: tokens and forwards from the usage chunk, a gap between each two blocks."""
  jobs = [serve.Job(QUESTION, None, 16)]
  (timing,), _ = asyncio.run(serve.through_server(served.url, KEY, MODEL, jobs, "block_diffusion", 1, None, False))
  want = alone(served, QUESTION, gen_length=16)
  prompt = served.processor([dvl.generation_prompt(QUESTION, 0)], [[]])["input_ids"].shape[1]
  assert (timing.tokens, timing.forwards) == (16, want.nfe[0])
  assert len(timing.gaps) == len({(prompt + i) // 8 for i in range(16)}) - 1 and 0 < timing.ttft < timing.latency


def test_the_serve_benchmarks_in_process_rows_decode_what_the_server_does(served):
  """`benchmarks/serve.py --in-process`: the engine and request builder `dvl serve` makes from the server's options,
  stepped in process, give each job the server's tokens, forwards and blocks (an image among them)."""
  png = base64.b64decode(served.image.partition(",")[2])
  jobs = [serve.Job(QUESTION, png, 16), serve.Job("What is", None, 24), serve.Job("What is this one ?", None, 8)]
  through, _ = asyncio.run(serve.through_server(served.url, KEY, MODEL, jobs, "block_diffusion", 2, None, False))
  engine = serve.InProcess(served.checkpoint, f"--slots {http_server.SLOTS} --max-prompt 128 --chunk 2 --views 4 "
                           f"--gen-length {GEN} --min-pixels {PIXELS} --max-pixels {PIXELS} --warm-up none")
  inside, _ = engine.run(jobs, "block_diffusion", 2, None, warm=False)
  assert [(t.tokens, t.forwards, len(t.gaps)) for t in inside] == [(t.tokens, t.forwards, len(t.gaps))
                                                                   for t in through]
  assert all(0 < t.ttft <= t.latency for t in inside)


def test_the_serve_benchmarks_static_rows_sample_each_request_as_it_samples_alone(served):
  """`benchmarks/serve.py --temperature ...`: a sampled request sends its job's seed, and a static batch gives each
  row the key `dvl.generate` alone takes from that seed (what the server does): the same tokens."""
  sampling = serve.Sampling(temperature=1.5, top_p=0.9, top_k=20)
  jobs = [serve.Job(QUESTION, None, 16, seed=3), serve.Job("What is", None, 16, seed=4)]
  assert {k: serve.chat_body(jobs[0], MODEL, "block_diffusion", sampling)[k] for k in ("temperature", "seed")} == \
      {"temperature": 1.5, "seed": 3}
  static = serve.StaticBatches(served.checkpoint, 2, (PIXELS, PIXELS), sampling)
  out, _ = static._generate(jobs, "block_diffusion")
  for row, job in enumerate(jobs):
    want = alone(served, job.question, seed=job.seed, gen_length=16, temperature=1.5, top_p=0.9, top_k=20)
    np.testing.assert_array_equal(out.tokens[row], want.tokens[0])
  greedy = alone(served, QUESTION, gen_length=16)
  assert (out.tokens[0] != greedy.tokens[0]).any()  # it did sample


def test_the_api_key_guards_v1_only(served):
  for path in ("/v1/models", f"/v1/models/{MODEL}"):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
      try:
        urllib.request.urlopen(urllib.request.Request(served.url + path, headers=headers))
        raise AssertionError(f"{headers} was let in")
      except urllib.error.HTTPError as e:
        assert e.code == 401 and "Authorization: Bearer" in json.load(e)["error"]["message"]
  retrieved = served.metric('dvl_http_responses_total{code="200",route="/v1/models/{model}"}', default=0.0)
  with served.client() as client:
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
  assert served.metric('dvl_http_responses_total{code="200",route="/v1/models/{model}"}') == retrieved + 1
  with urllib.request.urlopen(f"{served.url}/health") as reply:  # probes need no key
    assert json.load(reply)["status"] == "ok"


def test_metrics_count_requests_and_tokens(served):
  served.wait_idle()
  before = {n: served.metric(n) for n in ("dvl_requests_total{outcome=\"finished\"}", "dvl_generated_tokens_total",
                                           "dvl_time_to_first_token_seconds_count", "dvl_forwards_total")}
  with served.client() as client:
    usage = client.post("/v1/completions", json={"model": MODEL, "prompt": [5, 6], "max_tokens": 8}).json()["usage"]
  after = {n: served.metric(n) for n in before}
  assert after["dvl_requests_total{outcome=\"finished\"}"] == before["dvl_requests_total{outcome=\"finished\"}"] + 1
  assert after["dvl_generated_tokens_total"] - before["dvl_generated_tokens_total"] == usage["completion_tokens"]
  assert after["dvl_forwards_total"] - before["dvl_forwards_total"] == usage["nfe"]
  assert after["dvl_time_to_first_token_seconds_count"] == before["dvl_time_to_first_token_seconds_count"] + 1
  assert served.metric("dvl_slots") == 4 and served.metric("dvl_slots_busy") == 0
  used, limit = mappings.usage()
  assert served.metric("dvl_memory_mappings_limit") == limit
  assert used / 2 < served.metric("dvl_memory_mappings") < limit  # the server's programs live in this process


def test_an_answer_ends_at_eos_in_the_body_and_the_stream():
  """The checkpoint's model never stops early, so the EOS cut is checked on an output built by hand."""
  eos = 2
  out = dvl.GenerateOutput.build(np.array([[5, 7, eos, 9, 9, 9]]), np.array([6]), np.array([4]), 4,
                                 np.zeros((1, 6), int), eos)
  decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
  answer = Answer("chat", decode, eos)
  assert answer.add(np.array([5, 7])) == ([5, 7], "5 7")
  assert answer.add(np.array([eos, 9, 9, 9])) == ([eos], f" {eos}")
  assert answer.add(np.array([9])) == ([], "")
  choice = answer.choice(out, token_ids=True)
  assert choice["token_ids"] == [5, 7, eos] and choice["finish_reason"] == "stop"
  assert usage(3, [answer.usage(out)]) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "nfe": 4,
                                           "tokens_per_forward": 1.5}
  assert answer.last_piece()["finish_reason"] == "stop"


def test_an_answer_ends_before_its_first_stop_sequence():
  """Hand-made pieces: text that may begin a stop sequence is held back, then shown once it does not; at a stop
  the text ends before it, the ids run through the token that completed it, usage counts the forwards so far."""
  decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
  answer = Answer("text", decode, eos_id=2, stop=("7 8", "4 4 4"), index=3)
  assert answer.add(np.array([5, 7]), forwards=3) == ([5, 7], "5 ")  # "7" may begin "7 8"
  assert answer.add(np.array([9, 4]), forwards=4) == ([9, 4], "7 9 ")  # it did not; "4" may begin "4 4 4"
  assert answer.add(np.array([7, 8, 6]), forwards=6) == ([7, 8], "4 ")  # "7 8" completes at the 8
  assert answer.stopped and answer.add(np.array([6]), forwards=7) == ([], "")
  assert answer.choice(None, token_ids=True) == {"index": 3, "finish_reason": "stop", "logprobs": None,
                                                 "text": "5 7 9 4 ", "token_ids": [5, 7, 9, 4, 7, 8]}
  assert usage(3, [answer.usage(None)]) == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9, "nfe": 6,
                                            "tokens_per_forward": 1.0}
  assert answer.last_piece() == {"index": 3, "finish_reason": "stop", "logprobs": None, "text": ""}
  held = Answer("text", decode, eos_id=2, stop=("5 6",))
  assert held.add(np.array([4, 5]), forwards=1) == ([4, 5], "4 ")
  assert held.last_piece()["text"] == "5" and held.last_piece()["finish_reason"] == "length"  # held back till now


def test_a_stop_sequence_ends_the_answer_early_in_the_body_and_the_stream(served):
  want = alone(served, QUESTION, chat=False, gen_length=GEN)
  tokens, text = want.tokens[0, :want.lengths[0]].tolist(), want.text[0]
  stop = text.split()[3]  # a word of the first block or so: most of the answer is left to decode
  decode = lambda ids: served.processor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
  through = next(n for n in range(1, len(tokens) + 1) if stop in decode(tokens[:n]))
  stopped = served.metric('dvl_requests_total{outcome="stopped"}')
  body = {"model": MODEL, "prompt": QUESTION, "max_tokens": GEN, "stop": [stop, "never said"],
          "return_token_ids": True}
  with served.client() as client:
    reply = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as streamed:
      lines = [line for line in streamed.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  *events, counted = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
  choice = reply["choices"][0]
  assert choice["text"] == text[:text.index(stop)] and choice["token_ids"] == tokens[:through]
  assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == through
  assert 0 < reply["usage"]["nfe"] < want.nfe[0]  # it left its slot before the answer's end
  assert "".join(e["choices"][0]["text"] for e in events) == text[:text.index(stop)]
  assert sum((e["choices"][0].get("token_ids", []) for e in events), []) == tokens[:through]
  assert events[-1]["choices"][0]["finish_reason"] == "stop" and counted["usage"] == reply["usage"]
  served.wait_idle()
  assert served.metric('dvl_requests_total{outcome="stopped"}') == stopped + 2
