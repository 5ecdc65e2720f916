"""KV-cache generation: equals cache-free greedy decoding and HF generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosa_jax.inference.sampler import SamplingParams, generate
from cosa_jax.models import EMBEDDED_MODEL, load_hf, resolve_model_dir
from cosa_jax.models.llama import forward
from cosa_jax.testing.model_fixtures import make_loaded_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_loaded_model(tmp_path_factory.mktemp("tiny_sampler"))


def greedy_without_cache(params, cfg, prompt, n_new, eos):
    """Recompute the full sequence every step: no cache at all."""
    fwd = jax.jit(forward, static_argnums=1)
    seq = list(prompt)
    for _ in range(n_new):
        logits = fwd(params, cfg, jnp.asarray([seq], jnp.int32))
        tok = int(jnp.argmax(logits[0, -1]))
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt):]


def test_cached_greedy_equals_uncached_for_ragged_batch(tiny):
    _, params, cfg = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 320, n).tolist() for n in (5, 17, 11)]
    outs = generate(params, cfg, prompts, SamplingParams(max_new_tokens=24), eos_ids=[2])
    for prompt, out in zip(prompts, outs):
        ref = greedy_without_cache(params, cfg, prompt, 24, {2})
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")


def test_cached_greedy_equals_hf_generate_tiny(tiny):
    hf, params, cfg = tiny
    prompt = np.random.default_rng(1).integers(3, 320, 9).tolist()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                      eos_token_id=None, pad_token_id=0, min_new_tokens=20)[0, 9:].tolist()
    out = generate(params, cfg, [prompt], SamplingParams(max_new_tokens=20), eos_ids=[-1], pad_id=0)
    assert out[0].token_ids == ref


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    _, params, cfg = tiny
    prompt = [[5, 6, 7, 8]]
    hot = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a = generate(params, cfg, prompt, hot, eos_ids=[-1])[0].token_ids
    b = generate(params, cfg, prompt, hot, eos_ids=[-1])[0].token_ids
    c = generate(params, cfg, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=4),
                 eos_ids=[-1])[0].token_ids
    assert a == b and a != c
    greedy = generate(params, cfg, prompt, SamplingParams(max_new_tokens=16), eos_ids=[-1])
    top1 = generate(params, cfg, prompt, SamplingParams(max_new_tokens=16, temperature=0.7,
                                                        top_k=1, seed=9), eos_ids=[-1])
    assert greedy[0].token_ids == top1[0].token_ids


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate():
    path = resolve_model_dir(EMBEDDED_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, cfg = load_hf(EMBEDDED_MODEL)
    chats = [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Describe how bread is made, step by step."}],
    ]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for c in chats]
    ours = generate(model.params(), cfg, prompts, SamplingParams(max_new_tokens=40), tokenizer=tok)
    for prompt, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):]
        ref = ref.tolist()
        assert len(ref) >= 32
        assert out.token_ids == ref, (tok.decode(out.token_ids), tok.decode(ref))
