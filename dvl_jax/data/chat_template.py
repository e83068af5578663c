"""The `qwen_2_5` conversation format DiffusionVL trains and evaluates with (spec §4.1, §4.2, trap 8).

ChatML with the Qwen system prompt (not Qwen2.5-VL's default one), one template per message so that
each message can be tokenized on its own, and no vision start/end tokens: an image is a bare
`<image>` marker that the data pipeline expands to image tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

from dvl_jax.data.bad_rows import EMPTY_ANSWER, MALFORMED_CONVERSATION, BadRow
from dvl_jax.data.processor import IMAGE_MARKER

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = {"human": "user", "gpt": "assistant"}


def render_message(role: str, content: str) -> str:
  """`<|im_start|>{role}\\n{content}<|im_end|>\\n`, the repo's per-message chat template."""
  return f"{IM_START}{role}\n{content}{IM_END}\n"


def move_image_to_front(text: str) -> str:
  """LLaVA's `preprocess_multimodal`: a single `<image>` not already leading becomes the prefix `<image>\\n`."""
  if text.count(IMAGE_MARKER) != 1 or text.startswith(IMAGE_MARKER):
    return text
  return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def conversation_messages(conversations: Any, num_images: int) -> list[tuple[str, str]]:
  """LLaVA `conversations` -> `[(role, content)]` ready for `render_message` (no system message).

  A leading `gpt` message is dropped and image markers are moved (image rows only), as in the repo.
  Raises `BadRow` for a malformed conversation, an empty or missing answer, or a number of `<image>`
  markers different from `num_images`.
  """
  if not isinstance(conversations, list) or not conversations:
    raise BadRow(MALFORMED_CONVERSATION, "`conversations` is not a non-empty list")
  for message in conversations:
    if not isinstance(message, dict) or message.get("from") not in ROLES or not isinstance(message.get("value"), str):
      raise BadRow(MALFORMED_CONVERSATION, f"message {str(message)[:80]!r} needs `from` in {sorted(ROLES)} "
                   "and a string `value`")
  if conversations[0]["from"] == "gpt":
    conversations = conversations[1:]
  out = [(ROLES[m["from"]], move_image_to_front(m["value"]) if num_images else m["value"]) for m in conversations]
  if not any(role == "assistant" for role, _ in out):
    raise BadRow(EMPTY_ANSWER, "no `gpt` message to learn from")
  if any(role == "assistant" and not content.strip() for role, content in out):
    raise BadRow(EMPTY_ANSWER, "a `gpt` message is empty")
  markers = sum(content.count(IMAGE_MARKER) for _, content in out)
  if markers != num_images:
    raise BadRow(MALFORMED_CONVERSATION, f"{markers} {IMAGE_MARKER} markers but {num_images} images")
  return out


def generation_prompt(question: str, num_images: int = 1) -> str:
  """The inference prompt: system, user `<image>\\n{question}` (images space-separated), open assistant turn."""
  return conversation_prompt([("user", question, num_images)])


def conversation_prompt(turns: Sequence[tuple[str, str, int]], system: str = SYSTEM_PROMPT) -> str:
  """A chat's inference prompt: the `system` message, each `(role, text, num_images)` turn (user or assistant;
  a user turn's images lead it, as `generation_prompt` writes its one turn) and an open assistant turn. One user
  turn under the default system message is `generation_prompt`'s prompt."""
  rendered = []
  for role, text, num_images in turns:
    if num_images < 0:
      raise ValueError(f"a turn's image count must be >= 0, got {num_images}")
    images = " ".join([IMAGE_MARKER] * num_images)
    rendered.append(render_message(role, f"{images}\n{text}" if num_images else text))
  return render_message("system", system) + "".join(rendered) + f"{IM_START}assistant\n"
