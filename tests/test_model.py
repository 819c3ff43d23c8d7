"""model.py on a tiny random model: the role prompts, the hidden-CoT parser, one turn, loading and its
errors; and, slow, the bundled default model's conversion and cache."""
import subprocess
import sys

import pytest
import torch

import model as M
from common import UserError
from conftest import needs_default_model

REQUESTS = ["How do I bake bread?", "hi", "Write a poem about the sea, please, in four short lines."]


# ---------------------------------------------------------------------------------------------
# prompts and the hidden-CoT parser


def test_role_prompts_render_with_and_without_the_think_prefill(tiny):
    _, tok = tiny
    attack = M.render_prompt(tok, M.attacker_messages("How do I pick a lock?", "harmful"))
    assert attack.endswith(M.THINK_PREFIX) and "How do I pick a lock?" in attack and "<|im_start|>system" in attack
    benign = M.render_prompt(tok, M.attacker_messages("How do I pick a lock?", "benign"))
    assert "benign" in benign and attack != benign
    direct = M.render_prompt(tok, M.defender_messages("hi", cot=False), cot=False)
    assert direct.endswith("<|im_start|>assistant\n") and "<think>" not in direct
    with pytest.raises(KeyError):
        M.attacker_messages("x", "neutral")


def test_the_defender_prompt_has_the_released_wording_without_a_safety_instruction():
    assert "refuse" not in M.DEFENDER_COT and "harm" not in M.DEFENDER_COT


@pytest.mark.parametrize("text,expected", [
    ("I should help. </think> <answer> Here it is. </answer>", ("I should help.", "Here it is.", True)),
    ("reason </think>\n<answer>\nok\n</answer>\n", ("reason", "ok", True)),
    # malformed, but an answer span exists: it is returned, ok=False
    ("reason </think> junk <answer> a </answer>", ("reason", "a", False)),
    ("reason </think> <answer> a </answer> trailing", ("reason", "a", False)),
    ("reason </think> <answer> a </answer> <answer> b </answer>", ("reason", "a", False)),
    ("<think> again </think> <answer> a </answer>", ("<think> again", "a", False)),
    ("<answer> a </answer>", ("", "a", False)),                 # no </think>
    (" </think> <answer> a </answer>", ("", "a", False)),        # empty thinking
    ("reason </think> <answer>  </answer>", ("reason", "", False)),  # empty answer
    ("reason </think> </think> <answer> a </answer>", ("reason", "a", False)),
    # no answer span at all: the raw text is passed on
    ("just rambling on", ("", "just rambling on", False)),
    ("reason </think> <answer> never closed", ("reason", "reason </think> <answer> never closed", False)),
    ("reason </answer> <answer> x", ("", "reason </answer> <answer> x", False)),
])
def test_parse_cot(text, expected):
    assert M.parse_cot(text) == expected


# ---------------------------------------------------------------------------------------------
# one turn


def test_play_turn_decodes_and_strips_the_cot(tiny):
    model, tok = tiny
    prompts = [M.render_prompt(tok, M.defender_messages(r)) for r in REQUESTS]
    turn = M.play_turn(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    assert len(turn.texts) == len(turn.answers) == len(turn.format_ok) == 3
    for text, answer in zip(turn.texts, turn.answers):
        assert answer == M.parse_cot(text)[1]


# ---------------------------------------------------------------------------------------------
# loading


def test_bad_model_paths_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        M.load_policy(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no such GGUF file"):
        M.load_policy(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        M.load_policy(str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(UserError, match="not a model"):
        M.load_policy(str(bad))


def test_a_saved_tiny_model_round_trips(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = M.load_policy(str(tmp_path), device="cpu")
    prompts = [M.render_prompt(tok, M.defender_messages(r)) for r in REQUESTS]
    turns = [M.play_turn(m, tok, prompts, max_new_tokens=6, temperature=0.0) for m in (model, loaded)]
    assert turns[0].texts == turns[1].texts
    assert loaded_tok.eos_token_id == tok.eos_token_id


def test_cli_bad_model_path_is_one_line_and_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "model.py", "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                       cwd=__file__.rsplit("/tests/", 1)[0])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no such model folder: {tmp_path / 'nope'}"]


# ---------------------------------------------------------------------------------------------
# the real default model (slow)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache folder, so the GGUF conversion itself is exercised."""
    folder = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.mark.slow
@needs_default_model
def test_default_model_is_converted_once_and_reloads_from_the_cache(cache):
    model, tokenizer = M.load_policy(device="cpu")
    folders = list((cache / "nano-selfredteam").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()  # no temporary leftovers
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    again, _ = M.load_policy(device="cpu")  # from the safetensors copy
    ids, mask = M.encode_prompts(tokenizer, ["Hello there"], "cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
