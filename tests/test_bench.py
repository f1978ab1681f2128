"`todre bench` on the CPU path: same process, baseline first, ratios, JSON and CSV."
import csv, json
import torch
from todre.cli import build_parser
from todre.bench import run_bench

def test_bench_cli_writes_results(tmp_path):
    torch.set_num_threads(1)
    a = build_parser().parse_args(["bench", "--model", "tiny-llava", "--methods", "todre@0.10", "stage1@0.25",
                                   "--warmup", "0", "--repeats", "1", "--image-size", "336",
                                   "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv")])
    rows = run_bench(a)
    assert [r["method"] for r in rows] == ["baseline", "todre@0.10", "stage1@0.25"]
    assert rows[0]["speedup"] == 1.0 and all(r["total_s"] > 0 for r in rows)
    assert rows[1]["first_layer_tokens"] < rows[2]["first_layer_tokens"] < rows[0]["first_layer_tokens"]
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["device"]["device_type"] == "cpu" and len(saved["rows"]) == 3
    assert len(list(csv.DictReader(open(tmp_path / "b.csv")))) == 3


def test_bench_other_families(tmp_path):
    torch.set_num_threads(1)
    for name in ("tiny-qwen2.5-vl", "tiny-internvl"):
        a = build_parser().parse_args(["bench", "--model", name, "--methods", "todre@0.25", "--warmup", "0", "--repeats", "1",
                                       "--image-size", "224", "--json", str(tmp_path / "b.json"), "--csv", ""])
        rows = run_bench(a)
        assert [r["method"] for r in rows] == ["baseline", "todre@0.25"]
        assert rows[1]["first_layer_tokens"] < rows[0]["first_layer_tokens"] and rows[1]["tflops"] > 0

def test_bench_model_names():
    from todre.bench import _MODELS, bench_model
    from todre.flops import SHAPES, shape_from_config
    from todre.models.base import tiny_names
    assert set(tiny_names()) | set(SHAPES) <= set(_MODELS)
    model, proc, prompt = bench_model("qwen2.5-vl-7b", device="meta")
    assert shape_from_config(model) == SHAPES["qwen2.5-vl-7b"] and "<|image_pad|>" in prompt("Hi?")
