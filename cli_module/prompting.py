"""Prompts and training sequences from LLaVA-format conversations, through the base's chat template.

A LLaVA record: {"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "..."}, ...]}. Bases without a chat template use LLaVA-1.5's "USER: ... ASSISTANT: ...</s>" format.
Labels cover the assistant answers only (-100 elsewhere), found by rendering each prefix of the dialogue.
"""

from __future__ import annotations

from typing import Any

from .presets import TINY_CHAT_TEMPLATE

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE = "<image>"


def to_messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from", turn.get("role", "")))
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {turn.get('from')!r}; use 'human' or 'gpt'")
        messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return messages


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None) or TINY_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def chat_prompt(tokenizer: Any, question: str, with_image: bool = True) -> str:
    """One user turn (image first, as LLaVA does) ready for generation."""
    content = f"{IMAGE}\n{question}" if with_image else question
    return render(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)


def build_example(tokenizer: Any, conversations: list[dict[str, str]], image_tokens: int,
                  image_token: str = IMAGE) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels) with ``<image>`` expanded to ``image_tokens`` placeholders; answers labelled."""
    messages = to_messages(conversations)
    text = "".join(m["content"] for m in messages)
    if text.count(image_token) != 1:
        raise ValueError(f"conversation must hold exactly one {image_token} placeholder, found "
                         f"{text.count(image_token)}")
    expand = [{**m, "content": m["content"].replace(image_token, image_token * image_tokens)} for m in messages]

    def ids(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    full = ids(render(tokenizer, expand, add_generation_prompt=False))
    labels = [-100] * len(full)
    for i, m in enumerate(expand):
        if m["role"] != "assistant":
            continue
        start = len(ids(render(tokenizer, expand[:i], add_generation_prompt=True)))
        end = len(ids(render(tokenizer, expand[: i + 1], add_generation_prompt=False)))
        labels[start:end] = full[start:end]
    if all(x == -100 for x in labels):
        raise ValueError("conversation has no assistant ('gpt') answer to learn from")
    return full, labels
