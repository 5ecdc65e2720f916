"""General capability: lm-evaluation-harness (``lm-eval``) against an OpenAI-compatible server.

lm-eval's ``local-completions`` model talks to ``/v1/completions`` (our ``launch.serve``, the
gateway or vLLM): log-likelihood tasks need ``echo`` + ``logprobs`` and a tokenizer to find where
the continuation starts, so ``tokenizer`` names the model's HF directory (read offline).
``local-chat-completions`` serves generation-only tasks. The user names lm-eval tasks (``mmlu``,
``gsm8k``, ...) or ``capability_mini``, a shipped 8-question multiple-choice task that runs offline.
lm-eval's own request cache (``use_cache``, sqlite) makes a killed run resume without re-sending.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cosa_jax.eval.datasets import shipped_path

MINI_TASK = "capability_mini"


def mini_task_spec(data_file: str | Path) -> dict[str, Any]:
    """The shipped multiple-choice task as an lm-eval task dict (log-likelihood of each choice)."""
    return {
        "task": MINI_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_mini_task(task_dir: str | Path, data_file: str | Path | None = None) -> Path:
    """A task folder for lm-eval's ``include_path`` (YAML needs an absolute data path)."""
    d = Path(task_dir)
    d.mkdir(parents=True, exist_ok=True)
    src = Path(data_file) if data_file else shipped_path("capability_mini.jsonl")
    if not src.exists():
        raise FileNotFoundError(f"capability task data {src} does not exist")
    (d / f"{MINI_TASK}.yaml").write_text(yaml.safe_dump(mini_task_spec(src), sort_keys=False))
    return d


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """One lm-eval task's headline metric and how many documents it rests on."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


def _headline(task: str, res: Mapping[str, Any], n: int) -> TaskScore:
    for metric in ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
                   "exact_match,none"):
        if metric in res and isinstance(res[metric], (int, float)):
            se = res.get(metric.replace(",", "_stderr,", 1))
            return TaskScore(task, metric, float(res[metric]), float(se) if isinstance(se, (int, float)) else None, n)
    nums = [k for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    if not nums:
        raise ValueError(f"lm-eval task {task!r}: no numeric metric in {sorted(res)}")
    return TaskScore(task, nums[0], float(res[nums[0]]), None, n)


def run_lm_eval(
    *,
    base_url: str,
    model: str,
    tasks: Sequence[str],
    tokenizer: str = "",
    api: str = "local-completions",
    include_path: str | Path | None = None,
    mini_data: str | Path | None = None,
    work_dir: str | Path,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    num_concurrent: int = 1,
    max_length: int = 2048,
    extra_model_args: Mapping[str, Any] | None = None,
) -> tuple[list[TaskScore], dict[str, Any]]:
    """Run ``tasks`` through lm-eval; returns headline scores and lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("capability.tasks is empty: name lm-eval tasks, e.g. ['capability_mini'] or ['mmlu']")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(include_path)] if include_path else []
    if MINI_TASK in tasks:
        paths.append(str(write_mini_task(work / "tasks", mini_data)))
    endpoint = base_url.rstrip("/") + ("/chat/completions" if "chat" in api else "/completions")
    margs: dict[str, Any] = {
        "model": model, "base_url": endpoint, "num_concurrent": num_concurrent, "max_retries": 3,
        "max_length": max_length,
    }
    if tokenizer:
        margs.update(tokenizer_backend="huggingface", tokenizer=str(tokenizer))
    else:
        margs.update(tokenizer_backend="none", tokenized_requests=False)
    margs.update(extra_model_args or {})
    out = lm_eval.simple_evaluate(
        model=api,
        model_args=margs,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        # Indexing lm-eval's thousands of built-in task files is slow: skip it when every task is ours.
        task_manager=TaskManager(include_path=paths or None,
                                 include_defaults=bool(include_path) or any(t != MINI_TASK for t in tasks)),
        use_cache=str(work / "lm_eval_cache"),
        apply_chat_template="chat" in api,
        log_samples=False,
    )
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    scores = []
    for task in tasks:
        res = out["results"].get(task)
        if res is None:
            raise ValueError(f"lm-eval produced no result for task {task!r}; got {sorted(out['results'])}")
        n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        scores.append(_headline(task, res, int(n)))
    keep = {"results": out["results"], "n-samples": out.get("n-samples", {}), "versions": out.get("versions", {})}
    return scores, keep
