"Invariants a user of `apply_todre` relies on, on tiny config-built LLaVA models (random weights, real geometry)."
import pytest, torch
from todre.config import ToDREConfig
from todre.core import apply_todre
from todre.diversity import select_diverse
from todre.models.base import get_adapter
from todre.decoder import token_types, VISUAL
from conftest import PROMPTS

def _inputs(proc, images, prompts):
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)

@torch.no_grad()
def _logits(model, inputs): return model(**inputs).logits

@pytest.mark.parametrize("fixture", ["llava", "llava_eager", "llava_next"])
def test_retain_one_without_stage2_is_identity(fixture, request, images):
    model, proc = request.getfixturevalue(fixture)
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    ref = _logits(model, inputs)
    with apply_todre(model, retain=1.0, stage2=False) as h:
        got = _logits(model, inputs)
        assert h.stats.n_kept == h.stats.n_visual
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5

def test_first_layer_sees_text_plus_58(llava, images):
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    with apply_todre(model, retain=0.1, stage2=False) as h:
        _logits(model, inputs)
        assert h.stats.n_visual == [576] and h.stats.n_kept == [58]
        assert h.stats.prefill_tokens[0, 0] == n_text + 58
        kept = h.stats.kept[0]
    # the same selection straight from the projector features and the [CLS] pivot
    ad = get_adapter(model)
    with torch.no_grad():
        (img,) = ad.encode(inputs["pixel_values"])
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].detach()
    assert torch.equal(img.feats, feats)
    pivot = int(img.cls_scores.argmax())
    assert torch.equal(kept, select_diverse(feats, 58, pivot=pivot))

@pytest.mark.parametrize("fixture", ["llava", "llava_next"])
def test_forced_stage2_removes_visual_tokens_everywhere_after_check(fixture, request, images):
    model, proc = request.getfixturevalue(fixture)
    inputs = _inputs(proc, images, PROMPTS)
    with apply_todre(model, retain=0.25, tau=1.0) as h:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        st = h.stats
        L = h.check_layer
        assert st.stage2_fired.all()
        non_visual = (inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)).sum(1)
        kept = torch.tensor([sum(len(k) for k, s in zip(st.kept, st.image_sample) if s == b) for b in range(2)])
        assert torch.equal(st.prefill_tokens[: L + 1], (non_visual + kept).expand(L + 1, -1))
        assert torch.equal(st.prefill_tokens[L + 1:], non_visual.expand(len(st.prefill_tokens) - L - 1, -1))
        assert len(st.decode_kv_tokens) == 3
        for step, kv in enumerate(st.decode_kv_tokens, 1):
            assert torch.equal(kv[L + 1:], (non_visual + step).expand(len(kv) - L - 1, -1))
        # the KV cache of every layer after the check layer holds no visual entry
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        for j in range(L + 1, len(st.prefill_tokens)):
            assert cache.layers[j].keys.shape[2] == int(non_visual.max()) + 3      # packed text + 3 fed tokens
        for j in range(L + 1):
            assert cache.layers[j].keys.shape[2] == int((non_visual + kept).max()) + 3

@pytest.mark.parametrize("fixture", ["llava", "llava_next"])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_batch_equals_samples(fixture, tau, request, images):
    model, proc = request.getfixturevalue(fixture)
    with apply_todre(model, retain=0.1, tau=tau) as h:
        def run(idx):
            inp = _inputs(proc, [images[i] for i in idx], [PROMPTS[i] for i in idx])
            with torch.no_grad():
                o = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
            return o, h.stats
        ob, sb = run([0, 1])
        for i in range(2):
            oi, si = run([i])
            for step in range(3):
                assert (ob.logits[step][i] - oi.logits[step][0]).abs().max() <= 1e-4
            assert torch.equal(sb.kept[i], si.kept[0])
            assert bool(sb.stage2_fired[i]) == bool(si.stage2_fired[0])
            assert ob.sequences[i, -3:].tolist() == oi.sequences[0, -3:].tolist()

def _reference_greedy(model, embeds, visual, steps, drop_after=None):
    "Naive reference: the unmodified layers, run one by one without a KV cache, recomputing every step."
    lm, head = model.model.language_model, model.lm_head
    logits = []
    embeds, visual = embeds.clone(), visual.clone()
    for _ in range(steps):
        L = embeds.shape[1]
        pos = torch.arange(L)[None]
        h = embeds
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        keep = torch.ones(L, dtype=torch.bool)
        for j, layer in enumerate(lm.layers):
            if drop_after is not None and j == drop_after + 1:
                keep = ~visual[0]
                h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
            n = h.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[:, keep])
        lg = head(lm.norm(h[:, -1:]))[:, -1]
        logits.append(lg)
        nxt = lg.argmax(-1)
        embeds = torch.cat([embeds, lm.embed_tokens(nxt)[:, None]], 1)
        visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
    return torch.stack(logits, 1)

@pytest.mark.parametrize("stage2", [False, True])
def test_generate_matches_naive_reference(stage2, llava, images):
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    with apply_todre(model, retain=0.1, stage2=stage2, tau=1.0) as h:
        with torch.no_grad():
            o = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        kept = h.stats.kept[0]
        check = h.check_layer
    ids = inputs["input_ids"]
    vis = ids == model.config.image_token_id
    keep = ~vis[0]
    keep[vis[0].nonzero()[:, 0][kept]] = True
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0][kept]
        emb = model.model.language_model.embed_tokens(ids[:, keep])
        emb[vis[:, keep]] = feats
        ref = _reference_greedy(model, emb, vis[:, keep], 4, drop_after=check if stage2 else None)
    got = torch.stack(o.logits, 1)
    assert (got - ref).abs().max() <= 1e-4

def test_original_positions(llava, images):
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("pos", []).append(k.get("position_ids")), with_kwargs=True)
    try:
        with apply_todre(model, retain=0.1, stage2=False, positions="original") as h:
            with torch.no_grad(): model.generate(**inputs, max_new_tokens=2, do_sample=False)
            kept = h.stats.kept[0]
    finally: hook.remove()
    ids = inputs["input_ids"][0]
    vis = (ids == model.config.image_token_id).nonzero()[:, 0]
    keep = torch.ones(len(ids), dtype=torch.bool); keep[vis] = False; keep[vis[kept]] = True
    expected = torch.arange(len(ids))[keep]
    assert seen["pos"][0][0].tolist() == expected.tolist()
    assert seen["pos"][1][0].tolist() == [len(ids)]            # decoding continues after the unpruned length

def test_remove_restores_model(llava, images):
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    ref = _logits(model, inputs)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    h = apply_todre(model)
    _logits(model, inputs)
    h.remove()
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(_logits(model, inputs), ref)

def test_sampled_generation(llava_next, images):
    model, proc = llava_next
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    with apply_todre(model, retain=0.25) as h:
        torch.manual_seed(0)
        with torch.no_grad(): out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])

def test_errors(llava, llava_eager, images):
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    with pytest.raises(ValueError, match=r"retain must be in \(0, 1\]"): apply_todre(model, retain=1.5)
    with pytest.raises(ValueError, match=r"retain must be in \(0, 1\]"): apply_todre(model, retain=0)
    with pytest.raises(ValueError, match="k must be a positive"): apply_todre(model, k=0)
    with pytest.raises(ValueError, match="check_layer=8 is out of range"): apply_todre(model, check_layer=8)
    with pytest.raises(TypeError, match="does not support"): apply_todre(torch.nn.Linear(2, 2))
    with apply_todre(model):
        text_only = proc.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
        with pytest.raises(ValueError, match="needs a prompt with an image"): model.generate(**text_only, max_new_tokens=2)
        with pytest.raises(ValueError, match="needs a prompt with an image"): model(**text_only)
        with pytest.raises(ValueError, match="cannot return them"): model(**inputs, output_attentions=True)
        with pytest.raises(RuntimeError, match="already attached"): apply_todre(model)
    m2, _ = llava_eager
    with apply_todre(m2, stage2=False):
        with torch.no_grad(): out = m2(**inputs, output_attentions=True)
        assert len(out.attentions) == 8

@pytest.mark.parametrize("prompt", [PROMPTS[0], "USER: <image>\nCompare it with <image>\nWhich is brighter? ASSISTANT:"])
def test_stage2_ratios_equal_eq8_on_eager_attention(prompt, llava_eager, images):
    "The recomputed rows give exactly Eq. 8 of the full eager attention map (two images make alpha_v2t non-zero)."
    from todre.decoder import cross_modal_ratios
    model, proc = llava_eager
    n_img = prompt.count("<image>")
    inputs = proc(images=images[:n_img], text=[prompt], return_tensors="pt")
    with apply_todre(model, retain=1.0, tau=0.0) as h:
        with torch.no_grad(): out = model(**inputs, output_attentions=True)
        st, L = h.stats, h.check_layer
    types = token_types(inputs["input_ids"] == model.config.image_token_id, inputs["attention_mask"])
    t2v, v2t = cross_modal_ratios(out.attentions[L], types)
    assert not st.stage2_fired.any()
    assert torch.allclose(st.alpha_t2v, t2v, atol=1e-5) and torch.allclose(st.alpha_v2t, v2t, atol=1e-5)
    assert (v2t > 0).all() == (n_img == 2)

def test_static_cache(llava, images):
    "Stage 1 works with a static cache; other cache types with stage 2 are refused with the reason."
    model, proc = llava
    inputs = _inputs(proc, images[:1], PROMPTS[:1])
    with apply_todre(model, retain=0.1, stage2=False) as h:
        with torch.no_grad():
            static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
            dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(static, dynamic)
    from transformers import DynamicCache
    with apply_todre(model, tau=1.0):
        class OtherCache(DynamicCache): pass
        with pytest.raises(NotImplementedError, match="a DynamicCache and a StaticCache"):
            model(**inputs, cache=OtherCache(config=model.config.text_config))

@pytest.mark.parametrize("tau,stage2", [(0.0, True), (1.0, True), (None, False)])
def test_decoding_steps_carry_hooks_only_where_the_cache_was_shortened(llava, images, tau, stage2):
    "No per-layer work during decoding unless stage 2 dropped tokens; then only on the layers after the check."
    model, proc = llava
    inputs = proc(images=[images[0]], text=[PROMPTS[0]], return_tensors="pt")
    layers = model.model.language_model.layers
    seen = []
    probe = model.lm_head.register_forward_pre_hook(
        lambda m, a: seen.append(sum(len(l._forward_pre_hooks) + len(l._forward_hooks) for l in layers)))
    try:
        kw = dict(retain=0.25, stage2=stage2) if tau is None else dict(retain=0.25, tau=tau)
        with apply_todre(model, **kw) as h:
            with torch.no_grad(): model.generate(**inputs, max_new_tokens=4, do_sample=False)
            after = len(layers) - 1 - h.check_layer if stage2 else 0
            n_steps = len(h.stats.decode_kv_tokens)
            assert sum(len(l._forward_pre_hooks) + len(l._forward_hooks) for l in layers) == 0   # generate is over
    finally: probe.remove()
    assert seen[0] == 2 * len(layers) and n_steps == 3
    assert seen[1:] == [after if tau == 1.0 else 0] * 3

@pytest.mark.parametrize("tau", [1.0, 0.0])
def test_static_cache_generation_equals_dynamic_with_stage2(llava, images, tau):
    "Full ToDRE with `cache_implementation='static'`: the layers after the check fill fewer slots of their buffer, same tokens."
    model, proc = llava
    batch = proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with apply_todre(model, retain=0.25, tau=tau) as h:
        with torch.no_grad():
            a = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
            s = model.generate(**batch, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                               cache_implementation="static")
        fired, L = h.stats.stage2_fired, h.check_layer
    assert type(s.past_key_values).__name__ == "StaticCache"
    assert s.sequences.tolist() == a.sequences.tolist()
    assert (torch.stack(a.logits) - torch.stack(s.logits)).abs().max() <= 1e-4
    filled = [int(layer.cumulative_length) for layer in s.past_key_values.layers]
    assert bool(fired.all()) == (tau == 1.0)
    if tau == 1.0: assert all(f < filled[0] for f in filled[L + 1:]) and filled[:L + 1] == [filled[0]] * (L + 1)
    else: assert filled == [filled[0]] * len(filled)
