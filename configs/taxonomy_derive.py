"""Taxonomy derivation on the shipped mini prompts: SmolLM2 mean-pooled embeddings, k-means,
cluster names from the judge endpoint at 127.0.0.1:8000 (``python -m launch.serve --config.model=embedded:smollm2-135m-instruct --config.served_model_name=judge``, vLLM...).

``python -m launch.taxonomy --config configs/taxonomy_derive.py``; point the judge elsewhere with
``--config.naming.endpoint.base_url=...``; use ``--config.cluster.method=hdbscan`` to let the
data choose the number of clusters.
"""

from cosa_jax.taxonomy_derive import default_config


def get_config():
    c = default_config()
    c.out_dir = "runs/taxonomy_derive"
    c.sources = [dict(kind="mini")]
    c.embedding.kind = "model"
    c.embedding.model = "embedded:smollm2-135m-instruct"
    c.pca_dim = 16
    c.cluster.method = "kmeans"
    c.cluster.n_clusters = 7
    c.naming.samples_per_cluster = 8
    c.taxonomy.name = "derived_mini"
    c.taxonomy.held_out = 3  # as in the paper: train on some categories, hold out the rest
    return c
