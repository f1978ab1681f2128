"""The paper notebooks' `#| hub` cells, run without the Hub.

CI reaches neither the paper's checkpoints nor its benchmarks, so `nbdev_test` skips these cells. Here each cell's own
code runs with the tiny random-weight model of the checkpoint's family (`todre.models.base.tiny_names()`: LLaVA-NeXT,
LLaVA-NeXT-Video, Qwen2.5-VL, InternVL) in place of the checkpoint, and sample images (or a few of them as the frames of a
video) in place of the benchmark rows: that checks the cells would run on the real models (names, APIs, AnyRes, tiles,
video inputs, settings that depend on the model's depth), not their numbers.
"""
import ast, json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

import todre.cli, todre.evaluate, todre.loading
from todre.models.base import tiny_names
from todre.timing import prompt_template
from todre.tiny import sample_image

NBS = Path(__file__).parents[1] / "nbs"
HUB_ID = "llava-hf/llava-v1.6-vicuna-7b-hf"
HUB_IDS = {HUB_ID: "tiny-llava-next",                          # the paper's checkpoints (or their stand-ins) -> tiny models
           "llava-hf/LLaVA-NeXT-Video-7B-hf": "tiny-llava-next-video",
           "Qwen/Qwen2.5-VL-7B-Instruct": "tiny-qwen2.5-vl",
           "OpenGVLab/InternVL3-8B-hf": "tiny-internvl"}
NOTEBOOKS = {"paper/01_fig1_token_maps": {HUB_ID}, "paper/02_fig2_information_migration": {HUB_ID},
             "paper/03_supp_fig1_decode_attention": {HUB_ID}, "paper/04_supp_fig3_retention_grid": {HUB_ID},
             "paper/05_table1_methods": {HUB_ID}, "paper/09_supp_table3_check_layer": {HUB_ID},
             "paper/11_table2_video": {"llava-hf/LLaVA-NeXT-Video-7B-hf"},
             "paper/12_table3_qwen_internvl": {"Qwen/Qwen2.5-VL-7B-Instruct", "OpenGVLab/InternVL3-8B-hf"}}


def code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _constant(node):
    "An assignment to UPPER_CASE names only (a notebook's settings, such as the checkpoint it names)."
    if not isinstance(node, ast.Assign): return False
    names = [e for t in node.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
    return all(isinstance(e, ast.Name) and e.id.isupper() for e in names)


def definitions_only(src):
    "True for a cell that only imports, defines and sets UPPER_CASE constants, so it is cheap and safe to run on its own."
    body = ast.parse(src).body
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) or _constant(n) for n in body)


def fake_benchmark(name, n=None, seed=0, progress=True):
    "One row of `name` in the form `todre.evaluate.load_benchmark` returns."
    img, short = sample_image("coffee"), todre.evaluate._SHORT
    if name == "mme":
        return [dict(image=img, question="Is there a cup in the image?" + short, answer="Yes", image_id="coffee", category="existence")]
    if name == "scienceqa":
        q = "Which object is shown?\nA. a cup\nB. a dog\nAnswer with the option's letter from the given choices directly."
        return [dict(image=img, question=q, answer="A")]
    return [dict(image=img, question="Is there a cup in the image?" + short, answer="yes")]


def fake_video_benchmark(name, n=None, frames=20, seed=0, root=None):
    "One multiple-choice row of a video benchmark, in the form the Table 2 notebook's `load_video_benchmark` returns."
    video = [sample_image(s).resize((112, 112)) for s in ("coffee", "astronaut", "chelsea", "rocket")]
    return [dict(frames=video, question="What is in the video?\nA. a cup\nB. a dog\nAnswer with the option's letter "
                 "from the given choices directly.", answer="A")]


@pytest.fixture
def offline_hub(monkeypatch):
    "Stand-ins for the Hub; yields the model names the cells asked for."
    real, asked = todre.loading.load_model, []
    def load_model(model="testbed", device="cpu", **kwargs):
        asked.append(model)
        name = HUB_IDS.get(model, model)
        m, proc, prompt = real(name, device="cpu")
        if prompt is None:                               # tiny models of the chat families: their own format, like a Hub chat template
            prompt = lambda q, kind="image", m=m: prompt_template(m, kind)(q)
        return m, proc, prompt
    monkeypatch.setattr(todre.cli, "load_model", load_model)
    monkeypatch.setattr(todre.loading, "load_model", load_model)
    monkeypatch.setattr(todre.evaluate, "load_benchmark", fake_benchmark)
    yield asked
    plt.close("all")


def test_definitions_only():
    assert definitions_only("import math\ndef f(n): return n")
    assert not definitions_only("x = compare(model)")
    assert definitions_only("MODEL, N = 'a/b', 3\nSETTINGS = [1]") and not definitions_only("MODEL, n = 'a/b', 3")


def test_hub_ids_have_tiny_models():
    assert set(HUB_IDS.values()) <= set(tiny_names())


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_hub_cells_run_offline(name, offline_hub, monkeypatch):
    path = NBS / f"{name}.ipynb"
    cells = code_cells(path)
    assert any(c.startswith("#| hub") for c in cells), f"{name} has no #| hub cell"
    monkeypatch.chdir(path.parent)
    ns = {}
    exec(cells[0], ns)                                   # the notebook's imports
    for src in cells[1:]:                                # then, in order, its definitions and its hub cells
        if src.startswith("#| hub") or definitions_only(src): exec(src, ns)
        if "load_video_benchmark" in ns: ns["load_video_benchmark"] = fake_video_benchmark   # the videos are on the Hub too
    assert offline_hub and set(offline_hub) == NOTEBOOKS[name]   # every hub cell loaded the paper's checkpoint (or its stand-in)


def test_hub_ablation_rows_per_benchmark(offline_hub, monkeypatch):
    asked = []
    monkeypatch.setattr(todre.evaluate, "load_benchmark", lambda b, n=None, **kwargs: asked.append((b, n)) or [])
    monkeypatch.setattr(todre.evaluate, "ablation_scores", lambda model, processor, settings, data, **kwargs: data)
    for n in (500, None):
        todre.evaluate.hub_ablation([("unpruned", 1.0, None)], n=n, progress=False)
    assert asked == [("mme", 250), ("scienceqa", 500), ("gqa", 500), ("pope", 500),    # MME: n // 2 images, both questions
                     ("mme", None), ("scienceqa", None), ("gqa", None), ("pope", None)]
