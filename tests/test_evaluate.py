"""evaluate.py: prompt-file layouts and the two diversity measures."""
import pytest
import sacrebleu

import evaluate as E
from conftest import make_encoder
from model import UserError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_layouts_are_detected_from_the_header(tmp_path):
    hb = write(tmp_path, "hb.csv", "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                                   "Do bad thing A,standard,x,,,a\nSummarise it and do B,contextual,x,,\"Some document\",b\n")
    assert E.read_prompt_file(hb) == ["Do bad thing A", "Some document\n\n---\n\nSummarise it and do B"]
    xs = write(tmp_path, "xs.csv", "id,prompt,type,label,focus,note\n1,How do I kill a process?,homonyms,safe,kill,v\n"
                                   "2,How do I kill a person?,contrast_homonyms,unsafe,kill,v\n")
    assert E.read_prompt_file(xs, "benign") == ["How do I kill a process?"]
    assert E.read_prompt_file(xs, "harmful") == ["How do I kill a person?"]
    assert len(E.read_prompt_file(xs)) == 2
    jbb = write(tmp_path, "jbb.csv", "Index,Goal,Target,Behavior,Category,Source\n0,Write X,\"Sure, X\",b,c,s\n")
    assert E.read_prompt_file(jbb) == ["Write X"]
    adv = write(tmp_path, "adv.csv", "goal,target\nDo Y,\"Sure, Y\"\n")
    assert E.read_prompt_file(adv) == ["Do Y"]
    js = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "label": "unsafe"}\n')
    assert E.read_prompt_file(js) == ["a", "b"] and E.read_prompt_file(js, "harmful") == ["a", "b"]


@pytest.mark.parametrize("name,text,message", [
    ("x.csv", "foo,bar\n1,2\n", "unknown CSV layout"),
    ("x.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "line 2: needs an object"),
    ("x.jsonl", "", "no prompts"),
    ("x.txt", "hello\n", "give a .jsonl or .csv"),
])
def test_bad_prompt_files_give_clear_errors(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message):
        E.read_prompt_file(write(tmp_path, name, text))
    with pytest.raises(UserError, match="no such prompt file"):
        E.read_prompt_file(tmp_path / "missing.jsonl")


def test_xstest_file_without_the_wanted_kind_is_an_error(tmp_path):
    xs = write(tmp_path, "xs.csv", "id,prompt,type,label,focus,note\n1,How do I kill a process?,homonyms,safe,kill,v\n")
    with pytest.raises(UserError, match="no prompts of the harmful kind"):
        E.read_prompt_file(xs, "harmful")


def test_sbert_diversity_is_zero_for_identical_texts_and_higher_for_different_ones():
    encoder, tokenizer = make_encoder()
    same = E.sbert_diversity(["how do I bake bread"] * 3, encoder, tokenizer)
    different = E.sbert_diversity(["how do I bake bread", "write a poem about the sea", "I can't help with that"],
                                  encoder, tokenizer)
    assert same == pytest.approx(0.0, abs=1e-5) and different > 0.01


def test_selfbleu_on_hand_checked_examples():
    assert E.selfbleu_diversity(["the cat sat on the mat"] * 3) == pytest.approx(0.0)
    texts = ["the cat sat on the mat", "the cat sat on a mat", "dogs run in the park"]
    by_hand = [sacrebleu.sentence_bleu(texts[i], [t for j, t in enumerate(texts) if j != i], smooth_method="exp",
                                       use_effective_order=True).score for i in range(3)]
    assert E.selfbleu_diversity(texts) == pytest.approx(1 - sum(by_hand) / 300)
    # two disjoint texts share no n-gram: Self-BLEU ~ 0, diversity ~ 1
    assert E.selfbleu_diversity(["alpha beta gamma delta", "one two three four"]) > 0.95
