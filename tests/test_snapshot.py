"""The Llama-3.1 snapshot maker: transformers' PyTorch Llama loads the tiny snapshot and computes
the logits our Flax forward computes from it; the 8B shape is checked from its metadata only."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from cosa_jax.models import snapshot
from cosa_jax.models.hf_io import load_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama31")
    snapshot.write_snapshot("tiny", out, seed=3, log=lambda *_: None)
    return out


def test_tiny_snapshot_layout(tiny_dir):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and all((tiny_dir / f).exists() for f in files)
    assert files[0] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[-1]
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["vocab_size"] == 128256
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tok.eos_token == "<|eot_id|>" and len(tok) == 128256


def test_tiny_snapshot_logits_match_transformers(tiny_dir):
    text = "<|start_header_id|>user<|end_header_id|>\n\nIs this a Llama-3.1 checkpoint?"
    ids = AutoTokenizer.from_pretrained(str(tiny_dir))(text)["input_ids"]
    assert ids[0] == 128000 and len(ids) > 8
    hf = LlamaForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    assert AutoConfig.from_pretrained(str(tiny_dir)).rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()[0]
    model, cfg = load_hf(tiny_dir, dtype="float32")
    got = np.asarray(model(np.asarray([ids], np.int32)))[0]
    assert got.shape == want.shape == (len(ids), 128256)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert np.abs(want[1:] - want[:-1]).max() > 1e-2  # logits depend on the token: not degenerate


def test_seeded_and_resumable(tmp_path, tiny_dir):
    from safetensors.numpy import load_file
    lines = []
    snapshot.write_snapshot("tiny", tmp_path, seed=3, log=lines.append)
    a = load_file(str(tmp_path / "model-00002-of-00003.safetensors"))
    b = load_file(str(tiny_dir / "model-00002-of-00003.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # A crash after shard 1: the rerun keeps the finished shards and writes the missing one.
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    lines.clear()
    snapshot.write_snapshot("tiny", tmp_path, seed=3, log=lines.append)
    assert sum("kept" in line for line in lines) == 2 and len(lines) == 3
    # Another seed gives other weights.
    snapshot.write_snapshot("tiny", tmp_path, seed=4, log=lines.append)
    c = load_file(str(tmp_path / "model-00002-of-00003.safetensors"))
    assert not np.array_equal(c["model.norm.weight"], b["model.norm.weight"])


def test_llama31_8b_metadata_only(tmp_path):
    out = tmp_path / "llama31-8b"
    subprocess.run([sys.executable, "-m", "cosa_jax.models.snapshot", "--shape", "llama-3.1-8b",
                    "--out", str(out), "--meta-only"], check=True, capture_output=True)
    assert not list(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # Llama-3.1-8B in bf16: 8,030,261,248 parameters, written out from the architecture.
    d, f, v, layers, kv = 4096, 14336, 128256, 32, 8 * 128
    params = 2 * v * d + d + layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)
    assert params == 8_030_261_248
    assert index["metadata"]["total_size"] == 2 * params
    assert len(index["weight_map"]) == 2 + 1 + 9 * 32
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    plan = snapshot.plan_shards(snapshot.LlamaConfig.from_json_file(out / "config.json"),
                                itemsize=2, max_shard_bytes=5 * 10**9)
    per_shard = [sum(int(np.prod(plan.shapes[n])) * 2 for n in plan.tensors_in(k))
                 for k in range(len(plan.files))]
    assert max(per_shard) <= 5 * 10**9 and sum(per_shard) == 2 * params
    hf_cfg = AutoConfig.from_pretrained(str(out))
    assert (hf_cfg.num_hidden_layers, hf_cfg.num_key_value_heads, hf_cfg.vocab_size) == (32, 8, 128256)
    assert hf_cfg.rope_scaling["rope_type"] == "llama3" and hf_cfg.rope_scaling["factor"] == 8.0
    assert AutoTokenizer.from_pretrained(str(out)).eos_token_id == 128009


def test_training_on_the_tiny_snapshot_with_hub_layout_data(tiny_dir, tmp_path):
    """A Llama-3.1 checkpoint (its tokenizer, template and file layout) trained for two DPO steps
    on pairs read from a CoSAlign-Train-shaped repo, exported, and read back by transformers."""
    from pathlib import Path

    from cosa_jax.train import config as tc
    from cosa_jax.train.trainer import Trainer

    repo = Path(__file__).resolve().parent / "fixtures" / "hub" / "microsoft" / "CoSAlign-Train"
    c = tc.default_config()
    c.model.path = str(tiny_dir)
    c.model.compute_dtype = "float32"
    c.output_dir = str(tmp_path / "run")
    c.data.train, c.data.train_split = str(repo), "train_bt"
    c.data.eval, c.data.eval_split = str(repo), "dev"
    c.data.eval_pairs = 2
    c.data.max_length, c.data.max_prompt_length = 192, 128
    c.train.max_steps, c.train.batch_size, c.train.grad_accum = 2, 2, 1
    c.train.lr, c.train.warmup_steps = 1e-3, 0
    c.checkpoint.every = 0
    out = Trainer(c).run()
    assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
    hf = LlamaForCausalLM.from_pretrained(out["hf_dir"], dtype=torch.float32)
    assert hf.config.vocab_size == 128256
    assert AutoTokenizer.from_pretrained(out["hf_dir"]).eos_token == "<|eot_id|>"
