"FLOPs and KV-cache accounting: hand-computed formula values, and counts from real ToDRE runs on the tiny LLaVA."
import pytest, torch
from todre.core import apply_todre
from todre.flops import (DecoderShape, VisionShape, ModelShape, SHAPES, layer_flops, prefill_flops, decode_flops,
                         vision_flops, generate_flops, check_counts, kv_cache_bytes, shape_from_config, vision_sequences)
from conftest import PROMPTS

torch.set_num_threads(1)
TOY = DecoderShape(layers=3, hidden=2, ffn=3, heads=1, kv_heads=1, vocab=10)

def test_layer_formula_by_hand():
    # n=4, d=2, m=3: 4·4·4 + 2·16·2 + 2·4·2·3 = 64 + 64 + 48
    assert layer_flops(4, 2, 3) == 176
    assert layer_flops(4, 2, 3, flops_convention="2x") == 352
    # one decoding token against 7 keys: 4·1·4 + 2·1·7·2 + 2·1·2·3 = 16 + 28 + 12
    assert layer_flops(1, 2, 3, kv_len=7) == 56
    with pytest.raises(ValueError, match="flops_convention"): layer_flops(1, 2, 3, flops_convention="x")
    with pytest.raises(ValueError, match="non-negative"): layer_flops(-1, 2, 3)

def test_prefill_decode_vision_by_hand():
    assert prefill_flops([4, 4, 1], TOY, per_layer=True) == [176, 176, layer_flops(1, 2, 3)]
    assert prefill_flops(4, TOY) == 3 * 176
    assert prefill_flops(torch.tensor([4, 4, 4]), TOY) == 3 * 176
    assert decode_flops([7, [7, 7, 7]], TOY) == 6 * 56
    assert decode_flops([], TOY) == 0
    v = VisionShape(layers=2, hidden=2, ffn=3, tokens_per_crop=4)
    assert vision_flops(3, v) == 3 * 2 * 176
    assert vision_flops(1, ModelShape(v, TOY)) == 2 * 176
    with pytest.raises(ValueError, match="one count per layer"): prefill_flops([1, 2], TOY)

def test_paper_numbers():
    s = SHAPES["llava-next-7b"]
    n, L = 3000, 20
    pre = prefill_flops(n, s)
    dec = decode_flops([n + t - 1 for t in range(1, L + 1)], s)
    T, d, m = 32, 4096, 11008
    assert dec == T * (4 * L * d * d + 2 * L * d * m + d * L * (2 * n + L - 1))   # Eq. 2 closed form
    assert abs(pre / 1e12 - 17.46) < 0.01
    assert abs(dec / pre - 0.0067) < 0.0001
    assert abs(prefill_flops(n, SHAPES["llava-next-13b"]) / 1e12 - 33.26) < 0.01
    assert abs(vision_flops(1, s) / 1e12 - 0.1906) < 0.001

def test_shapes_from_config(llava, llava_next):
    assert SHAPES["llava-1.5-7b"].decoder == SHAPES["llava-next-7b"].decoder
    assert (SHAPES["llava-1.5-7b"].max_crops, SHAPES["llava-next-7b"].max_crops) == (1, 5)
    s = shape_from_config(llava[0])
    assert (s.decoder.layers, s.decoder.hidden, s.decoder.ffn, s.decoder.heads, s.decoder.kv_heads) == (8, 64, 128, 4, 2)
    assert (s.vision.tokens_per_crop, s.max_crops) == (577, 1)
    assert shape_from_config(llava_next[0].config).max_crops == 5

def _run(model, inputs, **over):
    with apply_todre(model, retain=0.10, **over) as h:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        return h.stats, h.check_layer, out

def test_stage2_lowers_flops_after_check_layer(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    shape = shape_from_config(model)
    s_off, _, _ = _run(model, inputs, stage2=False)
    s_on, check, _ = _run(model, inputs, tau=1.0)
    assert bool(s_on.stage2_fired[0])
    for st in (s_off, s_on):
        check_counts(st, inputs["input_ids"], model.config.image_token_id, inputs["attention_mask"])
    f_off, f_on = generate_flops(s_off, shape), generate_flops(s_on, shape)
    assert f_off["prefill_per_layer"][:check + 1] == f_on["prefill_per_layer"][:check + 1]
    assert all(a > b for a, b in zip(f_off["prefill_per_layer"][check + 1:], f_on["prefill_per_layer"][check + 1:]))
    assert all(a > b for a, b in zip(f_off["decode_per_layer"][check + 1:], f_on["decode_per_layer"][check + 1:]))
    assert f_on["total"] < f_off["total"] and f_on["vision"] == f_off["vision"] == vision_flops(1, shape)
    assert f_on["decode_steps"] == 3
    # the prefill number is Eq. 1 on the actual counts
    counts = s_on.prefill_tokens[:, 0].tolist()
    assert f_on["prefill"] == sum(layer_flops(n, 64, 128) for n in counts)

def test_check_counts_batch_and_failure(llava, images):
    model, proc = llava
    inputs = proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    st, _, _ = _run(model, inputs, tau=1.0)
    first = check_counts(st, inputs["input_ids"], model.config.image_token_id, inputs["attention_mask"])
    text = ((inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()).sum(1)
    assert first == (text + 58).tolist()
    st.prefill_tokens[0, 1] += 1
    with pytest.raises(AssertionError, match="sample 1"):
        check_counts(st, inputs["input_ids"], model.config.image_token_id, inputs["attention_mask"])

def test_llava_next_needs_crops(llava_next, images):
    model, proc = llava_next
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    st, _, _ = _run(model, inputs, tau=1.0)
    check_counts(st, inputs["input_ids"], model.config.image_token_id)
    shape = shape_from_config(model)
    with pytest.raises(ValueError, match="pass n_crops"): generate_flops(st, shape)
    assert generate_flops(st, shape, n_crops=inputs["pixel_values"].shape[1])["vision"] == vision_flops(5, shape)

@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_kv_bytes_match_cache_tensors(tau, llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    st, _, out = _run(model, inputs, tau=tau)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    actual = [l.keys.nbytes + l.values.nbytes for l in cache.layers]
    per, total = kv_cache_bytes(st, shape_from_config(model), dtype_bytes=4)
    assert per == actual and total == sum(actual)
    assert (per[-1] < per[0]) == (tau == 1.0)

def test_kv_bytes_formula():
    per, total = kv_cache_bytes(100, SHAPES["llava-next-7b"])
    assert per[0] == 2 * 32 * 128 * 100 * 2 and total == 32 * per[0]
    assert kv_cache_bytes([1, 2, 3], TOY, dtype_bytes=4) == ([16, 32, 48], 96)   # head_dim 2


def test_real_shapes_of_other_families():
    q, i = SHAPES["qwen2.5-vl-7b"], SHAPES["internvl2-8b"]
    assert (q.decoder.layers, q.decoder.hidden, q.decoder.ffn, q.decoder.heads, q.decoder.kv_heads, q.decoder.vocab) == (28, 3584, 18944, 28, 4, 152064)
    assert (q.vision.layers, q.vision.hidden, q.vision.tokens_per_crop, q.vision.cls, q.vision.merge, q.vision.window) == (32, 1280, None, False, 4, 64)
    assert (i.decoder.layers, i.decoder.hidden, i.decoder.ffn, i.decoder.kv_heads, i.decoder.vocab) == (32, 4096, 14336, 8, 92553)
    assert (i.vision.tokens_per_crop, i.vision.llm_tokens_per_crop, i.max_crops) == (1025, 256, 13)
    assert kv_cache_bytes(1, q)[1] == 28 * 2 * 4 * 128 * 2     # 56 KiB per token in bf16

def test_windowed_vision_by_hand():
    v = VisionShape(layers=3, hidden=2, ffn=3, tokens_per_crop=None, cls=False, merge=4, window=2, full_layers=(1,))
    # 5 patches: layers 0 and 2 attend within windows of 2, layer 1 over all 5
    assert vision_flops([5], v) == 2 * layer_flops(5, 2, 3, kv_len=2) + layer_flops(5, 2, 3)
    assert vision_flops([1, 5], v) == vision_flops([1], v) + vision_flops([5], v)
    with pytest.raises(ValueError, match="dynamic resolution"): vision_flops(2, v)

@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl",
                                  "tiny-llava-onevision", "tiny-llava-next-video"])
def test_every_family_accounts(name, images):
    from todre.models.base import tiny_model, tiny_inputs
    model, proc = tiny_model(name, text_layers=8) if name != "tiny-llava" else tiny_model(name)
    inputs = tiny_inputs(model, proc, images[:2], ["Where is the cup?", "What?"])
    shape = shape_from_config(model)
    vis = vision_sequences(model, inputs)
    assert len(vis) == 2 and all(len(v) >= 1 for v in vis)
    st, check, out = _run(model, inputs, tau=1.0)
    for b in range(2):
        f = generate_flops(st, shape, sample=b, vision=vis)
        assert f["vision"] == vision_flops([n for n in vis[b]], shape) > 0
        assert f["prefill_per_layer"][-1] < f["prefill_per_layer"][0]              # stage 2 fired after the check layer
    with pytest.raises(ValueError, match="visual items"): generate_flops(st, shape, vision=vis[:1])
    per, total = kv_cache_bytes(st, shape, dtype_bytes=4)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    assert total <= sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)       # padding slots are not counted

def test_vision_sequences_read_the_inputs(images):
    from todre.models.base import tiny_model, tiny_inputs
    model, proc = tiny_model("tiny-qwen2.5-vl")
    x = tiny_inputs(model, proc, images[:1], ["Hi?"])
    t, h, w = x["image_grid_thw"][0].tolist()
    assert vision_sequences(model, x) == [[h * w] * t]
    model, proc = tiny_model("tiny-internvl")
    x = tiny_inputs(model, proc, images[:2], ["Hi?", "Ho?"])
    assert sum(len(v) for v in vision_sequences(model, x)) == x["pixel_values"].shape[0]
