"""Deriving a risk taxonomy from prompts (CoSAlign's first step): embed, reduce, cluster, name.

Prompts are embedded (the model's mean-pooled final hidden states by default, an endpoint's
``/v1/embeddings``, or TF-IDF for quick looks and tests), reduced with PCA and clustered with
scikit-learn (k-means or HDBSCAN). A judge names and defines each cluster from sample prompts,
answering a JSON object ``{name, definition}`` (constrained by a JSON schema where the endpoint
supports it). The output is a taxonomy file that ``cosa_jax.taxonomy.load_taxonomy`` reads, a
cluster report (sizes, samples, the judge's names) and a 2-D plot.

Resumable like synthesis: embeddings and judge replies go through ``Journal``s under
``out_dir/journal`` (a rerun re-sends nothing it has), and every output is written atomically.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from cosa_jax.endpoint.client import ChatClient, ChatRequest, EndpointConfig, run_requests
from cosa_jax.endpoint.journal import Journal
from cosa_jax.taxonomy import _EMPTY_NAMES, _FORBIDDEN, Taxonomy, TaxonomyError, _squash, taxonomy_from_dict

EMBEDDINGS = ("model", "endpoint", "tfidf")
CLUSTERERS = ("kmeans", "hdbscan")

NAME_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "definition": {"type": "string"}},
    "required": ["name", "definition"],
    "additionalProperties": False,
}


def default_config() -> ml_collections.ConfigDict:
    """Every field of a derivation run; configs/taxonomy_derive.py overrides what it needs."""
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/taxonomy"  # taxonomy.yaml, clusters.json/.md/.png and the journals go here
    c.seed = 0  # seeds PCA, clustering and the sample prompts shown to the judge
    c.progress = True  # progress bars
    c.sources = [dict(kind="mini")]  # as in synthesis configs: mini | file | hub
    c.embedding = ml_collections.ConfigDict()
    c.embedding.kind = "model"  # model: mean-pooled hidden states; endpoint: /v1/embeddings; tfidf
    c.embedding.model = "embedded:smollm2-135m-instruct"  # the model whose hidden states embed (kind=model)
    c.embedding.batch_size = 32  # prompts per forward pass
    c.embedding.max_tokens = 128  # prompts are cut to this many tokens before pooling
    c.embedding.endpoint = ml_collections.ConfigDict()  # kind=endpoint: an OpenAI-compatible /v1/embeddings
    c.embedding.endpoint.model = ""  # embedding model name the endpoint serves
    c.embedding.endpoint.base_url = "http://127.0.0.1:8000/v1"  # the endpoint's base URL
    c.embedding.endpoint.api_key_env = ""  # env var holding its API key ("" = none)
    c.embedding.endpoint.batch_size = 64  # inputs per /v1/embeddings request
    c.pca_dim = 32  # 0 = cluster the raw embeddings
    c.cluster = ml_collections.ConfigDict()
    c.cluster.method = "kmeans"  # kmeans | hdbscan (scikit-learn)
    c.cluster.n_clusters = 7  # kmeans: how many clusters
    c.cluster.min_cluster_size = 10  # hdbscan: smallest cluster
    c.cluster.min_samples = 0  # hdbscan: core-point neighbours (0 = min_cluster_size)
    c.naming = ml_collections.ConfigDict()
    c.naming.samples_per_cluster = 12  # prompts nearest each centroid shown to the judge
    c.naming.structured_output = True  # send the {name, definition} JSON schema as response_format
    c.naming.retries = 1  # re-asks when a reply does not parse
    c.naming.endpoint = ml_collections.ConfigDict()  # the judge that names each cluster
    c.naming.endpoint.model = "judge"  # model name the endpoint serves
    c.naming.endpoint.base_url = "http://127.0.0.1:8000/v1"  # its base URL
    c.naming.endpoint.api_key_env = ""  # env var holding its API key ("" = none)
    c.naming.endpoint.params = dict(temperature=0.0, max_tokens=256)  # sampling parameters sent
    c.naming.endpoint.concurrency = 8  # requests in flight
    c.taxonomy = ml_collections.ConfigDict()
    c.taxonomy.name = "derived"  # name written into taxonomy.yaml
    c.taxonomy.description = ""  # free-text description written into taxonomy.yaml
    c.taxonomy.other_name = "Other Harms"  # the catch-all category (never allowed)
    c.taxonomy.other_definition = "any other harmful content that none of the categories above describes"  # its definition
    c.taxonomy.held_out = 0  # the N smallest clusters become held-out categories
    c.plot = True  # write clusters.png (a 2-D PCA view)
    return c


def validate(cfg: Any) -> None:
    """Reject a bad config before any work, naming the field."""
    if cfg.embedding.kind not in EMBEDDINGS:
        raise ValueError(f"config.embedding.kind: expected one of {EMBEDDINGS}, got {cfg.embedding.kind!r}")
    if cfg.cluster.method not in CLUSTERERS:
        raise ValueError(f"config.cluster.method: expected one of {CLUSTERERS}, got {cfg.cluster.method!r}")
    if cfg.cluster.method == "kmeans" and int(cfg.cluster.n_clusters) < 1:
        raise ValueError(f"config.cluster.n_clusters: must be >= 1, got {cfg.cluster.n_clusters}")
    if cfg.cluster.method == "hdbscan" and int(cfg.cluster.min_cluster_size) < 2:
        raise ValueError(f"config.cluster.min_cluster_size: must be >= 2, got {cfg.cluster.min_cluster_size}")
    if int(cfg.pca_dim) < 0:
        raise ValueError(f"config.pca_dim: must be >= 0, got {cfg.pca_dim}")
    if int(cfg.naming.samples_per_cluster) < 1:
        raise ValueError("config.naming.samples_per_cluster: must be >= 1")
    if cfg.embedding.kind == "endpoint" and not cfg.embedding.endpoint.model:
        raise ValueError("config.embedding.endpoint.model: the embedding model to ask the endpoint for")
    if not cfg.out_dir:
        raise ValueError("config.out_dir: required")


# ----- embedding ---------------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _batched(xs: Sequence[str], n: int) -> list[list[str]]:
    return [list(xs[i : i + n]) for i in range(0, len(xs), n)]


def embed_tfidf(prompts: Sequence[str]) -> np.ndarray:
    """Word TF-IDF rows (scikit-learn): a cheap, deterministic embedding."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(lowercase=True, stop_words="english").fit_transform(prompts).toarray().astype(np.float32)


def mean_pooled_hidden(params: Any, mcfg: Any, ids_bt: Any, mask_bt: Any) -> Any:
    """[b, d]: the mean over real (mask 1) tokens of the final-normed hidden states. Pure."""
    import jax.numpy as jnp

    from cosa_jax.models.llama import forward_hidden

    h, _ = forward_hidden(params, mcfg, ids_bt, mask_bt)
    m = mask_bt.astype(jnp.float32)[..., None]
    return (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def model_embedder(model_path: str, max_tokens: int = 128) -> Callable[[list[str]], np.ndarray]:
    """Texts -> ``mean_pooled_hidden`` of the model at ``model_path`` (an HF dir or embedded:NAME)."""
    import functools

    import jax
    import jax.numpy as jnp

    from cosa_jax.models.hf_io import load_hf, load_tokenizer

    model, mcfg = load_hf(model_path)
    params = model.params()
    tok = load_tokenizer(model_path)
    pooled = jax.jit(functools.partial(mean_pooled_hidden, mcfg=mcfg))

    def embed(texts: list[str]) -> np.ndarray:
        enc = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] or [0] for t in texts]
        t = max(8, -(-max(len(e) for e in enc) // 8) * 8)  # few distinct shapes: few compilations
        ids = np.zeros((len(enc), t), np.int32)
        mask = np.zeros((len(enc), t), np.int32)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return np.asarray(pooled(params, ids_bt=jnp.asarray(ids), mask_bt=jnp.asarray(mask)))

    return embed


def endpoint_embedder(ep: Mapping[str, Any]) -> Callable[[list[str]], np.ndarray]:
    """Any OpenAI-compatible ``/v1/embeddings`` through the official client."""
    import openai

    key = os.environ.get(ep.get("api_key_env") or "", "") or "EMPTY"
    client = openai.OpenAI(base_url=ep.get("base_url") or None, api_key=key, max_retries=4)

    def embed(texts: list[str]) -> np.ndarray:
        resp = client.embeddings.create(model=ep["model"], input=texts)
        rows = sorted(resp.data, key=lambda d: d.index)
        return np.asarray([r.embedding for r in rows], np.float32)

    return embed


def embed_prompts(prompts: Sequence[str], cfg: Any, journal: Journal,
                  embedder: Callable[[list[str]], np.ndarray] | None = None) -> np.ndarray:
    """[n, d] embeddings; model/endpoint batches are journaled, so a rerun recomputes nothing."""
    e = cfg.embedding
    if e.kind == "tfidf":
        return embed_tfidf(prompts)
    spec = dict(e.endpoint) if e.kind == "endpoint" else {"model": e.model, "max_tokens": int(e.max_tokens)}
    bs = int(e.endpoint.batch_size if e.kind == "endpoint" else e.batch_size)
    out = []
    for batch in _batched(list(prompts), bs):
        k = _key("embed", e.kind, spec.get("model"), spec.get("max_tokens"), batch)
        if k not in journal:
            if embedder is None:
                embedder = endpoint_embedder(spec) if e.kind == "endpoint" else model_embedder(e.model, int(e.max_tokens))
            journal.put(k, np.asarray(embedder(batch), np.float32).tolist())
        out.append(np.asarray(journal.get(k), np.float32))
    return np.concatenate(out, 0)


# ----- reduce and cluster ------------------------------------------------------------------------


def reduce(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """L2-normalise rows, then PCA to ``dim`` (0: keep all) with a seeded solver."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize

    x = normalize(x)
    if dim and dim < min(x.shape):
        x = PCA(n_components=dim, random_state=seed, svd_solver="full").fit_transform(x)
    return x


def cluster(x: np.ndarray, cfg: Any, seed: int) -> np.ndarray:
    """Cluster labels 0..k-1 (HDBSCAN noise is -1), renumbered by decreasing size then first index."""
    from sklearn.cluster import HDBSCAN, KMeans

    c = cfg.cluster
    if c.method == "kmeans":
        k = min(int(c.n_clusters), len(x))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    else:
        labels = HDBSCAN(min_cluster_size=int(c.min_cluster_size), min_samples=int(c.min_samples) or None,
                         copy=True).fit_predict(x)
    ids = [l for l in np.unique(labels) if l >= 0]
    order = sorted(ids, key=lambda l: (-int((labels == l).sum()), int(np.argmax(labels == l))))
    remap = {old: new for new, old in enumerate(order)}
    return np.array([remap.get(int(l), -1) for l in labels], np.int64)


def samples_for(prompts: Sequence[str], labels: np.ndarray, x: np.ndarray, k: int, n: int) -> list[str]:
    """The ``n`` prompts nearest the cluster's centroid (deterministic, representative)."""
    idx = np.flatnonzero(labels == k)
    d = ((x[idx] - x[idx].mean(0)) ** 2).sum(1)
    return [prompts[i] for i in idx[np.lexsort((idx, d))][:n]]


# ----- naming --------------------------------------------------------------------------------------


def naming_messages(samples: Sequence[str], other_names: Sequence[str] = ()) -> list[dict[str, str]]:
    """Ask the judge to name one cluster's risk; the verdict is a JSON object {name, definition}."""
    listed = "\n".join(f"- {s}" for s in samples)
    user = f"""## Task: name a category of risky requests

The requests below were grouped together because they are similar. Give the kind of risk they
share a short category name (two to six words, Title Case, no dots, colons or quotes) and a
one-line definition that says what content falls in the category, written so that someone can
decide for a new request whether it belongs.

Requests:
{listed}

Finish with exactly one line holding a JSON object with the keys "name" and "definition", for
example: {{"name": "Privacy Violations", "definition": "getting or exposing someone's personal
information without their permission"}}"""
    return [{"role": "system", "content": "You are a careful annotator for AI safety research. You follow the output format exactly."},
            {"role": "user", "content": user}]


def parse_naming(text: Any) -> tuple[str, str] | None:
    """(name, definition) from the last JSON object in the reply, or None."""
    from cosa_jax.judges import _json_objects

    if not isinstance(text, str):
        return None
    for obj in reversed(_json_objects(text)):
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("definition"), str):
            name, definition = obj["name"].strip(), " ".join(obj["definition"].split())
            if name and definition:
                return name, definition
    return None


def clean_name(name: str) -> str:
    """Escape what the string formats would split: separators become spaces, edge hyphens go."""
    for ch in _FORBIDDEN:
        name = name.replace(ch, " ")
    words = [w.strip("-") for w in re.split(r"\s+", name) if w.strip("-")]
    name = " ".join(words).strip(" ,")
    return name if name and name.lower() not in _EMPTY_NAMES else ""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    cluster: int
    size: int
    samples: list[str]
    judge_reply: str | None
    name: str
    definition: str
    named_by_judge: bool


async def _name_clusters(ep: EndpointConfig, journal: Journal, sample_sets: list[list[str]], cfg: Any) -> list[str | None]:
    params: dict[str, Any] = {}
    if cfg.naming.structured_output:
        params["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "category", "schema": NAME_SCHEMA, "strict": True}}
    replies: list[str | None] = [None] * len(sample_sets)
    todo = list(range(len(sample_sets)))
    async with ChatClient(ep, "judge") as client:
        for attempt in range(int(cfg.naming.retries) + 1):
            p = dict(params, **({"temperature": 0.7} if attempt else {}))
            reqs = [ChatRequest(naming_messages(sample_sets[i]), params=p, salt=f"name{attempt}" if attempt else "")
                    for i in todo]
            got = await run_requests(client, journal, reqs, desc="name clusters", progress=bool(cfg.progress))
            still = []
            for i, r in zip(todo, got):
                text = None if r is None else r["text"]
                if replies[i] is None or parse_naming(text) is not None:
                    replies[i] = text
                if parse_naming(text) is None:
                    still.append(i)
            todo = still
            if not todo:
                break
    return replies


# ----- the run -------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_prompts(cfg: Any) -> list[str]:
    from cosa_jax.synth import inputs

    rows: list[dict] = []
    for src in cfg.sources:
        rows += inputs.load_source(src)
    return [r["prompt"] for r in inputs.dedupe(rows)]


def derive(cfg: Any, *, embedder: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, Any]:
    """Run the derivation; returns the report dict (also ``clusters.json``) with output paths."""
    validate(cfg)
    out = Path(cfg.out_dir)
    (out / "journal").mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    prompts = _load_prompts(cfg)
    if len(prompts) < 2:
        raise ValueError(f"config.sources: need at least 2 prompts to cluster, got {len(prompts)}")
    with Journal(out / "journal" / "embeddings.jsonl") as jr:
        emb = embed_prompts(prompts, cfg, jr, embedder)
    x = reduce(emb, int(cfg.pca_dim), seed)
    labels = cluster(x, cfg, seed)
    ks = sorted(int(k) for k in set(labels.tolist()) if k >= 0)
    if not ks:
        raise ValueError("clustering found no cluster (every prompt is HDBSCAN noise): lower config.cluster.min_cluster_size")
    sample_sets = [samples_for(prompts, labels, x, k, int(cfg.naming.samples_per_cluster)) for k in ks]
    ep = EndpointConfig.from_mapping(cfg.naming.endpoint, "config.naming.endpoint")
    with Journal(out / "journal" / "naming.jsonl") as jn:
        replies = asyncio.run(_name_clusters(ep, jn, sample_sets, cfg))

    infos: list[ClusterInfo] = []
    used: set[str] = {_squash(cfg.taxonomy.other_name)}
    for k, samples, reply in zip(ks, sample_sets, replies):
        parsed = parse_naming(reply)
        name, definition = (clean_name(parsed[0]), parsed[1]) if parsed else ("", "")
        by_judge = bool(name)
        if not name:
            name, definition = f"Cluster {k + 1}", "requests like: " + samples[0].replace("\n", " ")
        base, n = name, 2
        while _squash(name) in used:  # two clusters the judge named alike stay two categories
            name, n = f"{base} {n}", n + 1
        used.add(_squash(name))
        infos.append(ClusterInfo(k, int((labels == k).sum()), samples, reply, name, definition, by_judge))

    n_held = int(cfg.taxonomy.held_out)
    held = [i.name for i in sorted(infos, key=lambda i: (i.size, i.cluster))[:n_held]] if n_held else []
    doc = {
        "name": cfg.taxonomy.name,
        "description": cfg.taxonomy.description or f"derived from {len(prompts)} prompts ({cfg.cluster.method}, seed {seed})",
        "other": cfg.taxonomy.other_name,
        "categories": [{"name": i.name, "definition": i.definition} for i in infos]
        + [{"name": cfg.taxonomy.other_name, "definition": cfg.taxonomy.other_definition, "allowable": False}],
        "seen": [i.name for i in infos if i.name not in held],
        "held_out": held,
    }
    try:
        tax: Taxonomy = taxonomy_from_dict(doc, str(out / "taxonomy.yaml"))
    except TaxonomyError as e:
        raise TaxonomyError(f"the derived taxonomy does not validate: {e}") from None
    import yaml

    _write_atomic(out / "taxonomy.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100).encode())
    report = {
        "n_prompts": len(prompts),
        "n_noise": int((labels < 0).sum()),
        "embedding": cfg.embedding.kind,
        "method": cfg.cluster.method,
        "seed": seed,
        "clusters": [dataclasses.asdict(i) for i in infos],
        "labels": labels.tolist(),
        "taxonomy": str(out / "taxonomy.yaml"),
        "n_categories": len(tax.categories),
    }
    _write_atomic(out / "clusters.json", json.dumps(report, indent=2, ensure_ascii=False).encode())
    _write_atomic(out / "clusters.md", _markdown(report).encode())
    if cfg.plot:
        report["plot"] = str(out / "clusters.png")
        plot_clusters(x, labels, {i.cluster: i.name for i in infos}, out / "clusters.png", seed)
    return report


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# Derived taxonomy: {report['n_prompts']} prompts, {report['method']} on {report['embedding']} embeddings",
             "", f"{len(report['clusters'])} clusters, {report['n_noise']} noise prompts (folded into the catch-all).", "",
             "| cluster | size | name | named by judge | definition |", "| --- | --- | --- | --- | --- |"]
    for c in report["clusters"]:
        lines.append(f"| {c['cluster']} | {c['size']} | {c['name']} | {'yes' if c['named_by_judge'] else 'no'} | {c['definition']} |")
    for c in report["clusters"]:
        lines += ["", f"## {c['name']} (cluster {c['cluster']}, {c['size']} prompts)", ""] + [f"- {s}" for s in c["samples"]]
    return "\n".join(lines) + "\n"


def plot_clusters(x: np.ndarray, labels: np.ndarray, names: Mapping[int, str], path: Path, seed: int) -> None:
    """2-D PCA scatter, one colour per cluster, noise in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=seed).fit_transform(x) if x.shape[1] > 2 else x
    fig, ax = plt.subplots(figsize=(7, 5))
    for k in sorted(set(labels.tolist())):
        m = labels == k
        ax.scatter(xy[m, 0], xy[m, 1], s=12, c="#bbbbbb" if k < 0 else None,
                   label="noise" if k < 0 else names.get(k, str(k)))
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Prompt clusters (PCA of the embeddings)")
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
