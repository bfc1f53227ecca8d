"""Prompts and training sequences through the real llava-hf chat templates (cli_module.prompting).

Tiny random checkpoint folders in the hub's layout (tests/hub_checkpoints.py) carry the templates of
tests/fixtures/chat_templates/, copied verbatim (the template text is data). Where they come from:
- ``llava-1.5.jinja``: the ``chat_template`` of ``llava-hf/llava-1.5-7b-hf`` (its ``chat_template.json``), as
  quoted by huggingface/transformers ``tests/models/llava/test_processing_llava.py``
  (``prepare_processor_dict``: "must match processor_config.json from the Hub repo") and by openvino.genai's
  tokenizer fallback map ("llava-1.5, llava-v1.6-vicuna (chat_template.json)").
- ``llava-onevision.jinja``: the ``chat_template`` of huggingface/transformers
  ``src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py``, which wrote the
  ``llava-hf/llava-onevision-qwen2-*-ov-hf`` folders (the model doc's decoded outputs, "user\\n\\nWhat is
  shown in this image?\\nassistant\\n...", are this template's).
"""

from __future__ import annotations

import pytest
from hub_checkpoints import hub_chat_template, save_tiny_checkpoint

from cli_module.prompting import (
    CHATML_TEMPLATE,
    VICUNA_TEMPLATE,
    build_example,
    chat_prompt,
    image_runs,
    render,
    to_messages,
    wants_typed_parts,
)

N = 5  # image tokens per image in these tests
QUESTION = "What is in the picture?"
SINGLE = [{"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": "A red square."}]
MULTI = [*SINGLE, {"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "Small."}]
TEXT_ONLY = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]
IMAGES = "<image>" * N
# The training text each real template gives (decoded ids), and the labelled spans (answer + end of turn).
EXPECTED = {
    ("llava", "single"): (f"USER: {IMAGES}\n{QUESTION} ASSISTANT: A red square.</s>", [" A red square.</s>"]),
    ("llava", "multi"): (f"USER: {IMAGES}\n{QUESTION} ASSISTANT: A red square.</s>USER: And its size? "
                         f"ASSISTANT: Small.</s>", [" A red square.</s>", " Small.</s>"]),
    ("llava", "text"): ("USER: Name a colour. ASSISTANT: Blue.</s>", [" Blue.</s>"]),
    ("llava_onevision", "single"): (f"<|im_start|>user\n{IMAGES}\n{QUESTION}<|im_end|>\n"
                                    f"<|im_start|>assistant\nA red square.<|im_end|>\n",
                                    ["A red square.<|im_end|>"]),
    ("llava_onevision", "multi"): (f"<|im_start|>user\n{IMAGES}\n{QUESTION}<|im_end|>\n"
                                   f"<|im_start|>assistant\nA red square.<|im_end|>\n"
                                   f"<|im_start|>user\nAnd its size?<|im_end|>\n"
                                   f"<|im_start|>assistant\nSmall.<|im_end|>\n",
                                   ["A red square.<|im_end|>", "Small.<|im_end|>"]),
    ("llava_onevision", "text"): ("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
                                  "Blue.<|im_end|>\n", ["Blue.<|im_end|>"]),
}
CONVERSATIONS = {"single": (SINGLE, N), "multi": (MULTI, N), "text": (TEXT_ONLY, 0)}
FAMILIES = ["llava", "llava_onevision"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(family, with template): checkpoint folder} in the hub's layout."""
    root = tmp_path_factory.mktemp("hub")
    return {(f, t): save_tiny_checkpoint(root / f"{f}-{t}", f, chat_template=t)
            for f in FAMILIES for t in (True, False)}


@pytest.fixture(scope="module")
def tokenizers(folders):
    from transformers import AutoTokenizer

    return {key: AutoTokenizer.from_pretrained(path) for key, path in folders.items()}


def labelled_spans(tok, ids, labels):
    """Decoded runs of labelled tokens; checks each label is its input id."""
    spans, run = [], []
    for token, label in [*zip(ids, labels), (None, -100)]:
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def test_folder_has_the_hub_layout_and_the_tokenizer_reads_its_template(folders, tokenizers):
    names = {p.name for p in folders["llava_onevision", True].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= names
    assert "chat_template.jinja" not in {p.name for p in folders["llava", False].iterdir()}
    for family in FAMILIES:
        assert tokenizers[family, True].chat_template == hub_chat_template(family)
        assert tokenizers[family, False].chat_template is None


def test_plain_strings_render_blank_with_the_hub_templates_typed_parts_do_not(tokenizers):
    """The bug this module fixes: the llava-hf templates ignore string content."""
    tok = tokenizers["llava", True]
    messages = to_messages(SINGLE)
    blank = tok.apply_chat_template(messages, tokenize=False)
    assert blank == "USER: ASSISTANT: "
    rendered = render(tok, messages, add_generation_prompt=False)
    assert rendered == f"USER: <image>\n{QUESTION} ASSISTANT: A red square. "
    assert all(wants_typed_parts(hub_chat_template(family)) for family in FAMILIES)
    assert not wants_typed_parts(VICUNA_TEMPLATE) and not wants_typed_parts(CHATML_TEMPLATE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["single", "multi", "text"])
def test_training_sequence_with_the_hub_template(tokenizers, family, kind):
    tok = tokenizers[family, True]
    conversation, image_tokens = CONVERSATIONS[kind]
    ids, labels = build_example(tok, conversation, image_tokens)
    text, spans = EXPECTED[family, kind]
    assert tok.decode(ids) == text
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_runs(ids, image_id) == ([N] if image_tokens else [])
    assert all(label == -100 for token, label in zip(ids, labels) if token == image_id)
    assert labelled_spans(tok, ids, labels) == spans


@pytest.mark.parametrize("family", FAMILIES)
def test_without_a_template_the_family_format_gives_the_same_sequences(tokenizers, family):
    hub, bare = tokenizers[family, True], tokenizers[family, False]
    for kind, (conversation, image_tokens) in CONVERSATIONS.items():
        expected = build_example(hub, conversation, image_tokens)
        assert build_example(bare, conversation, image_tokens, family=family) == expected, kind
    assert chat_prompt(bare, QUESTION, family=family) == chat_prompt(hub, QUESTION)


def test_without_a_template_or_family_the_tiny_format_is_used(tokenizers):
    ids, labels = build_example(tokenizers["llava_onevision", False], SINGLE, N)
    tok = tokenizers["llava_onevision", False]
    # the tiny preset's Vicuna-like format; its "</s>" is plain text to a Qwen2 tokenizer, labelled as such
    assert tok.decode(ids) == f"USER: {IMAGES}\n{QUESTION} ASSISTANT: A red square.</s>"
    assert labelled_spans(tok, ids, labels) == [" A red square.</s>"]


def test_prompts_match_the_processor_and_the_hub_formats(folders, tokenizers):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folders["llava", True])
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = processor.apply_chat_template(typed, add_generation_prompt=True)
    assert expected == f"USER: <image>\n{QUESTION} ASSISTANT:"
    assert chat_prompt(tokenizers["llava", True], QUESTION) == expected
    bare = tokenizers["llava", False]
    assert chat_prompt(bare, QUESTION, chat_template=processor.chat_template) == expected
    ov = tokenizers["llava_onevision", True]
    answer_next = "<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(ov, QUESTION) == f"<|im_start|>user\n<image>\n{QUESTION}{answer_next}"
    assert chat_prompt(ov, QUESTION, with_image=False) == f"<|im_start|>user\n{QUESTION}{answer_next}"
    dialogue = [{"role": "user", "content": f"<image>\n{QUESTION}"},
                {"role": "assistant", "content": "A square."}, {"role": "user", "content": "Colour?"}]
    assert render(tokenizers["llava", True], dialogue, add_generation_prompt=True) == (
        f"USER: <image>\n{QUESTION} ASSISTANT: A square. USER: Colour? ASSISTANT:")


def test_image_goes_to_the_front_of_its_turn_unless_asked_otherwise(tokenizers):
    tok = tokenizers["llava", False]
    moved, _ = build_example(tok, SINGLE, 2, family="llava")
    kept, _ = build_example(tok, SINGLE, 2, family="llava", image_first=False)
    assert tok.decode(moved).startswith(f"USER: <image><image>\n{QUESTION} ASSISTANT:")
    assert tok.decode(kept).startswith(f"USER: {QUESTION}\n<image><image> ASSISTANT:")


@pytest.mark.parametrize(("conversation", "image_tokens", "message"), [
    (SINGLE, 0, "text-only conversation .* holds 1 <image> placeholder"),
    (TEXT_ONLY, N, "exactly one <image> placeholder for its image, found 0"),
    ([{"from": "human", "value": "<image> and <image>"}, SINGLE[1]], N, "found 2 \\(turns \\[0, 0\\]\\)"),
    ([SINGLE[0] | {"value": QUESTION}, {"from": "gpt", "value": "<image>"}], N, "placeholder is in turn 1"),
    (SINGLE[:1], N, "no assistant \\('gpt'\\) answer"),
    ([{"from": "robot", "value": "hi"}], 0, "turn 0: unknown speaker 'robot'"),
])
def test_bad_conversations_are_refused(tokenizers, conversation, image_tokens, message):
    with pytest.raises(ValueError, match=message):
        build_example(tokenizers["llava", True], conversation, image_tokens)


def test_a_template_that_drops_text_or_images_is_refused(tokenizers):
    tok = tokenizers["llava", False]
    roles_only = "{% for m in messages %}{{ m['role'] }}: {% endfor %}"
    with pytest.raises(ValueError, match="turn 0 \\(user\\): its text 'What is in the picture\\?' is miss"):
        build_example(tok, SINGLE, N, chat_template=roles_only)
    text_parts_only = ("{% for m in messages %}"
                       "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}"
                       "{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="holds 0 <image> placeholder\\(s\\) for 1 image"):
        chat_prompt(tok, QUESTION, chat_template=text_parts_only)


def test_image_runs():
    assert image_runs([7, 4, 4, 2, 4, 4, 4], 4) == [2, 3]
    assert image_runs([1, 2], 4) == []


def test_left_padded_batches_leave_the_tokenizer_as_it_is(tiny_base):
    from cli_module.prompting import tokenize_left_padded

    tok = tiny_base.tokenizer
    tok.padding_side = "right"
    texts = ["USER: hi ASSISTANT:", "USER: a longer question here ASSISTANT:", ""]
    ids, mask = tokenize_left_padded(tok, texts)
    assert tok.padding_side == "right"  # the shared tokenizer is not flipped
    for i, text in enumerate(texts):
        own = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[i, ids.shape[1] - len(own):].tolist() == own and int(mask[i].sum()) == len(own)
        assert (ids[i, : ids.shape[1] - len(own)] == tok.pad_token_id).all() and mask[i, 0] == (len(own) == ids.shape[1])
