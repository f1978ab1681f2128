"Per-layer Eq. 8 curves and visual-token knockout, on the tiny config-built LLaVA (random weights)."
import pytest, torch
from todre.migration import alpha_curves, knockout_curve
from todre.decoder import token_types, cross_modal_ratios, SYSTEM, TEXT
from conftest import PROMPTS

TWO_IMAGES = "USER: <image>\nCompare it with <image>\nWhich? ASSISTANT:"

def _hooks(model):
    lm = model.model.language_model
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.modules())

@pytest.fixture(scope="module")
def batch(llava, images):
    _, proc = llava
    b = proc(images=images[:2], text=PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert b["attention_mask"][:, 0].tolist() == [1, 0]          # the second prompt is left-padded
    return b

@pytest.fixture(scope="module")
def eager_attn(llava_eager, batch):
    with torch.no_grad(): return llava_eager[0](**batch, output_attentions=True).attentions

def _types(model, inputs):
    return token_types(inputs["input_ids"] == model.config.image_token_id, inputs["attention_mask"])

def test_alpha_curves_match_eager_maps_at_every_layer(llava, eager_attn, batch):
    model, _ = llava
    before = _hooks(model)
    got = alpha_curves(model, batch)
    assert _hooks(model) == before
    assert got["t2v"].shape == got["v2t"].shape == (len(model.model.language_model.layers), 2)
    types = _types(model, batch)
    for l, (t2v, v2t) in enumerate(cross_modal_ratios(a, types) for a in eager_attn):
        torch.testing.assert_close(got["t2v"][l], t2v, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["v2t"][l], v2t, atol=1e-5, rtol=0)
    assert (got["v2t"] == 0).all()                                # image before text: causal mask

def test_two_images_give_nonzero_v2t(llava, images):
    model, proc = llava
    two = proc(images=images[:2], text=TWO_IMAGES, return_tensors="pt")
    got = alpha_curves(model, two)
    assert (got["v2t"] > 0).all() and (got["v2t"] < 1).all()   # the second image's queries see "Compare it with"

def _first(batch):
    "Sample 0 alone (it is the longest, so it carries no padding in the batch)."
    return {k: v[:1] for k, v in batch.items()}

def test_system_as_text_variant(llava, eager_attn, batch):
    model, _ = llava
    one = _first(batch)
    got = alpha_curves(model, one, variant="system_as_text")
    types = _types(model, batch).masked_fill(_types(model, batch) == SYSTEM, TEXT)
    for l in (0, 5): torch.testing.assert_close(got["v2t"][l], cross_modal_ratios(eager_attn[l], types)[1][:1], atol=1e-5, rtol=0)
    assert (got["v2t"] > 0).all()
    with pytest.raises(ValueError): alpha_curves(model, batch, variant="nope")

def test_knockout_curve(llava, batch):
    model, _ = llava
    before = _hooks(model)
    n = len(model.model.language_model.layers)
    ko = knockout_curve(model, _first(batch), layers=[0, n - 1], progress=False)
    assert _hooks(model) == before
    assert ko["layer"] == [0, n - 1]
    assert ko["kl"].shape == ko["top1_same"].shape == (2, 1)
    assert (ko["kl"] >= 0).all()
    assert ko["kl"][1].tolist() == [0.0]                    # nothing left to drop after the last layer
    assert ko["top1_same"][1].all()
    assert (ko["kl"][0] > 0).all()
