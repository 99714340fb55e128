"""Mistral checkpoints (transformers' MistralForCausalLM: Llama's architecture and weight names, plus
a sliding attention window) load as Llama models: logits equal transformers', and a window shorter
than the context caps the context, so no prompt is ever attended past the window."""

from __future__ import annotations

import pytest
import torch

from herd.checkpoint import build_model, read_checkpoint
from herd.errors import HerdError
from herd.inference.generate import generate_batch

transformers = pytest.importorskip("transformers")


def _mistral(tmp_path, window):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     rope_theta=1e6, sliding_window=window, head_dim=24)
    ref = transformers.MistralForCausalLM(cfg).eval()
    ref.save_pretrained(str(tmp_path))
    ckpt = read_checkpoint(tmp_path)
    return ref, build_model(ckpt.args, ckpt.state_dict).eval(), ckpt.args


@pytest.mark.parametrize("window", [None, 4096, 24])
def test_logits_and_greedy_ids_are_transformers(tmp_path, window):
    ref, model, args = _mistral(tmp_path, window)
    assert args.max_seq_len == (24 if window == 24 else 128) and args.hd == 24
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-5, atol=1e-5)
        want = ref.generate(x[:1, :8], max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 8:].tolist()
    assert generate_batch(model, [x[0, :8].tolist()], max_new_tokens=12)[0].ids == want


def test_a_prompt_past_the_window_is_refused(tmp_path):
    _, model, _ = _mistral(tmp_path, 24)
    with pytest.raises(HerdError, match="prompt of 30 tokens does not fit the model's context of 24"):
        generate_batch(model, [list(range(30))], max_new_tokens=2)


def test_other_architectures_stay_refused(tmp_path):
    from herd.checkpoint.hf import args_from_hf_config

    with pytest.raises(HerdError, match="model_type 'mixtral' is not a Llama-architecture model"):
        args_from_hf_config({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
