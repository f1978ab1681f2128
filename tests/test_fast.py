"""The fast paths (`todre.fast`): the graphed generator must give the model's own greedy tokens, and the fused
selection kernel the loop's indices. On a CPU the generator runs its static-cache code without graphs; the kernel
runs in Triton's interpreter where Triton is installed (it is not a CPU requirement, so that test may skip)."""
import importlib.util, os, subprocess, sys, textwrap

import pytest
import torch

from todre.core import apply_todre
from todre.fast import GraphedGenerator, lm_inputs
from todre.tiny import sample_image, tiny_llava

PROMPTS = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nWhich colour is the largest object here? ASSISTANT:"]


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@pytest.mark.parametrize("batch", [1, 2])
def test_graphed_generator_matches_generate(kind, batch):
    torch.manual_seed(0)
    model, proc = tiny_llava(kind)
    inputs = proc(images=[sample_image()] * batch, text=PROMPTS[:batch], return_tensors="pt", padding=True)
    gen, n = GraphedGenerator(model), 4
    ref = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
    assert torch.equal(gen.generate(inputs, n), ref)
    with apply_todre(model, retain=0.25, stage2=False) as h:
        ref = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, -n:]
        assert torch.equal(gen.generate(inputs, n, handle=h), ref)
        emb, mask, pos, stats = lm_inputs(model, inputs)       # the attached handle prunes by default
        assert emb.shape[1] == mask.shape[1] == pos.shape[1] < inputs["input_ids"].shape[1]


def test_graphed_generator_refuses_stage2():
    model, proc = tiny_llava("llava")
    inputs = proc(images=[sample_image()], text=PROMPTS[:1], return_tensors="pt")
    with apply_todre(model) as h, pytest.raises(ValueError, match="stage 1 only"):
        GraphedGenerator(model).generate(inputs, 2, handle=h)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU wheels of torch do not ship it)")
def test_fused_kernel_matches_loop_in_interpreter():
    code = textwrap.dedent("""
        import torch
        from todre.diversity import select_diverse
        g = torch.Generator().manual_seed(1)
        for trial in range(4):
            for obj in ("maxsum", "kcenter"):
                n = 50 + 17 * trial
                x = torch.randn(3, n, 24, generator=g)
                piv = torch.randint(0, n, (3,), generator=g)
                ks = torch.tensor([7, 3, 11])
                mask = torch.rand(3, n, generator=g) > 0.3
                mask[torch.arange(3), piv] = True
                a = select_diverse(x, ks, objective=obj, pivot=piv, mask=mask, impl="loop")
                b = select_diverse(x, ks, objective=obj, pivot=piv, mask=mask, impl="fused")
                assert torch.equal(a, b), (trial, obj, a, b)
        print("ok")""")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert r.stdout.strip() == "ok", r.stderr[-3000:]
