"""Hugging Face import/export: round trips through transformers, and clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cosa_jax.models import CheckpointError, ConfigError, LlamaConfig, load_hf, save_hf
from cosa_jax.testing.model_fixtures import TINY_LLAMA31, hf_logits, make_hf_model, right_padded_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, make_hf_model(path)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tied")
    return path, make_hf_model(path, tie_word_embeddings=True, seed=7)


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_export_loads_in_transformers_with_same_logits(which, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    model, cfg = load_hf(path)
    out = save_hf(model, cfg, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = right_padded_batch(cfg.vocab_size, [14, 10], seed=1)
    ref = hf_logits(reloaded, ids, mask)
    ours = np.asarray(model(ids, mask))
    assert np.abs(ref - ours)[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("which", ["tiny", "tiny_tied"])
def test_load_save_load_is_identity(which, request, tmp_path):
    path, _ = request.getfixturevalue(which)
    model, cfg = load_hf(path)
    # A small shard limit forces the sharded layout with an index file.
    out = save_hf(model, cfg, tmp_path / "rt", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model2, cfg2 = load_hf(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(model2.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hub_style_rope_spelling_is_accepted(tiny, tmp_path):
    path, _ = tiny
    model, cfg = load_hf(path)
    hub = tmp_path / "hub_style"
    shutil.copytree(path, hub)
    raw = json.loads((hub / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (hub / "config.json").write_text(json.dumps(raw))
    _, cfg_hub = load_hf(hub)
    assert cfg_hub == cfg


def test_bf16_export_and_dtype_policy(tiny, tmp_path):
    path, _ = tiny
    model, cfg = load_hf(path, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(model.params()))
    out = save_hf(model, cfg, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------- bad inputs
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_hf(tmp_path / "no_such_model")


def test_missing_weights_file_names_directory(tiny, tmp_path):
    bad = _copy(tiny[0], tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="noweights.*model.safetensors"):
        load_hf(bad)


def test_missing_tensor_names_key(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    bad = _copy(tiny[0], tmp_path / "missing_tensor")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(bad)


def test_wrong_shape_names_key_and_shapes(tiny, tmp_path):
    bad = _copy(tiny[0], tmp_path / "wrong_shape")
    raw = json.loads((bad / "config.json").read_text())
    raw["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*\(160, 64\).*\(96, 64\)"):
        load_hf(bad)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    bad = _copy(tiny[0], tmp_path / "gemma")
    raw = json.loads((bad / "config.json").read_text())
    raw.update(model_type="gemma", architectures=["GemmaForCausalLM"])
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="GemmaForCausalLM"):
        load_hf(bad)


def test_corrupt_config_names_file(tiny, tmp_path):
    bad = _copy(tiny[0], tmp_path / "corrupt")
    (bad / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"corrupt.*config\.json"):
        load_hf(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="config.json.*num_attention_heads"):
        load_hf(bad)


def test_unsupported_rope_type_is_named():
    raw = {**TINY_LLAMA31, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4}}
    with pytest.raises(ConfigError, match="yarn"):
        LlamaConfig.from_hf_dict(raw, source="x/config.json")
