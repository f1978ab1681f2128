"""The paper's benchmarks are lmms-eval's tasks (`todre.evaluate.PAPER_TASKS`): lmms-eval defines their prompts and
scores, and `todre.lmms_eval.results_table` reads each task's main score (`MAIN_METRICS`). Checked offline against
lmms-eval's own task files: every task exists and reports the metric the table takes from it."""
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
import yaml
from todre.evaluate import PAPER_TASKS
from todre.lmms_eval import MAIN_METRICS


class TaskLoader(yaml.SafeLoader):
    "Reads lmms-eval task files, taking their `!function` tags as plain strings."
TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager
    return TaskManager("WARNING")


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_paper_task_reports_main_metric(task, task_manager):
    assert task in task_manager.all_tasks
    config = yaml.load(Path(task_manager.task_index[task]["yaml_path"]).read_text(), Loader=TaskLoader)
    assert config["output_type"] == "generate_until"            # `--model todre` answers generation tasks only
    assert MAIN_METRICS[task] in [m["metric"] for m in config["metric_list"]]
