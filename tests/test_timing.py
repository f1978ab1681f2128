"The timer and the generate profiler, on CPU with fake workloads and the tiny LLaVA."
import dataclasses, time, pytest, torch
from todre.core import apply_todre
from todre.timing import Timer, Timing, timeit, profile_generate, device_info, device_of, cache_nbytes, random_weights_model, prompt_template
from todre.flops import SHAPES, shape_from_config
from conftest import PROMPTS

torch.set_num_threads(1)
KEYS = {"vision", "select", "prefill", "decode", "decode_per_token", "time_to_first_token", "total", "other",
        "new_tokens", "decode_steps", "batch", "device", "warmup", "repeats", "peak_memory_bytes", "memory_before_bytes",
        "kv_cache_bytes", "kv_cache_bytes_per_layer", "prefill_tokens", "stage2_fired", "runs"}

def test_timing_statistics():
    t = Timing.from_values([5.0, 1.0, 3.0, 2.0, 4.0], "cpu")
    assert (t.median, t.p10, t.p90) == (3.0, pytest.approx(1.4), pytest.approx(4.6))
    assert t.values == [5.0, 1.0, 3.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="no timings"): Timing.from_values([])

def test_timer_with_fake_function():
    calls = []
    def fake(): calls.append(1); time.sleep(0.003)
    t = timeit(fake, warmup=3, repeats=4, device="cpu")
    assert len(calls) == 7 and len(t.values) == 4 and t.device == "cpu"
    assert 0.003 <= t.p10 <= t.median <= t.p90 < 0.1
    t2 = Timer(torch.zeros(1), warmup=0, repeats=2)(lambda x: x + 1, torch.ones(3))
    assert len(t2.values) == 2 and all(v >= 0 for v in t2.values)
    with pytest.raises(ValueError, match="repeats >= 1"): Timer("cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup >= 0"): Timer("cpu", warmup=-1)

def test_device_helpers(llava):
    assert device_of(llava[0]) == torch.device("cpu")
    info = device_info("cpu")
    assert {"device", "torch", "transformers", "cuda", "threads", "date"} <= set(info)
    assert info["torch"] == torch.__version__

def _hooks(model): return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

def _check(r, new_tokens):
    assert set(r) == KEYS
    assert r["prefill"] + r["decode"] <= r["total"]
    for run in r["runs"]:
        assert run["prefill"] + run["decode"] + run["vision"] + (run["select"] or 0) <= run["total"]
        assert run["time_to_first_token"] <= run["total"]
    assert r["new_tokens"] == new_tokens and r["decode_steps"] == new_tokens - 1
    assert r["peak_memory_bytes"] is None and r["memory_before_bytes"] is None   # CPU
    assert r["vision"] > 0 and r["prefill"] > 0 and r["decode_per_token"] > 0
    assert len(r["runs"]) == r["repeats"]

def test_profile_generate_baseline_and_todre(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(): model.generate(**inputs, max_new_tokens=1)    # transformers' own lazy hooks
    before = _hooks(model)
    base = profile_generate(model, inputs, max_new_tokens=4, warmup=1, repeats=2)
    assert _hooks(model) == before
    _check(base, 4)
    assert base["select"] is None and base["stage2_fired"] is None
    n = int(inputs["attention_mask"].sum())
    assert base["prefill_tokens"] == [[n]] * 8
    with apply_todre(model, retain=0.10, tau=1.0) as h:
        with_handle = _hooks(model)
        r = profile_generate(model, inputs, max_new_tokens=4, warmup=0, repeats=2)
        assert _hooks(model) == with_handle
        assert r["prefill_tokens"] == h.stats.prefill_tokens.tolist()
    _check(r, 4)
    assert r["select"] > 0 and r["stage2_fired"] == [True]
    assert r["prefill_tokens"][0][0] > r["prefill_tokens"][-1][0]
    assert r["kv_cache_bytes"] < base["kv_cache_bytes"]
    assert r["kv_cache_bytes_per_layer"][-1] < r["kv_cache_bytes_per_layer"][0]

def test_profile_generate_removes_hooks_on_error(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(): model.generate(**inputs, max_new_tokens=1)
    before = _hooks(model)
    with pytest.raises(Exception): profile_generate(model, inputs, max_new_tokens=2, repeats=1, warmup=0, no_such_argument=1)
    assert _hooks(model) == before

def test_cache_nbytes(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad(): out = model(**inputs, use_cache=True)
    L = inputs["input_ids"].shape[1]
    assert cache_nbytes(out.cache) == [2 * 2 * L * 16 * 4] * 8     # keys+values, 2 kv heads, head_dim 16, fp32

@pytest.mark.parametrize("name", list(SHAPES))
def test_random_weights_model_on_meta(name):
    model, proc = random_weights_model(name, device="meta")
    assert shape_from_config(model) == SHAPES[name]
    assert next(model.parameters()).dtype == torch.bfloat16
    image_token = getattr(proc, "image_token", None) or "<image>"
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids(image_token)
    assert len(proc.tokenizer) <= model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="unknown shape"): random_weights_model("nope", device="meta")

@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "internvl2-8b", "llava-next-7b"])
def test_random_weights_model_layer_overrides(name):
    model, proc = random_weights_model(name, device="meta", layers=2, vision_layers=3)
    s = shape_from_config(model)
    assert (s.decoder.layers, s.vision.layers) == (2, 3)
    assert s.decoder == dataclasses.replace(SHAPES[name].decoder, layers=2)
    if name == "qwen2.5-vl-7b": assert (s.vision.window, s.vision.full_layers) == (64, ())   # no full-attention layer below 7: every layer windowed
    assert type(model).__name__ == {"qwen2.5-vl-7b": "Qwen2_5_VLForConditionalGeneration", "internvl2-8b": "InternVLForConditionalGeneration",
                                    "llava-next-7b": "LlavaNextForConditionalGeneration"}[name]

def test_real_shape_processors_fit_the_models(images):
    for name, want in {"qwen2.5-vl-7b": 576, "internvl2-8b": 5 * 256}.items():
        model, proc = random_weights_model(name, device="meta", layers=1, vision_layers=1)
        x = proc(images=[images[0].resize((672, 672))], text=[prompt_template(model)("Is there a cup?")], return_tensors="pt")
        assert int((x["input_ids"] == model.config.image_token_id).sum()) == want
    assert random_weights_model("internvl2-8b", device="meta", layers=1)[0].config.text_config.model_type == "llama"

def test_prompt_template():
    assert prompt_template("tiny-llava")("Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert prompt_template("tiny-qwen2.5-vl")("Hi?").endswith("<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")
    assert "<video>" in prompt_template("tiny-llava-next-video", "video")("What happens?")
    with pytest.raises(ValueError, match="images only"): prompt_template("tiny-internvl", "video")
