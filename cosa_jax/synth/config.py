"""Synthesis config (Algorithm 1): every key with its default, and validation naming the key.

Config files (configs/synth_*.py) start from ``default_config()`` and override what they need;
``python -m launch.synthesize --config configs/X.py --config.pairing.dev_fraction=0.1``
overrides from the command line. Defaults are the paper's (spec §4) on a local server.
"""

from __future__ import annotations

import ml_collections

from cosa_jax import safety_configs as sc
from cosa_jax.config_tools import ConfigError, check_keys, check_taxonomy_and_judge, one_of, positive
from cosa_jax.endpoint.client import EndpointConfig
from cosa_jax.endpoint.config import endpoint_section
from cosa_jax.taxonomy import SEEN_CATEGORIES

ROLES = ("permissive", "safe", "judge")
SOURCE_KINDS = ("mini", "file", "hub")


def endpoint_config(model: str, temperature: float, max_tokens: int) -> ml_collections.ConfigDict:
    """One role's endpoint on a local OpenAI-compatible server (any key accepted)."""
    return endpoint_section(model, base_url="http://127.0.0.1:8000/v1", api_key_env="",
                            params=dict(temperature=temperature, max_tokens=max_tokens),
                            backoff_base_s=0.5, backoff_max_s=10.0, max_attempts=6)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/synth"  # every stage's datasets, journals and summaries go here
    c.seed = 0  # seeds every per-prompt sampler (configs, response plans, dev split)
    c.progress = True  # progress bars per stage
    c.allow_partial = False  # True: go on when some requests failed after retries
    c.chunk_size = 4096  # rows in memory at once in the generate / label / score / pair stages
    c.sources = [dict(kind="mini")]  # prompt sources: {kind: mini|file|hub, path|preset, field, limit}
    c.test_prompts = []  # test sets whose prompts are dropped (paths or {kind: hub, preset})
    c.length_filter = ml_collections.ConfigDict()
    c.length_filter.min_exclusive = 3  # keep prompts longer than this many tokens
    c.length_filter.max = 64  # ... and at most this many
    c.length_filter.tokenizer = ""  # HF tokenizer dir to count tokens; "" counts words
    c.taxonomy = ""  # taxonomy file (YAML/JSON) or shipped name; "" = the paper's (cosa)
    c.train_categories = [cat.value for cat in SEEN_CATEGORIES]  # risk categories seen in training; [] = the taxonomy's seen ones
    c.min_label_group = 10  # drop prompt-label groups smaller than this (paper: 10)
    c.max_per_label_group = 2500  # cap per prompt-label group (paper: 2,500)
    c.judge_retries = 1  # re-asks of the judge when its reply does not parse
    c.judge_retry_temperature = 0.7  # temperature of those re-asks
    c.judge = ml_collections.ConfigDict()
    c.judge.structured_outputs = "auto"  # auto | vllm | openai | off (auto: vLLM's field, else OpenAI's, else free text)
    c.judge.rating = "argmax"  # argmax (the paper's) | expected (log-prob-weighted, needs logprobs)
    c.judge.calibration = "off"  # off (the paper's argmax) | content_free (yes/no and risk decisions against an "N/A" input; needs logprobs)
    c.endpoints = ml_collections.ConfigDict()
    c.endpoints.permissive = endpoint_config("permissive", 1.0, 512)  # config-following generator
    c.endpoints.safe = endpoint_config("safe", 1.0, 512)  # plain safety-tuned generator
    c.endpoints.judge = endpoint_config("judge", 0.0, 512)  # labels prompts and responses
    c.generation = ml_collections.ConfigDict()
    c.generation.n_superset = 4  # permissive responses under a config allowing the prompt's risks
    c.generation.n_not_superset = 4  # ... under a config not allowing them
    c.generation.n_safe = 1  # safe-generator responses per prompt
    c.generation.skip_outside_train = True  # skip prompts whose risks lie outside train_categories
    c.score = ml_collections.ConfigDict()
    c.score.alpha = 0.1  # error-score weight of allowed risks
    c.score.beta = 3.0  # error-score weight of disallowed risks
    c.score.gamma = 1.0  # error-score weight of not addressing the prompt
    c.pairing = ml_collections.ConfigDict()
    c.pairing.modes = list(sc.MODES)  # pairing modes (spec §4)
    c.pairing.dev_fraction = 0.023  # share of prompts held out as dev pairs (paper: 0.023)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad key."""
    def bad(key, why):
        raise ConfigError(f"config key {key}: {why}")

    check_keys(c, default_config(), where="config",
               open_sections=tuple(f"endpoints.{r}.params" for r in ROLES))
    if not c.out_dir:
        bad("out_dir", "no output directory given")
    for i, src in enumerate(c.sources):
        src = dict(src)
        one_of(f"sources[{i}].kind", src.get("kind"), SOURCE_KINDS)
        if src["kind"] == "file" and not src.get("path"):
            bad(f"sources[{i}].path", "kind 'file' needs a path")
        if src["kind"] == "hub" and not src.get("preset"):
            bad(f"sources[{i}].preset", "kind 'hub' needs a preset")
    check_taxonomy_and_judge(c)
    positive("chunk_size", c.chunk_size)
    positive("min_label_group", c.min_label_group)
    positive("max_per_label_group", c.max_per_label_group)
    positive("length_filter.max", c.length_filter.max)
    positive("judge_retries", c.judge_retries, allow_zero=True)
    for key in ("n_superset", "n_not_superset", "n_safe"):
        positive(f"generation.{key}", c.generation[key], allow_zero=True)
    for key in ("alpha", "beta", "gamma"):
        positive(f"score.{key}", c.score[key], allow_zero=True)
    for m in c.pairing.modes:
        one_of("pairing.modes", m, sc.MODES)
    if not 0 <= c.pairing.dev_fraction < 1:
        bad("pairing.dev_fraction", f"must be in [0, 1), got {c.pairing.dev_fraction}")
    for role in ROLES:
        try:
            EndpointConfig.from_mapping(c.endpoints[role], where=f"config.endpoints.{role}")
        except ValueError as e:
            raise ConfigError(str(e)) from None

