"""The paper notebooks' `#| hub` cells, run without the Hub.

CI reaches neither the paper's checkpoint nor its benchmarks, so `nbdev_test` skips these cells. Here each cell's own
code runs with the tiny random-weight LLaVA-NeXT (`todre.tiny`) in place of the checkpoint and sample images in place of
the benchmark rows: that checks the cells would run on the real model (names, APIs, AnyRes inputs, settings that depend
on the model's depth), not their numbers.
"""
import ast, json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

import todre.cli, todre.evaluate, todre.loading
from todre.tiny import sample_image

NBS = Path(__file__).parents[1] / "nbs"
HUB_ID = "llava-hf/llava-v1.6-vicuna-7b-hf"
NOTEBOOKS = ["paper/01_fig1_token_maps", "paper/02_fig2_information_migration", "paper/03_supp_fig1_decode_attention",
             "paper/04_supp_fig3_retention_grid", "paper/05_table1_methods", "paper/09_supp_table3_check_layer"]


def code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def definitions_only(src):
    "True for a cell that only imports and defines, so it is cheap and safe to run on its own."
    body = ast.parse(src).body
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) for n in body)


def fake_benchmark(name, n=None, seed=0, progress=True):
    "One row of `name` in the form `todre.evaluate.load_benchmark` returns."
    img, short = sample_image("coffee"), todre.evaluate._SHORT
    if name == "mme":
        return [dict(image=img, question="Is there a cup in the image?" + short, answer="Yes", image_id="coffee", category="existence")]
    if name == "scienceqa":
        q = "Which object is shown?\nA. a cup\nB. a dog\nAnswer with the option's letter from the given choices directly."
        return [dict(image=img, question=q, answer="A")]
    return [dict(image=img, question="Is there a cup in the image?" + short, answer="yes")]


@pytest.fixture
def offline_hub(monkeypatch):
    "Stand-ins for the Hub; yields the model names the cells asked for."
    real, asked = todre.loading.load_model, []
    def load_model(model="testbed", device="cpu", **kwargs):
        asked.append(model)
        return real("tiny-llava-next" if model == HUB_ID else model, device="cpu")
    monkeypatch.setattr(todre.cli, "load_model", load_model)
    monkeypatch.setattr(todre.loading, "load_model", load_model)
    monkeypatch.setattr(todre.evaluate, "load_benchmark", fake_benchmark)
    yield asked
    plt.close("all")


def test_definitions_only():
    assert definitions_only("import math\ndef f(n): return n")
    assert not definitions_only("x = compare(model)")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_hub_cells_run_offline(name, offline_hub, monkeypatch):
    path = NBS / f"{name}.ipynb"
    cells = code_cells(path)
    assert any(c.startswith("#| hub") for c in cells), f"{name} has no #| hub cell"
    monkeypatch.chdir(path.parent)
    ns = {}
    exec(cells[0], ns)                                   # the notebook's imports
    for src in cells[1:]:                                # then, in order, its definitions and its hub cells
        if src.startswith("#| hub") or definitions_only(src): exec(src, ns)
    assert offline_hub and set(offline_hub) == {HUB_ID}  # every hub cell loaded the paper's checkpoint


def test_hub_ablation_rows_per_benchmark(offline_hub, monkeypatch):
    asked = []
    monkeypatch.setattr(todre.evaluate, "load_benchmark", lambda b, n=None, **kwargs: asked.append((b, n)) or [])
    monkeypatch.setattr(todre.evaluate, "ablation_scores", lambda model, processor, settings, data, **kwargs: data)
    for n in (500, None):
        todre.evaluate.hub_ablation([("unpruned", 1.0, None)], n=n, progress=False)
    assert asked == [("mme", 250), ("scienceqa", 500), ("gqa", 500), ("pope", 500),    # MME: n // 2 images, both questions
                     ("mme", None), ("scienceqa", None), ("gqa", None), ("pope", None)]
