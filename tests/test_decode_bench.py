"""bench/decode_scaling.py's --random-weights base: the `small` base's shapes without its weight files (what the
GPU command in bench/RESULTS.md runs), decoding through the engine."""

from __future__ import annotations

from bench.decode_scaling import SMOLLM2_135M, build_model, run_batch


def test_random_small_base_has_the_small_shapes_and_decodes():
    model = build_model(random_weights=True)
    lm = model.base.text_config
    assert (lm.num_hidden_layers, lm.hidden_size, lm.num_key_value_heads) == (30, 576, 3)
    assert model.base.lm_head.weight.shape[0] == SMOLLM2_135M["vocab_size"] == len(model.base.tokenizer)
    assert model.base.image_token_id == 49152 and model.base.grid == 8  # 112 px / 14: 64 image tokens
    row = run_batch(model, rows=2, context=120, tokens=3)
    assert row["batch"] == 2 and row["context"] == 120 and row["decode_ms_per_step"] > 0
