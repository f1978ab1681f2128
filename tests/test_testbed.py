"The testbed model: architecture, tokenizer, training loop, and the shipped weights against their model card."
import json, time
import numpy as np, pytest, torch
from todre.scenes import question_vocabulary, ANSWERS, render_scene, split_seed
from todre.testbed import build_testbed, make_batch, train, TESTBED_PATH, PROMPT
from todre.testbed import testbed_tokenizer as make_tokenizer

def test_architecture():
    model, proc = build_testbed()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert len(model.model.language_model.layers) >= 12
    vc = model.config.vision_config
    assert (vc.image_size, vc.patch_size) == (336, 14)
    inputs = proc(images=render_scene(1).image, text=PROMPT.format(question="how many objects are there?"), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576

def test_every_answer_is_one_token():
    tok = make_tokenizer()
    for fam, answers in ANSWERS.items():
        for a in answers: assert len(tok(a, add_special_tokens=False)["input_ids"]) == 1, (fam, a)
    ids = tok(" ".join(question_vocabulary()), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids

def test_batch_labels_are_answers():
    _, proc = build_testbed()
    b = make_batch([split_seed("train", 3)], proc, np.random.default_rng(0), max_questions=2)
    lab = b["labels"][0][b["labels"][0] >= 0]
    assert len(lab) == 4 and lab[1] == proc.tokenizer.eos_token_id and lab[3] == proc.tokenizer.eos_token_id
    assert b["colour"].shape == (1, 576) and b["present"].shape == (1, 24)
    m = b["attention_mask"][0, 0]
    first, second = (b["labels"][0] >= 0).nonzero()[[0, 2], 0].tolist()
    assert not m[second, first] and m[second, 5]          # a block sees the image, not the other block

def test_training_is_deterministic():
    logs = [train(steps=2, batch_size=1, max_questions=2, vision_steps=1, vision_batch=1, progress=False, log_every=1)[2]["log"] for _ in range(2)]
    assert [r.get("answer", r["shape"]) for r in logs[0]] == [r.get("answer", r["shape"]) for r in logs[1]]

def test_pointer_losses_match_the_model_attention():
    "The losses recompute attention rows from q and k; they must equal what an eager forward pass attends."
    from todre.testbed import _lm_losses, _embed
    model, proc = build_testbed()                         # training runs SDPA, which takes the packed boolean mask as it is
    eager, _ = build_testbed(attn_implementation="eager")  # the same weights, attention weights returned
    b = make_batch([split_seed("train", i) for i in range(2)], proc, np.random.default_rng(1), max_questions=6)
    tokens = torch.randn(2, 576, model.config.text_config.hidden_size) * 0.1    # moderate logits: no probability underflows
    layers = dict(objects=2, count=3)
    with torch.no_grad():
        _, ptr, _ = _lm_losses(model, tokens, b, layers)
        additive = torch.zeros(b["attention_mask"].shape).masked_fill(~b["attention_mask"], torch.finfo(torch.float32).min)   # eager adds its mask
        att = eager.model.language_model(inputs_embeds=_embed(eager, b["input_ids"], tokens), attention_mask=additive,
                                         position_ids=b["position_ids"], output_attentions=True).attentions
    r, qp, t, _ = b["pointers"]["count"]                  # evenly over its targets: mean -log attention per target, heads averaged
    assert len(r) and t[:, 0].all()
    a = att[3][r, :, qp]                                  # (N, heads, L)
    want = -(torch.where(t[:, None], a.clamp_min(1e-30).log(), 0).sum(-1) / t.sum(-1, keepdim=True)).mean()
    assert torch.allclose(ptr["count"], want, rtol=1e-4)
    r, qp, t, _ = b["pointers"]["objects"]                # all of its mass on the named objects' tokens
    want = -torch.log((att[2][r, :, qp] * t[:, None]).sum(-1).mean(1) + 1e-6).mean()
    assert torch.allclose(ptr["objects"], want, rtol=1e-4)

needs_weights = pytest.mark.skipif(not (TESTBED_PATH / "config.json").exists(), reason="no trained testbed shipped")

@needs_weights
def test_load_is_fast_and_offline():
    from todre.testbed import load
    t = time.perf_counter(); model, proc = load(); dt = time.perf_counter() - t
    assert dt < 5, f"load took {dt:.1f} s"
    assert (TESTBED_PATH / "model.safetensors").stat().st_size < 30e6

@needs_weights
def test_shipped_weights_reproduce_the_recorded_smoke_answers():
    "The first test scenes' answers, recorded when the weights were saved, come out the same."
    from todre.testbed import load, answer
    from todre.evaluate import benchmark_samples
    rec = json.loads((TESTBED_PATH / "results.json").read_text())["smoke"]
    model, proc = load()
    samples = benchmark_samples(rec["n_scenes"], "test", 0)
    preds = answer(model, proc, [s.image for s, _ in samples], [q.question for _, q in samples])
    same = sum(a == b for a, b in zip(preds, rec["predictions"]))
    assert len(preds) == len(rec["predictions"]) and same >= 0.95 * len(preds)   # float near-ties may differ across threads
