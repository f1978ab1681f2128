"""`--model todre` through lmms-eval's own command line, offline, on the testbed and the scenes task:
one process vs two data-parallel processes, the unpruned baseline and the relative table, a broken sample, and resuming
with --use_cache. Needs lmms-eval (`pip install --no-deps lmms-eval==0.7.3` + the `eval` extra)."""
import glob, json, os, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip("lmms_eval")
from todre.lmms_eval import scenes_task, scenes_rows, results_table, read_results

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
LIMIT = 10


def lmms(cwd, tasks, out, model_args, limit, *extra, ranks=1):
    "Run lmms-eval's CLI; returns its log."
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", "29533"] if ranks > 1 \
        else [sys.executable]
    cmd = launch + ["-m", "lmms_eval", "--model", "todre", "--model_args", model_args, "--tasks", "todre_scenes",
                    "--include_path", str(tasks), "--batch_size", "1", "--log_samples", "--output_path", str(out),
                    "--limit", str(limit), *extra]
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    return log


def answers(out):
    "doc_id -> the model's answer, from the run's samples file."
    (f,) = glob.glob(str(Path(out) / "*" / "*_samples_todre_scenes.jsonl"))
    rows = [json.loads(l) for l in open(f)]
    return {r["doc_id"]: r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0] for r in rows}


def rank_records(stats, rank):
    return json.loads((Path(stats) / f"todre_stats_rank{rank}.json").read_text())["records"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmms")
    scenes_task(d / "tasks", n_scenes=4)
    return d


@pytest.fixture(scope="module")
def single(work):
    lmms(work, work / "tasks", work / "one", f"pretrained=testbed,retain=0.1,selector=maxsum,stage2=True,stats_dir={work / 's1'}", LIMIT)
    return work / "one"


def test_data_parallel_matches_one_process(work, single):
    lmms(work, work / "tasks", work / "two", f"pretrained=testbed,retain=0.1,selector=maxsum,stage2=True,stats_dir={work / 's2'}",
         LIMIT, ranks=2)
    one, two = answers(single), answers(work / "two")
    assert sorted(one) == list(range(LIMIT))
    assert one == two                                   # sample by sample
    r0, r1 = rank_records(work / "s2", 0), rank_records(work / "s2", 1)
    assert r0 and r1                                    # rank 1 really answered requests
    assert sorted(r["doc_id"] for r in r0 + r1) == list(range(LIMIT))
    assert {r["rank"] for r in r1} == {1}
    res = read_results(work / "two")
    assert res["throughput"]["avg_todre_requests"] == LIMIT        # both ranks' statistics reach the results file
    assert res["throughput"]["avg_todre_kept_tokens"] == 58


def test_unpruned_baseline_and_relative_table(work, single):
    lmms(work, work / "tasks", work / "base", "pretrained=testbed,retain=1,stage1=False,stage2=False", LIMIT)
    base = read_results(work / "base")
    assert base["throughput"]["avg_todre_kept_tokens"] == 576
    assert base["throughput"]["avg_todre_stage2_rate"] == 0
    pruned = read_results(single)
    for r in (base, pruned):
        m = r["results"]["todre_scenes"]
        assert {"accuracy,none", "acc_exist,none", "pope_f1,none", "pope_yes_ratio,none"} <= set(m)
    t = results_table({"unpruned": work / "base", "todre 10%": single})
    assert t.loc["unpruned", "relative_%"] == 100
    want = 100 * pruned["results"]["todre_scenes"]["accuracy,none"] / base["results"]["todre_scenes"]["accuracy,none"]
    assert abs(t.loc["todre 10%", "relative_%"] - want) < 0.01
    assert t.loc["todre 10%", "kept_tokens"] == 58


def test_broken_samples_and_resume(work):
    rows = scenes_rows(2)
    rows[1]["image"] = b"this is not a png"         # fails to decode
    rows[2]["image"] = b""                          # a prompt without an image
    scenes_task(work / "broken", rows=rows)
    cache = work / "cache"
    args = f"pretrained=testbed,retain=0.1,stats_dir={work / 'bs'}"   # the model arguments are part of the cache key: keep them
    log = lmms(work, work / "broken", work / "b1", args, 4, "--use_cache", str(cache))
    assert "doc 1 failed" in log and "doc 2 failed" in log
    first = answers(work / "b1")
    assert first[1] == first[2] == ""
    res = read_results(work / "b1")["results"]["todre_scenes"]
    assert res["failed,none"] == 50.0
    recs = rank_records(work / "bs", 0)
    assert [r["doc_id"] for r in recs] == [0, 1, 2, 3] and [r["failed"] for r in recs] == [False, True, True, False]
    # resume: a longer run with the same cache answers only what is missing (failed answers are not cached)
    log = lmms(work, work / "broken", work / "b2", args, 6, "--use_cache", str(cache))
    assert "2/6 cache hits" in log
    assert sorted(r["doc_id"] for r in rank_records(work / "bs", 0)) == [1, 2, 4, 5]
    second = answers(work / "b2")
    assert second[0] == first[0] and second[3] == first[3]
    assert sorted(second) == list(range(6))
