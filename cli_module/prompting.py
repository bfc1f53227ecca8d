"""Prompts and training sequences from LLaVA-format conversations, through the base's chat template.

A LLaVA record: {"id", "image" (absent for text-only rows), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. What this file implements:

- **Template**: ``chat_template=`` (a processor's, e.g. a llava-hf folder's ``chat_template.jinja``), else the
  tokenizer's, else the fallback of the model ``family``: LLaVA-1.5's Vicuna format ``USER: ...
  ASSISTANT: ...</s>`` for ``"llava"``, ChatML (``<|im_start|>user\\n...<|im_end|>\\n``) for the Qwen2-based
  ``"llava_onevision"``, the tiny preset's format for ``"composed"`` or no family. Callers pass
  ``family=base.kind``.
- **Content**: the llava-hf templates loop over typed parts (``{"type": "image"}``, ``{"type": "text",
  "text": ...}``) and render a plain string as nothing; templates that print ``message['content']`` (the tiny
  preset's, SmolLM2's) want strings. ``wants_typed_parts`` tells them apart from the template's text, and
  ``render`` hands each template the form it reads.
- **Qwen's placeholder**: the Qwen2.5-VL / Qwen3-VL templates render an image part as
  ``<|vision_start|><|image_pad|><|vision_end|>``; the data keeps LLaVA's ``<image>`` marker, and the rendered
  sequence's placeholder (the one expanded to the image's tokens and checked) is the one the template writes
  (``rendered_image``).
- **Image placement**: as LLaVA's ``preprocess_multimodal`` does, ``<image>`` is moved to the front of the
  turn that holds it (``<image>\\n`` + the rest of the text, stripped); ``image_first=False`` keeps it where
  it is.
- **Checks**: every rendered prompt and sequence holds each turn's text, in order, and one placeholder per
  image; a training sequence holds exactly one run of exactly ``image_tokens`` image tokens, or none for a
  text-only conversation (``image_tokens=0``). Failures raise ``ValueError`` saying what is wrong and what to
  do; callers add the record's id.
- **Labels**: -100 everywhere except each assistant answer and its end-of-turn marker. An answer starts where
  the template's generation prompt ends (found by rendering each prefix of the dialogue); labels follow the
  characters of one tokenization of the whole sequence (offset mapping). A template that closes the turn with
  a marker (``<|im_end|>``, ``</s>``) keeps it, labelled; one that closes it with whitespace only (llava-hf's
  LLaVA-1.5 template ends an answer with ``' '``) gets the tokenizer's EOS in place of that whitespace: that
  is LLaVA-1.5's own training format (``ASSISTANT: answer</s>``), and the model learns to stop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE = "<image>"
Family = Literal["llava", "llava_onevision", "composed", "qwen2_5_vl", "qwen3_vl"]
QWEN_IMAGE = "<|image_pad|>"  # what a Qwen-VL chat template writes per image part

# LLaVA-1.5's conv_vicuna_v1 (sep " ", sep2 "</s>") without its default system prompt, as llava-hf prompts it.
VICUNA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Qwen2's ChatML without a default system prompt: the llava-hf OneVision template's output for string content.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2-VL / Qwen2.5-VL's template (ChatML with typed parts, an image as vision_start, image_pad, vision_end) without
# its default system prompt, for a Qwen folder that ships none.
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A template reads typed parts when it filters or indexes them: selectattr('type', ...), x['type'], x.type,
# x['text'].
TYPED_PARTS = re.compile(r"""selectattr\(\s*['"]type['"]|\[\s*['"](?:type|text)['"]\s*\]|\.type\b""")


# --- templates -------------------------------------------------------------------------------------------

def fallback_template(family: Family | None) -> str:
    """The chat format of a model family, for bases whose folder has no template."""
    if family == "llava":
        return VICUNA_TEMPLATE
    if family == "llava_onevision":
        return CHATML_TEMPLATE
    if family in ("qwen2_5_vl", "qwen3_vl"):
        return QWEN_VL_TEMPLATE
    try:
        from .presets import TINY_CHAT_TEMPLATE
    except ImportError:  # before the split of bases.py
        from .bases import TINY_CHAT_TEMPLATE
    return TINY_CHAT_TEMPLATE


def resolve_template(tokenizer: Any, chat_template: str | None = None, family: Family | None = None) -> str:
    """``chat_template`` if given, else the tokenizer's, else the family's fallback."""
    return chat_template or getattr(tokenizer, "chat_template", None) or fallback_template(family)


def rendered_image(template: str, image_token: str = IMAGE) -> str:
    """The placeholder a template writes for an image: Qwen-VL's ``<|image_pad|>`` when it writes that, else
    ``image_token`` (LLaVA's ``<image>``)."""
    return QWEN_IMAGE if QWEN_IMAGE in template and image_token not in template else image_token


def wants_typed_parts(template: str) -> bool:
    """Whether a template reads content as typed parts (llava-hf's) rather than printing a string."""
    return bool(TYPED_PARTS.search(template))


# --- messages --------------------------------------------------------------------------------------------

def to_messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}; or {"role", "content"}) -> [{"role", "content"}]."""
    messages = []
    for i, turn in enumerate(conversations):
        speaker = turn.get("from", turn.get("role", ""))
        role = ROLES.get(speaker)
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {speaker!r}; use 'human' or 'gpt'")
        content = turn.get("value", turn.get("content", ""))
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: value is {type(content).__name__}, not text; give the turn's text "
                             f"as a string")
        messages.append({"role": role, "content": content})
    return messages


def text_parts(content: str, image_token: str, image_first: bool) -> list[str]:
    """The texts a turn must show once rendered: LLaVA's stripped rest, or the pieces around placeholders."""
    if image_first or image_token not in content:
        return [content.replace(image_token, "").strip()]
    return [piece.strip() for piece in content.split(image_token)]


def to_content(content: str, typed: bool, image_token: str, image_first: bool) -> str | list[dict[str, str]]:
    """One message's content in the form the template reads; images first when ``image_first`` (LLaVA)."""
    images = content.count(image_token)
    if image_first and images:
        rest = content.replace(image_token, "").strip()
        if not typed:
            return f"{image_token}\n" * images + rest
        return [{"type": "image"}] * images + ([{"type": "text", "text": rest}] if rest else [])
    if not typed:
        return content
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(content.split(image_token)):
        if k:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, *,
           chat_template: str | None = None, family: Family | None = None, image_token: str = IMAGE,
           image_first: bool = True) -> str:
    """Messages with string content (``image_token`` marking images) -> the chat template's text, checked:
    each turn's text present, in order, and one ``image_token`` per image."""
    template = resolve_template(tokenizer, chat_template, family)
    typed = wants_typed_parts(template)
    payload = [{**m, "content": to_content(m["content"], typed, image_token, image_first)} for m in messages]
    text = tokenizer.apply_chat_template(payload, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    check_rendered(text, messages, image_token, image_first, rendered_image(template, image_token))
    return text


def check_rendered(text: str, messages: list[dict[str, str]], image_token: str,
                   image_first: bool = True, rendered: str | None = None) -> None:
    """Raise if the rendered ``text`` lost a turn's text or an image (a template fed the wrong form); ``rendered``
    is the placeholder the template writes per image (default ``image_token``)."""
    at = 0
    for i, m in enumerate(messages):
        for part in text_parts(m["content"], image_token, image_first):
            found = text.find(part, at)
            if found < 0:
                raise ValueError(f"turn {i} ({m['role']}): its text {part[:60]!r} is missing from the "
                                 f"rendered sequence {text[:200]!r}; the chat template drops it: check that "
                                 f"it reads the content form it is given (typed parts or a string)")
            at = found + len(part)
    want = sum(m["content"].count(image_token) for m in messages)
    rendered = rendered or image_token
    got = text.count(rendered)
    if got != want:
        raise ValueError(f"the rendered sequence holds {got} {rendered} placeholder(s) for {want} "
                         f"image(s): the chat template must write {rendered} once per image part")


def chat_prompt(tokenizer: Any, question: str, with_image: bool = True, *, chat_template: str | None = None,
                family: Family | None = None, image_token: str = IMAGE) -> str:
    """One user turn (image first, as LLaVA does) ready for generation."""
    content = f"{image_token}\n{question}" if with_image else question
    return render(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True,
                  chat_template=chat_template, family=family, image_token=image_token)


# --- training sequences ----------------------------------------------------------------------------------

def check_placeholders(messages: list[dict[str, str]], image_tokens: int, image_token: str) -> None:
    """An image conversation holds one ``image_token``, in a user turn; a text-only one (``image_tokens=0``)
    holds none."""
    where = [i for i, m in enumerate(messages) for _ in range(m["content"].count(image_token))]
    if image_tokens < 0:
        raise ValueError(f"image_tokens={image_tokens}: give the image's token count, or 0 for a "
                         f"text-only row")
    if image_tokens == 0 and where:
        raise ValueError(f"text-only conversation (no image, image_tokens=0) holds {len(where)} "
                         f"{image_token} placeholder(s) (turns {where}): give the record an image or "
                         f"remove the placeholder")
    if image_tokens > 0 and len(where) != 1:
        raise ValueError(f"conversation must hold exactly one {image_token} placeholder for its image, found "
                         f"{len(where)}" + (f" (turns {where})" if where else "")
                         + f"; put one {image_token} in the first human turn")
    if where and messages[where[0]]["role"] != "user":
        role = messages[where[0]]["role"]
        raise ValueError(f"the {image_token} placeholder is in turn {where[0]} ({role}); put it in a "
                         f"human turn")


def answer_pieces(full: str, messages: list[dict[str, str]], show: Callable[[list, bool], str],
                  eos: str | None) -> list[tuple[str, bool]]:
    """Split the rendered dialogue into (text, labelled) pieces: each answer plus its end-of-turn marker is
    labelled; a whitespace-only turn ending is replaced by ``eos``."""
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = prefix_length(full, show(messages[:i], True), f"the prompt before turn {i}")
        end = prefix_length(full, show(messages[: i + 1], False), f"the dialogue up to turn {i}")
        answer = m["content"].strip()
        found = full.find(answer, start, end)
        if found < 0:
            raise ValueError(f"turn {i} (assistant): its text is not where the template's generation "
                             f"prompt ends ({full[start:end][:80]!r}); the template's prompt and turn "
                             f"formats disagree")
        answer_end = found + len(answer)
        marker = full[answer_end:end].rstrip()
        if not marker and eos is None:
            raise ValueError("the chat template ends an assistant turn without an end-of-turn marker and the "
                             "tokenizer has no eos_token to end it with; set tokenizer.eos_token")
        pieces += [(full[cursor:start], False), (full[start:answer_end] + (marker or eos), True)]
        cursor = answer_end + len(marker) if marker else end
    pieces.append((full[cursor:], False))
    return pieces


def prefix_length(full: str, prefix: str, what: str) -> int:
    """``len(prefix)``, after checking that the rendered ``prefix`` begins the rendered dialogue ``full``."""
    if not full.startswith(prefix):
        raise ValueError(f"{what} renders as {prefix[-80:]!r}, which does not begin the whole dialogue "
                         f"{full[:len(prefix) + 20][-100:]!r}: the chat template renders turns differently "
                         f"by position (does it alternate human/gpt turns, starting with human?)")
    return len(prefix)


def image_runs(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the runs of ``image_id`` in ``ids``."""
    runs: list[int] = []
    previous = None
    for token in ids:
        if token == image_id:
            if previous == image_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


def build_example(tokenizer: Any, conversations: list[dict[str, str]], image_tokens: int,
                  image_token: str = IMAGE, *, chat_template: str | None = None, family: Family | None = None,
                  image_first: bool = True) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels): the dialogue through the chat template (see the module docstring), ``<image>``
    expanded to ``image_tokens`` placeholders, labels on the answers. ``image_tokens=0``: a text-only example
    (LLaVA's ShareGPT rows), which must hold no ``<image>``."""
    messages = to_messages(conversations)
    check_placeholders(messages, image_tokens, image_token)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant ('gpt') answer to learn from")
    template = resolve_template(tokenizer, chat_template, family)

    def show(msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return render(tokenizer, msgs, add_generation_prompt, chat_template=template, image_token=image_token,
                      image_first=image_first)

    pieces = answer_pieces(show(messages, False), messages, show, tokenizer.eos_token)
    placeholder = rendered_image(template, image_token)  # <image>, or Qwen's <|image_pad|>
    text, spans = "", []
    for piece, labelled in pieces:
        if labelled:
            spans.append((len(text), len(text) + len(piece)))
        else:
            piece = piece.replace(placeholder, placeholder * image_tokens)
        text += piece
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts = [begin for begin, _ in enc["offset_mapping"]]
    labels = [t if any(s <= at < e for s, e in spans) else -100 for t, at in zip(ids, starts)]
    check_image_run(ids, tokenizer, image_tokens, placeholder)
    if all(x == -100 for x in labels):
        raise ValueError("no answer token is labelled: the assistant answers are empty")
    return ids, labels


def check_image_run(ids: list[int], tokenizer: Any, image_tokens: int, image_token: str) -> None:
    """Exactly one run of exactly ``image_tokens`` image tokens (none for text-only)."""
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_tokens and (image_id is None or image_id == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {image_token} token: add it as a special token "
                         f"(additional_special_tokens=[{image_token!r}])")
    runs = image_runs(ids, image_id) if image_id is not None else []
    if runs != ([image_tokens] if image_tokens else []):
        raise ValueError(f"the tokenized sequence holds {image_token} runs of lengths {runs}, expected "
                         f"{[image_tokens] if image_tokens else 'none'}: the tokenizer must keep "
                         f"{image_token} as one special token and the template must not write it itself")


def tokenize_left_padded(tokenizer: Any, texts: list[str]) -> tuple[Any, Any]:
    """Rendered prompts -> input_ids and attention_mask (B, L), left-padded with the tokenizer's pad id, as every
    batched prefill wants them; the shared tokenizer's own ``padding_side`` is read and left as it is."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max((len(x) for x in ids), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, L)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return input_ids, mask
