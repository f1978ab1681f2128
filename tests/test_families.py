"""The invariants of `apply_todre`, for every model family in `todre.models.base.FAMILIES`, on tiny config-built models.

Each family's module provides a random-weight stand-in (`tiny_model`) and an input builder (`tiny_inputs`, and
`tiny_video_inputs` for video families); everything below is the same for all of them."""
import importlib
import pytest, torch
from todre.config import ToDREConfig
from todre.core import apply_todre
from todre.diversity import select_diverse
from todre.models.base import FAMILIES, get_adapter, tiny_model, tiny_inputs, tiny_video_inputs

def _available(f):
    try: importlib.import_module(f"todre.models.{f.module}")
    except ModuleNotFoundError: return False
    return True

FAMS = [f for f in FAMILIES if _available(f)]
VIDEO_FAMS = [f for f in FAMS if f.video_inputs]
IDS = [f.module for f in FAMS]
QUESTIONS = ["Where is the cup?", "What is it?"]
_CACHE = {}

def _model(f, attn="sdpa"):
    key = (f.module, attn)
    if key not in _CACHE: _CACHE[key] = tiny_model(f.names[0], text_layers=6, attn_implementation=attn)   # check layer 4, one layer after it
    return _CACHE[key]

@pytest.fixture(scope="module")
def frames():
    from todre.scenes import render_scene, split_seed
    return [[render_scene(split_seed("test", 10 * v + i)).image for i in range(4)] for v in range(2)]

def _inputs(f, proc, images, idx, video=False, frames=None):
    if video: return tiny_video_inputs(f.module, proc, [frames[i] for i in idx], [QUESTIONS[i] for i in idx])
    return tiny_inputs(f.module, proc, [images[i] for i in idx], [QUESTIONS[i] for i in idx])

def _cases():
    out = [pytest.param(f, False, id=f.module) for f in FAMS]
    out += [pytest.param(f, True, id=f"{f.module}-video") for f in VIDEO_FAMS]
    return out

@torch.no_grad()
def _logits(model, inputs): return model(**inputs).logits

def _lm_inputs(model, ad):
    "Capture the shortened `input_ids` at the multimodal model and `inputs_embeds` at the language model."
    seen = {}
    def grab(name, key):
        def hook(mod, args, kwargs): seen.setdefault(name, kwargs[key] if kwargs.get(key) is not None else args[0])
        return hook
    h1 = model.model.register_forward_pre_hook(grab("ids", "input_ids"), with_kwargs=True)
    h2 = ad.language_model.register_forward_pre_hook(grab("embeds", "inputs_embeds"), with_kwargs=True)
    return seen, (h1, h2)

@pytest.mark.parametrize("f,video", _cases())
def test_retain_one_without_stage2_is_identity(f, video, images, frames):
    model, proc = _model(f)
    inputs = _inputs(f, proc, images, [0], video, frames)
    ref = _logits(model, inputs)
    with apply_todre(model, retain=1.0, stage2=False) as h:
        got = _logits(model, inputs)
        assert h.stats.n_kept == h.stats.n_visual
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5

@pytest.mark.parametrize("f,video", _cases())
def test_language_model_sees_exactly_the_kept_tokens(f, video, images, frames):
    model, proc = _model(f)
    ad = get_adapter(model)
    inputs = _inputs(f, proc, images, [0, 1], video, frames)
    with torch.no_grad(): items = ad.encode_inputs(dict(inputs))
    seen, hooks = _lm_inputs(model, ad)
    try:
        with apply_todre(model, retain=0.25, stage2=False) as h:
            _logits(model, inputs)
            st = h.stats
    finally:
        for x in hooks: x.remove()
    vis = ad.visual_mask(seen["ids"])
    assert int(vis.sum()) == sum(st.n_kept) == sum(ToDREConfig(retain=0.25).budget(t.n) for t in items)
    expected = torch.cat([t.feats[k] for t, k in zip(items, st.kept)])
    assert torch.allclose(seen["embeds"][vis].float(), expected.float(), atol=1e-6)
    for t, k, p in zip(items, st.kept, st.pivot):
        if ad.has_cls: assert p == int(t.cls_scores.masked_fill(~t.pivot_pool, float("-inf")).argmax())
        assert torch.equal(k, select_diverse(t.feats, ToDREConfig(retain=0.25).budget(t.n), pivot=p))

@pytest.mark.parametrize("f", VIDEO_FAMS, ids=[f.module for f in VIDEO_FAMS])
def test_video_budget_per_frame(f, images, frames):
    model, proc = _model(f)
    ad = get_adapter(model)
    inputs = _inputs(f, proc, images, [0], True, frames)
    with torch.no_grad(): (item,) = [t for t in ad.encode_inputs(dict(inputs)) if t.kind == "video"]
    with apply_todre(model, retain=0.25, stage2=False, video_budget="frame") as h:
        _logits(model, inputs)
        kept = h.stats.kept[0]
    for fr in range(item.n_frames):
        sel = (item.frame == fr).nonzero()[:, 0]
        assert int(torch.isin(kept, sel).sum()) == ToDREConfig(retain=0.25).budget(len(sel))

@pytest.mark.parametrize("f,video", _cases())
def test_forced_stage2_removes_visual_tokens_after_check(f, video, images, frames):
    model, proc = _model(f)
    ad = get_adapter(model)
    inputs = _inputs(f, proc, images, [0, 1], video, frames)
    with apply_todre(model, retain=0.25, tau=1.0) as h:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        st, L = h.stats, h.check_layer
    assert st.stage2_fired.all()
    mask = inputs["attention_mask"].bool()
    non_visual = (mask & ~ad.visual_mask(inputs["input_ids"])).sum(1)
    kept = torch.tensor([sum(len(k) for k, s in zip(st.kept, st.image_sample) if s == b) for b in range(2)])
    assert torch.equal(st.prefill_tokens[: L + 1], (non_visual + kept).expand(L + 1, -1))
    assert torch.equal(st.prefill_tokens[L + 1:], non_visual.expand(len(st.prefill_tokens) - L - 1, -1))
    assert len(st.decode_kv_tokens) == 2
    for step, kv in enumerate(st.decode_kv_tokens, 1):
        assert torch.equal(kv[L + 1:], (non_visual + step).expand(len(kv) - L - 1, -1))
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    for j in range(L + 1, ad.n_layers):
        assert cache.layers[j].keys.shape[2] == int(non_visual.max()) + 2

@pytest.mark.parametrize("tau", [0.0, 1.0])
@pytest.mark.parametrize("f,video", _cases())
def test_batch_equals_samples(f, video, tau, images, frames):
    model, proc = _model(f)
    with apply_todre(model, retain=0.25, tau=tau) as h:
        def run(idx):
            inp = _inputs(f, proc, images, idx, video, frames)
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

@pytest.mark.parametrize("stage2", [False, True])
@pytest.mark.parametrize("f,video", _cases())
def test_cached_generate_equals_recompute(f, video, stage2, images, frames):
    model, proc = _model(f)
    inputs = _inputs(f, proc, images, [0], video, frames)
    with apply_todre(model, retain=0.25, stage2=stage2, tau=1.0):
        with torch.no_grad():
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                               use_cache=False)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() <= 1e-4

@pytest.mark.parametrize("f", FAMS, ids=IDS)
def test_remove_restores_model(f, images):
    model, proc = _model(f)
    inputs = _inputs(f, proc, images, [0])
    ref = _logits(model, inputs)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = set(model.__dict__)
    h = apply_todre(model, tau=1.0)
    _logits(model, inputs)
    with torch.no_grad(): model.generate(**inputs, max_new_tokens=2, do_sample=False)
    h.remove()
    assert set(model.__dict__) == attrs
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(_logits(model, inputs), ref)

@pytest.mark.parametrize("f", FAMS, ids=IDS)
def test_pivot_and_positions_choices(f, images):
    model, proc = _model(f)
    ad = get_adapter(model)
    inputs = _inputs(f, proc, images, [0])
    if ad.has_cls:
        for layer in (0, -1):                                   # every vision layer can give the [CLS] row
            with apply_todre(model, cls_layer=layer, stage2=False): _logits(model, inputs)
    else:
        with pytest.raises(ValueError, match="needs a vision encoder with a \\[CLS\\] token"): apply_todre(model, pivot="cls")
    if ad.position_scheme == "mrope":
        with pytest.raises(ValueError, match="contiguous"): apply_todre(model, positions="contiguous")
    for pivot in ("random", "center", "farthest"):
        with apply_todre(model, pivot=pivot, stage2=False) as h:
            _logits(model, inputs)
            assert h.stats.n_kept[0] == ToDREConfig().budget(h.stats.n_visual[0])

@pytest.mark.parametrize("f", FAMS, ids=IDS)
def test_stage2_ratios_equal_eq8_on_eager_attention(f, images):
    "The recomputed attention rows of the check layer give exactly Eq. 8 of the eager attention map."
    from todre.decoder import cross_modal_ratios, token_types
    model, proc = _model(f, "eager")
    ad = get_adapter(model)
    inputs = _inputs(f, proc, images, [0])
    with apply_todre(model, retain=1.0, tau=0.0) as h:
        with torch.no_grad(): out = model(**inputs, output_attentions=True)
        st, L = h.stats, h.check_layer
    types = token_types(ad.visual_mask(inputs["input_ids"]), inputs["attention_mask"])
    t2v, v2t = cross_modal_ratios(out.attentions[L], types)
    assert torch.allclose(st.alpha_t2v, t2v, atol=1e-5) and torch.allclose(st.alpha_v2t, v2t, atol=1e-5)
