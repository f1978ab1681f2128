"""Adversarial use of `apply_todre`: every case either gives the right answer (checked against the unpruned model or a
hand-built reference) or stops at once with an error that names the problem."""
import copy, io, pickle, subprocess, sys, threading, warnings
import pytest, torch
import torch.nn.functional as F
from todre.config import ToDREConfig
from todre.core import apply_todre
from todre.decoder import cross_modal_ratios, token_types
from todre.tiny import tiny_llava, sample_image

PROMPTS = ["USER: <image>\nWhere is the cup? ASSISTANT:", "USER: <image>\nWhat? ASSISTANT:"]

@pytest.fixture(scope="module")
def tiny():
    return tiny_llava("llava", text_layers=6)          # default check layer 4; layer 5 follows it

@pytest.fixture(scope="module")
def batch(tiny, images):
    model, proc = tiny
    return proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)

# ---- 1. copies and pickles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copy_or_pickle_while_attached_is_refused_clearly(tiny, batch, how):
    model, _ = tiny
    # (transformers 5.x itself cannot pickle a model that has run a forward: its output-capturing hooks are local
    # functions; todre's guard comes first in the model's state, so the message names todre's part)
    with apply_todre(model, retain=0.25) as h:
        def act():
            if how == "deepcopy": copy.deepcopy(model)
            elif how == "pickle": pickle.dumps(model)
            else: torch.save(model, io.BytesIO())
        with pytest.raises(TypeError, match=r"call handle\.remove\(\) first"): act()
        with torch.no_grad(): model(**batch)                     # the attached model is untouched by the attempt
        assert h.stats.n_kept == [144, 144]
    clone = copy.deepcopy(model)                                 # after remove(), a copy works and attaches on its own
    with apply_todre(clone, retain=0.25) as hc, apply_todre(model, retain=0.5) as hm:
        with torch.no_grad(): clone(**batch); model(**batch)
        assert hc.stats.n_kept == [144, 144] and hm.stats.n_kept == [288, 288]

def test_state_dict_while_attached(tiny):
    model, _ = tiny
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_todre(model):
        sd = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)

# ---- 2. stage2_fired at the last layer --------------------------------------------------------------------------
def test_stage2_at_last_layer_reports_nothing_dropped(tiny, batch):
    model, _ = tiny
    n = len(model.model.language_model.layers)
    with pytest.warns(UserWarning, match="last layer"):
        h = apply_todre(model, ToDREConfig(check_layer=n - 1, tau=1.0))
    with h:
        with torch.no_grad(): model(**batch)
        st = h.stats
    assert st.stage2_decision.all() and not st.stage2_fired.any()
    assert "nothing follows the last layer" in st.summary()
    assert torch.equal(st.prefill_tokens[-1], st.prefill_tokens[0])   # every layer saw the same tokens

def test_stage2_fired_means_tokens_were_dropped(tiny, batch):
    model, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no warning: a layer follows the default check layer
        h = apply_todre(model, tau=1.0)
    with h:
        with torch.no_grad(): model(**batch)
        st = h.stats
    assert st.stage2_fired.all()
    assert (st.prefill_tokens[5:] < st.prefill_tokens[:5].min(0).values).all()

# ---- 3. plain forward: logits at the prompt's positions -----------------------------------------------------
def test_forward_logits_have_the_prompt_length(tiny, batch):
    model, _ = tiny
    with torch.no_grad(): ref = model(**batch).logits
    with apply_todre(model, retain=0.1, stage2=False) as h:
        with torch.no_grad(): got = model(**batch).logits
        pos = h.stats.positions
    assert got.shape == ref.shape
    computed = torch.zeros(got.shape[:2], dtype=torch.bool).scatter(1, pos.clamp(min=0), pos >= 0)
    assert torch.isnan(got[~computed]).all() and not torch.isnan(got[computed]).any()
    assert computed[:, -1].all()                                  # left padding: the next-token logits are at -1
    # every text position after the image is computed; the last one predicts the next token of the pruned prompt
    with apply_todre(model, retain=0.1, stage2=False):
        with torch.no_grad(): nxt = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                                                   return_dict_in_generate=True).logits[0]
    assert (nxt - got[:, -1]).abs().max() <= 1e-5

def test_forward_identity_at_retain_one(tiny, batch):
    model, _ = tiny
    with torch.no_grad(): ref = model(**batch).logits
    with apply_todre(model, retain=1.0, stage2=False):
        with torch.no_grad(): got = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-5

# ---- 4. threads ---------------------------------------------------------------------------------------------
def test_one_handle_from_two_threads(tiny, images):
    model, proc = tiny
    ins = [proc(images=[images[i % 2]], text=[PROMPTS[i % 2]], return_tensors="pt") for i in range(4)]
    with apply_todre(model, retain=0.1, check_layer=1, tau=0.0) as h:
        refs, ref_kept = [], []
        for x in ins:
            with torch.no_grad(): refs.append(model.generate(**x, max_new_tokens=4, do_sample=False))
            ref_kept.append(h.stats.kept)
        got, kept, errors = [None] * 4, [None] * 4, []
        def work(i):
            try:
                for _ in range(3):
                    with torch.no_grad(): got[i] = model.generate(**ins[i], max_new_tokens=4, do_sample=False)
                    kept[i] = h.stats.kept                    # this thread's own last call
            except Exception as e: errors.append(e)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
    assert not errors, errors
    for i in range(4):
        assert torch.equal(got[i], refs[i])
        assert all(torch.equal(a, b) for a, b in zip(kept[i], ref_kept[i]))

# ---- 5. labels: a loss over the kept tokens -------------------------------------------------------------------
def test_labels_give_the_loss_over_the_kept_tokens(tiny, batch):
    model, _ = tiny
    # supervised fine-tuning style: a label on every token after the image (the question and what follows), -100 before
    after = (batch["input_ids"] == model.config.image_token_id).long().cumsum(1).bool() & (batch["input_ids"] != model.config.image_token_id)
    labels = batch["input_ids"].masked_fill(~after, -100)
    with torch.no_grad(): ref = model(**batch, labels=labels).loss
    with apply_todre(model, retain=1.0, stage2=False):
        with torch.no_grad(): same = model(**batch, labels=labels).loss
    assert torch.allclose(same, ref, atol=1e-6)
    with apply_todre(model, retain=0.1, check_layer=1, tau=1.0) as h:
        out = model(**batch, labels=labels)
        pos = h.stats.positions
    # reference: the next-token loss over the positions the language model received, in their order
    lg, lb = [], []
    for b in range(pos.shape[0]):
        p = pos[b][pos[b] >= 0]
        lg.append(out.logits[b, p][:-1]); lb.append(labels[b, p][1:])
    ref_loss = F.cross_entropy(torch.cat(lg).float(), torch.cat(lb), ignore_index=-100)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5)
    out.loss.backward()                                          # pruned fine-tuning: gradients reach the projector
    g = next(model.model.multi_modal_projector.parameters()).grad
    assert g is not None and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)

# ---- 6. continuing from a cache ------------------------------------------------------------------------------
def test_generate_from_a_cache_is_refused_with_the_reason(tiny, batch):
    model, _ = tiny
    with apply_todre(model, retain=0.1, stage2=False):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            nxt = dict(batch, input_ids=out.sequences,
                       attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1))
            with pytest.raises(ValueError, match="pruned coordinates"):
                model.generate(**nxt, cache=cache, max_new_tokens=2, do_sample=False)

def test_manual_decoding_after_a_pruned_forward(tiny, batch):
    "A hand-written greedy loop on the cache of a pruned forward gives generate's tokens (prompt-length masks are mapped)."
    model, _ = tiny
    for stage2 in (False, True):
        with apply_todre(model, retain=0.1, check_layer=1, tau=1.0, stage2=stage2):
            with torch.no_grad():
                ref = model.generate(**batch, max_new_tokens=4, do_sample=False)
                out = model(**batch, use_cache=True)
                mask, toks = batch["attention_mask"], []
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(4):
                    toks.append(nxt)
                    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                    o = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                    cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.cat(toks, 1).tolist() == ref[:, batch["input_ids"].shape[1]:].tolist()

def test_pixels_with_a_filled_cache_are_refused(tiny, batch):
    model, _ = tiny
    with apply_todre(model, retain=0.1, stage2=False):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            with pytest.raises(ValueError, match="only with the first call"):
                model(**batch, cache=out.past_key_values)

# ---- 8. configuration mistakes --------------------------------------------------------------------------------
def test_config_mistakes(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match=r"apply_todre\(model, retain=0.1\)"): apply_todre(model, 0.1)
    for bad in (dict(retain=True), dict(k=True), dict(stage2="yes")):
        with pytest.raises((TypeError, ValueError), match=list(bad)[0]): ToDREConfig(**bad)
    with apply_todre(model):
        with pytest.raises(RuntimeError, match="already attached"): apply_todre(model)

# ---- 9. the command line: one line, exit code 2 -----------------------------------------------------------------
@pytest.mark.parametrize("args,says", [(["--model", "does/not/exist"], "no model 'does/not/exist'"),
                                       (["--image", "scene:abc"], "scene:N needs a number"),
                                       (["--retain", "2"], "retain")])
def test_cli_mistakes_are_one_line(args, says):
    r = subprocess.run([sys.executable, "-c", "from todre.cli import main; main()", "demo", *args, "--out", ""], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert says in r.stderr.strip().splitlines()[-1], r.stderr
    assert "usage: todre demo" in r.stderr or len(r.stderr.strip().splitlines()) == 1

# ---- α_{v→t}: non-zero and deciding ---------------------------------------------------------------------------
def test_alpha_v2t_is_nonzero_and_decides(images):
    "Two images in one prompt: the second image's tokens see the text between the images, so α_{v→t} > 0."
    model, proc = tiny_llava("llava", text_layers=4, attn_implementation="eager")
    between = " ".join(["the first picture shows a table with a cup on it, and the next one is a photo"] * 6)
    text = f"USER: <image>\n{between}: <image>\nWhere is the cup? ASSISTANT:"
    x = proc(images=images, text=[text], return_tensors="pt")
    with apply_todre(model, retain=1.0, check_layer=1, tau=0.0) as h:
        with torch.no_grad(): out = model(**x, output_attentions=True)
        t2v, v2t = h.stats.alpha_t2v, h.stats.alpha_v2t
    types = token_types(x["input_ids"] == model.config.image_token_id, x["attention_mask"])
    e_t2v, e_v2t = cross_modal_ratios(out.attentions[1], types)
    assert torch.allclose(t2v, e_t2v, atol=1e-5) and torch.allclose(v2t, e_v2t, atol=1e-5)
    assert float(v2t) > 1e-3
    # with four tokens kept per image, the text queries hardly look at the image, the second image's tokens mostly
    # look at the text before them: α_{t→v} < τ < α_{v→t}, so the rule "both" keeps the tokens because of α_{v→t}
    with apply_todre(model, k=4, check_layer=1, tau=0.0) as h:
        with torch.no_grad(): model(**x)
        t2v, v2t = float(h.stats.alpha_t2v[0]), float(h.stats.alpha_v2t[0])
    assert t2v < v2t, (t2v, v2t)
    tau = (t2v + v2t) / 2
    for rule, fires in (("both", False), ("t2v", True)):
        with apply_todre(model, k=4, check_layer=1, tau=tau, rule=rule) as h:
            with torch.no_grad(): model(**x)
            assert bool(h.stats.stage2_fired[0]) == fires, rule
    with apply_todre(model, k=4, check_layer=1, tau=v2t + 1e-3) as h:
        with torch.no_grad(): model(**x)
        assert bool(h.stats.stage2_fired[0])
