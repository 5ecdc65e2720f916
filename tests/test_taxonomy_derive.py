"""Taxonomy derivation: planted clusters are recovered (adjusted Rand index), names come from the
judge's structured reply, reruns are deterministic and resume from the journals."""

import json
import random
import re

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cosa_jax import taxonomy_derive as td
from cosa_jax.taxonomy import load_taxonomy
from cosa_jax.testing.scripted_server import FakeChatServer

# Four planted topics, each with its own vocabulary; prompts mix a topic's words at random.
TOPICS = {
    "Bread Baking": ["sourdough", "yeast", "dough", "knead", "crust", "flour", "oven", "loaf"],
    "Dinghy Sailing": ["sail", "mast", "tiller", "jib", "regatta", "dinghy", "harbour", "wind"],
    "Vegetable Gardening": ["tomato", "compost", "seedling", "mulch", "soil", "weeds", "trellis", "harvest"],
    "Chess Openings": ["gambit", "bishop", "knight", "castling", "pawn", "sicilian", "opening", "checkmate"],
}
# Frames use only English stop words, so the topic words carry the signal.
FRAMES = ["How do I get the {} and the {} to work with my {} and {}?", "What is the {} for a {} with a {} or {}?",
          "Why does my {} do that to the {} when I try the {} and {}?", "Should I {} or {} if the {} has no {}?"]


def planted(n_per_topic=12, seed=0):
    rng = random.Random(seed)
    prompts, gold = [], []
    for t, (topic, words) in enumerate(TOPICS.items()):
        for _ in range(n_per_topic):
            prompts.append(rng.choice(FRAMES).format(*rng.sample(words, 4)))
            gold.append(t)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [gold[i] for i in order]


class NamingJudge:
    """Reply function: names a cluster by the topic whose words its samples use most."""

    def __init__(self):
        self.bodies = []

    def __call__(self, body):
        self.bodies.append(body)
        listed = body["messages"][-1]["content"].split("Requests:\n", 1)[1].split("\n\n", 1)[0].lower()
        topic = max(TOPICS, key=lambda t: sum(listed.count(w) for w in TOPICS[t]))
        return "Thinking about the samples.\n" + json.dumps({"name": topic + ".", "definition": f"questions about {topic.lower()}"})


def _cfg(tmp_path, prompts_file, base_url, **over):
    c = td.default_config()
    c.out_dir = str(tmp_path)
    c.progress = False
    c.sources = [dict(kind="file", path=str(prompts_file), field="prompt")]
    c.embedding.kind = "tfidf"
    c.pca_dim = 8
    c.cluster.n_clusters = 4
    c.naming.samples_per_cluster = 5
    c.naming.endpoint.base_url = base_url
    c.taxonomy.name = "hobbies"
    c.taxonomy.held_out = 1
    for k, v in over.items():
        node, leaf = (c, k) if "." not in k else (c[k.split(".")[0]], k.split(".")[1])
        node[leaf] = v
    return c


@pytest.fixture()
def prompts_file(tmp_path):
    prompts, gold = planted()
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    return p, prompts, gold


def _ari(report, prompts, gold):
    assert report["n_prompts"] == len(prompts)  # dedupe kept every planted prompt, in file order
    return adjusted_rand_score(gold, report["labels"])


def test_kmeans_recovers_planted_clusters_and_names_them(tmp_path, prompts_file):
    path, prompts, gold = prompts_file
    judge = NamingJudge()
    with FakeChatServer(judge) as srv:
        rep = td.derive(_cfg(tmp_path / "a", path, srv.base_url))
        n_requests = srv.total_requests()
        again = td.derive(_cfg(tmp_path / "a", path, srv.base_url))  # resume: everything journaled
        assert srv.total_requests() == n_requests
        other = td.derive(_cfg(tmp_path / "b", path, srv.base_url))  # fresh dir, same seed
    ari = _ari(rep, prompts, gold)
    print(f"k-means on TF-IDF: adjusted Rand index {ari:.3f}")
    assert ari >= 0.9
    tax = load_taxonomy(tmp_path / "a" / "taxonomy.yaml")
    assert sorted(c.value for c in tax.categories[:-1]) == sorted(TOPICS)  # '.' cleaned off the names
    assert tax.other.value == "Other Harms" and len(tax.held_out) == 1 and len(tax.seen) == 3
    assert tax.parse_category("Bread Baking").definition == "questions about bread baking"
    # Structured output: the naming requests carried the {name, definition} schema.
    rf = judge.bodies[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == td.NAME_SCHEMA
    # Deterministic for a seed: identical outputs from a rerun and from a fresh directory.
    assert again["labels"] == rep["labels"] == other["labels"]
    assert (tmp_path / "a" / "taxonomy.yaml").read_text() == (tmp_path / "b" / "taxonomy.yaml").read_text()
    assert (tmp_path / "a" / "clusters.png").stat().st_size > 0
    md = (tmp_path / "a" / "clusters.md").read_text()
    assert all(f"| {t} | yes |" in md for t in TOPICS)
    sizes = sorted(c["size"] for c in json.loads((tmp_path / "a" / "clusters.json").read_text())["clusters"])
    assert sum(sizes) == len(prompts)


def test_hdbscan_finds_the_number_of_clusters(tmp_path, prompts_file):
    path, prompts, gold = prompts_file
    with FakeChatServer(NamingJudge()) as srv:
        rep = td.derive(_cfg(tmp_path / "h", path, srv.base_url, **{"cluster.method": "hdbscan", "cluster.min_cluster_size": 5,
                                                                  "taxonomy.held_out": 0}))
    found = rep["labels"]
    ari = _ari(rep, prompts, gold)
    print(f"HDBSCAN on TF-IDF: {len(rep['clusters'])} clusters, {rep['n_noise']} noise, adjusted Rand index {ari:.3f}")
    assert ari >= 0.7
    assert len(rep["clusters"]) == len(set(found) - {-1})


def test_unparseable_naming_falls_back_and_is_reported(tmp_path, prompts_file):
    path, _, _ = prompts_file
    with FakeChatServer(lambda body: "no idea") as srv:
        rep = td.derive(_cfg(tmp_path / "x", path, srv.base_url))
        # one try plus one re-ask per cluster
        assert srv.total_requests() == 2 * 4
    assert [c["named_by_judge"] for c in rep["clusters"]] == [False] * 4
    assert load_taxonomy(tmp_path / "x" / "taxonomy.yaml").categories[0].value == "Cluster 1"


def test_clean_name_escapes_separators():
    assert td.clean_name("Drugs. And: Stuff") == "Drugs And Stuff"
    assert td.clean_name("-Self-Harm-") == "Self-Harm"
    assert td.clean_name("none") == ""


@pytest.mark.parametrize("field,value,match", [
    ("embedding.kind", "sparkles", "config.embedding.kind"),
    ("cluster.method", "dbscan", "config.cluster.method"),
    ("cluster.n_clusters", 0, "config.cluster.n_clusters"),
    ("pca_dim", -1, "config.pca_dim"),
])
def test_bad_config_names_the_field(field, value, match):
    c = td.default_config()
    node, leaf = (c, field) if "." not in field else (c[field.split(".")[0]], field.split(".")[1])
    node[leaf] = value
    with pytest.raises(ValueError, match=re.escape(match)):
        td.validate(c)


def test_model_embedding_is_mean_pooled_hidden_states(tmp_path):
    """Our JAX mean pooling against transformers' PyTorch Llama on a tiny random model."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from cosa_jax.models.hf_io import load_hf
    from cosa_jax.testing.model_fixtures import make_hf_model, right_padded_batch

    ref = make_hf_model(tmp_path / "tiny", vocab_size=128)
    model, mcfg = load_hf(tmp_path / "tiny")
    ids, mask = right_padded_batch(128, [5, 11, 8])
    got = np.asarray(td.mean_pooled_hidden(model.params(), mcfg, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        h = ref.model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    for b, n in enumerate(mask.sum(1)):
        np.testing.assert_allclose(got[b], h[b, :n].mean(0), rtol=1e-4, atol=1e-5)
