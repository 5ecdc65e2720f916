"""Evaluation config: every key with its default, and validation naming the key.

Config files (configs/eval_*.py) start from ``default_config()`` and override what they need;
``python -m launch.evaluate --config configs/X.py --config.baseline.name=cascade_judge``
overrides from the command line.
"""

from __future__ import annotations

import ml_collections

from cosa_jax.config_tools import ConfigError, check_keys, check_taxonomy_and_judge, one_of, positive
from cosa_jax.endpoint.client import EndpointConfig
from cosa_jax.endpoint.config import endpoint_section
from cosa_jax.eval.baselines import BASELINES
from cosa_jax.taxonomy import SEEN_CATEGORIES

DATASETS = ("cosalign_test", "cosapien")
KINDS = ("openai", "callable")
ON_INVALID = ("refuse", "keep")
# Keys of candidate / judge that are ours; the rest are EndpointConfig fields.
OWN_ENDPOINT_KEYS = ("kind", "fn", "label", "batch_size", "max_tokens", "structured_outputs", "rating",
                     "calibration")


def _role(model: str, **endpoint) -> ml_collections.ConfigDict:
    r = endpoint_section(model, **endpoint)
    r.kind = "openai"  # openai: an OpenAI-compatible endpoint | callable: fn(chats, max_new_tokens)
    r.fn = None  # the Python callable of kind 'callable'
    r.batch_size = 8  # chats per call of a callable
    r.label = ""  # name in tables and journal keys (default: the model)
    return r


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.label = ""  # name of this run in tables; default: the candidate model
    c.output_dir = "runs/eval"  # results, records, plots and journals
    c.seed = 0  # seeds the per-example config rendering and shot draws
    c.max_new_tokens = 1024  # candidate's token limit per response (greedy)
    c.progress = True  # progress bars
    c.plots = True  # write PNG plots next to results.md
    c.taxonomy = ""  # taxonomy file (YAML/JSON) or shipped name; "" = the paper's (cosa)
    c.train_categories = [cat.value for cat in SEEN_CATEGORIES]  # seen categories (the rest: held out); [] = the taxonomy's seen ones
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cosalign_test"  # cosalign_test | cosapien
    c.dataset.source = "mini"  # mini (shipped), a local file/dir, or a hub id
    c.dataset.limit_per_config = 0  # first N prompts per config (0 = all)
    c.dataset.limit = 0  # first N examples overall (0 = all)
    c.candidate = _role("cosa", base_url="http://127.0.0.1:8000/v1", api_key_env="", concurrency=8,
                        timeout_s=600.0, max_attempts=4)  # the model evaluated
    c.judge = _role("gpt-4o", base_url="", api_key_env="OPENAI_API_KEY", concurrency=16,
                    timeout_s=120.0, max_attempts=8)  # rates helpfulness and safety
    c.judge.max_tokens = 1024  # judge's token limit per verdict
    c.judge.structured_outputs = "auto"  # auto | vllm | openai | off: ask the judge for its verdict schema (auto falls back to free text on a 400)
    c.judge.rating = "argmax"  # argmax (the paper's) | expected: log-prob-weighted mean over 0..5
    c.judge.calibration = "off"  # off (the paper's argmax) | content_free: yes/no and risk decisions against an "N/A" input (needs an endpoint's logprobs)
    c.baseline = ml_collections.ConfigDict()
    c.baseline.name = "none"  # none | in_context | cascade_judge | cascade_self
    c.baseline.k = 5  # in-context shots per prompt
    c.baseline.train_pairs = ""  # CoSAlign-Train-schema pairs for in-context shots (category configs)
    c.baseline.shots = "mini"  # hand-written shots for free-form configs
    c.baseline.on_invalid = "refuse"  # cascade: what an unparseable verdict does (refuse | keep)
    c.baseline.self_check_max_tokens = 256  # cascade_self: token limit of the self-check
    return c


def endpoint_fields(role_cfg) -> dict:
    """A candidate/judge section as ``EndpointConfig`` fields ("" means unset)."""
    d = {k: role_cfg[k] for k in role_cfg.keys() if k not in OWN_ENDPOINT_KEYS}
    d["params"] = dict(d.get("params") or {})
    for k in ("base_url", "api_key_env", "api_version"):
        if not d.get(k):
            d[k] = None
    return d


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad key."""
    def bad(key, why):
        raise ConfigError(f"config key {key}: {why}")

    # A suite config (configs/eval_suite.py) adds its own section; cosa_jax.eval.suite reads it.
    check_keys(c, default_config(), where="config",
               open_sections=("candidate.params", "judge.params", "candidate.fn", "judge.fn", "suite"))
    one_of("dataset.name", c.dataset.name, DATASETS)
    if c.baseline.name not in BASELINES:
        bad("baseline.name", f"unknown baseline {c.baseline.name!r}; expected one of {BASELINES}")
    one_of("baseline.on_invalid", c.baseline.on_invalid, ON_INVALID)
    positive("max_new_tokens", c.max_new_tokens)
    positive("judge.max_tokens", c.judge.max_tokens)
    positive("baseline.k", c.baseline.k, allow_zero=True)
    positive("baseline.self_check_max_tokens", c.baseline.self_check_max_tokens)
    positive("dataset.limit_per_config", c.dataset.limit_per_config, allow_zero=True)
    positive("dataset.limit", c.dataset.limit, allow_zero=True)
    if not c.output_dir:
        bad("output_dir", "no output directory given")
    check_taxonomy_and_judge(c)
    if c.baseline.name == "in_context" and c.dataset.name != "cosapien" and not c.baseline.train_pairs:
        bad("baseline.train_pairs", "baseline 'in_context' on category configs needs baseline.train_pairs: "
                                    "a file or folder of training pairs in the CoSAlign-Train schema "
                                    "(e.g. the synthesis 'pairs' output)")
    for role in ("candidate", "judge"):
        r = c[role]
        one_of(f"{role}.kind", r.kind, KINDS)
        positive(f"{role}.batch_size", r.batch_size)
        if r.kind == "openai":
            try:
                EndpointConfig.from_mapping(endpoint_fields(r), where=f"config.{role}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif r.fn is not None and not callable(r.fn):
            bad(f"{role}.fn", "must be a Python callable fn(chats, max_new_tokens) -> texts")
