"""The paper notebooks' `#| hub` cells, run without the Hub.

CI reaches neither the paper's checkpoints nor its benchmarks, so `nbdev_test` skips these cells. Here each cell's own
code runs with the tiny random-weight model of the checkpoint's family (`todre.models.base.tiny_names()`: LLaVA-NeXT,
LLaVA-NeXT-Video, Qwen2.5-VL, InternVL) in place of the checkpoint, and the offline lmms-eval scenes task
(`todre.lmms_eval.scenes_task`, one question per setting) in place of lmms-eval's MME, ScienceQA-IMG, GQA and POPE
tasks; sample images (or a few of them as the frames of a video) stand in for the video benchmarks' rows. That checks the
cells would run on the real models (names, APIs, AnyRes, tiles, video inputs, settings that depend on the model's
depth, the lmms-eval run and its results table), not their numbers.
"""
import ast, json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

pytest.importorskip("lmms_eval")

import todre.cli, todre.evaluate, todre.loading
from todre.config import ToDREConfig
from todre.lmms_eval import MAIN_METRICS, scenes_task
from todre.models.base import tiny_names, get_adapter
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


def fake_video_benchmark(name, n=None, frames=20, seed=0, root=None):
    "One multiple-choice row of a video benchmark, in the form the Table 2 notebook's `load_video_benchmark` returns."
    video = [sample_image(s).resize((112, 112)) for s in ("coffee", "astronaut", "chelsea", "rocket")]
    return [dict(frames=video, question="What is in the video?\nA. a cup\nB. a dog\nAnswer with the option's letter "
                 "from the given choices directly.", answer="A")]


@pytest.fixture(scope="module")
def scenes_tasks(tmp_path_factory):
    "The offline scenes task and an lmms-eval task index that includes it (building the index takes a while)."
    from lmms_eval.tasks import TaskManager
    d = tmp_path_factory.mktemp("lmms_tasks")
    scenes_task(d, n_scenes=1)
    return TaskManager("WARNING", include_path=str(d))


@pytest.fixture
def offline_hub(monkeypatch, scenes_tasks):
    "Stand-ins for the Hub; yields the model names the cells asked for."
    real, asked = todre.loading.load_model, []
    real_run = todre.evaluate.lmms_eval_run
    def lmms_eval_run(model_id, cfg=None, tasks=None, limit=None, device=None, seed=0, **kwargs):
        "The real lmms-eval run, on one question of the scenes task instead of the paper's benchmarks."
        return real_run(model_id, cfg, ("todre_scenes",), limit=1, device="cpu", seed=seed, task_manager=scenes_tasks)
    def load_model(model="testbed", device="cpu", **kwargs):
        asked.append(model)
        name = HUB_IDS.get(model, model)
        m, proc, prompt = real(name, device="cpu")
        if prompt is None:                               # tiny models of the chat families: their own format, like a Hub chat template
            prompt = lambda q, kind="image", m=m: prompt_template(m, kind)(q)
        return m, proc, prompt
    monkeypatch.setattr(todre.cli, "load_model", load_model)
    monkeypatch.setattr(todre.loading, "load_model", load_model)
    monkeypatch.setattr(todre.evaluate, "lmms_eval_run", lmms_eval_run)
    monkeypatch.setattr(todre.evaluate, "decoder_layers",        # the stand-in's depth, without counting as a model the cell asked for
                        lambda model_id: get_adapter(real(HUB_IDS.get(model_id, model_id), device="cpu")[0]).n_layers)
    real_samples = todre.evaluate.task_samples
    monkeypatch.setattr(todre.evaluate, "task_samples", lambda task, n=1, **kwargs: real_samples("todre_scenes", n, task_manager=scenes_tasks))
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


def test_hub_ablation_runs_lmms_eval_per_setting(monkeypatch):
    "Each setting is one lmms-eval run on the paper's tasks with `n` as lmms-eval's --limit; the table is `results_table`'s."
    asked = []
    def run(model_id, cfg=None, tasks=None, limit=None, **kwargs):
        asked.append((model_id, cfg, tuple(tasks), limit))
        acc = 80.0 if cfg is None else 60.0
        return dict(results={t: {f"{MAIN_METRICS[t]},none": acc, "alias": t} for t in tasks},
                    throughput=dict(avg_todre_kept_tokens=576.0 if cfg is None else 58.0))
    monkeypatch.setattr(todre.evaluate, "lmms_eval_run", run)
    cfg = ToDREConfig(retain=0.1)
    t = todre.evaluate.hub_ablation([("unpruned", 1.0, None), ("todre, 10%", 0.1, cfg)], "some/model", n=7, progress=False)
    tasks = ("mme", "scienceqa_img", "gqa", "pope")
    assert asked == [("some/model", None, tasks, 7), ("some/model", cfg, tasks, 7)]
    assert list(t.columns[:4]) == list(tasks) and t.loc["todre, 10%", "relative_%"] == 75.0
    assert t.loc["todre, 10%", "kept_tokens"] == 58.0
