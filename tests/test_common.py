"""common.py: one-line user errors, writing aside, the JSONL reader, prompt-file layouts, device and
dtype, the stopwatch."""
import json
import sys
import time

import pytest
import torch

import common as C
from conftest import write_file


def test_user_errors_exit_with_one_line():
    def main():
        raise C.UserError("bad flag")
    with pytest.raises(SystemExit) as e:
        C.exit_on_user_error(main)
    assert e.value.code == "error: bad flag"


def test_the_cache_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert C.cache_dir() == tmp_path / "nano-selfredteam"


# ----------------------------------------------------------------------------------------------
# Writing aside


def test_a_file_written_aside_replaces_the_old_one_only_when_complete(tmp_path):
    path = write_file(tmp_path, "report.json", "old")
    C.write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError):
        with C.written_aside(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != path  # a figure keeps its format
            tmp.write_text("half")
            raise RuntimeError("the disk is full")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    C.write_jsonl(path, [{"a": 1}, {"b": None}])
    assert path.read_text() == '{"a": 1}\n{"b": null}\n'


def test_a_folder_written_aside_appears_whole_and_one_put_there_first_is_kept(tmp_path):
    folder = tmp_path / "step_0001"
    with C.written_aside(folder) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("ours")
        assert not folder.exists()
    assert (folder / "config.json").read_text() == "ours"
    with C.written_aside(folder) as tmp:  # another process converted the same model first: keep theirs
        tmp.mkdir()
        (tmp / "config.json").write_text("second")
    assert (folder / "config.json").read_text() == "ours" and sorted(p.name for p in tmp_path.iterdir()) == ["step_0001"]


# ----------------------------------------------------------------------------------------------
# Reading


def test_read_jsonl_names_a_bad_line_and_skips_blank_ones(tmp_path):
    path = write_file(tmp_path, "x.jsonl", '{"a": 1}\n\n[2]\n')
    assert C.read_jsonl(path) == [{"a": 1}, [2]]
    with pytest.raises(C.UserError, match=r"x.jsonl line 3: too big"):
        C.read_jsonl(path, check=lambda row: "too big" if row == [2] else None)
    write_file(tmp_path, "x.jsonl", '{"a": 1}\n{"a": oops}\n')
    with pytest.raises(C.UserError, match=r"x.jsonl line 2: not valid JSON"):
        C.read_jsonl(path)
    with pytest.raises(C.UserError, match="cannot read"):
        C.read_jsonl(tmp_path / "missing.jsonl")


def test_a_log_cut_short_by_a_crash_reads_up_to_the_cut(tmp_path):
    path = write_file(tmp_path, "metrics.jsonl", json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + '\n{"step": 3, "lo')
    assert C.read_jsonl(path, partial=True) == [{"step": 1}, {"step": 2}]
    assert C.read_jsonl(tmp_path / "none.jsonl", partial=True) == []


def test_layouts_are_detected_from_the_header(tmp_path):
    hb = write_file(tmp_path, "hb.csv", "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                                   "Do bad thing A,standard,x,,,a\nSummarise it and do B,contextual,x,,\"Some document\",b\n")
    assert C.read_prompt_file(hb) == ["Do bad thing A", "Some document\n\n---\n\nSummarise it and do B"]
    xs = write_file(tmp_path, "xs.csv", "id,prompt,type,label,focus,note\n1,How do I kill a process?,homonyms,safe,kill,v\n"
                                   "2,How do I kill a person?,contrast_homonyms,unsafe,kill,v\n")
    assert C.read_prompt_file(xs, "benign") == ["How do I kill a process?"]
    assert C.read_prompt_file(xs, "harmful") == ["How do I kill a person?"]
    assert len(C.read_prompt_file(xs)) == 2
    jbb = write_file(tmp_path, "jbb.csv", "Index,Goal,Target,Behavior,Category,Source\n0,Write X,\"Sure, X\",b,c,s\n")
    assert C.read_prompt_file(jbb) == ["Write X"]
    adv = write_file(tmp_path, "adv.csv", "goal,target\nDo Y,\"Sure, Y\"\n")
    assert C.read_prompt_file(adv) == ["Do Y"]
    js = write_file(tmp_path, "p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "label": "unsafe"}\n')
    assert C.read_prompt_file(js) == ["a", "b"] and C.read_prompt_file(js, "harmful") == ["a", "b"]


@pytest.mark.parametrize("name,text,message", [
    ("x.csv", "foo,bar\n1,2\n", "unknown CSV layout"),
    ("x.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "line 2: needs an object"),
    ("x.jsonl", "", "no prompts"),
    ("x.txt", "hello\n", "give a .jsonl or .csv"),
])
def test_bad_prompt_files_give_clear_errors(tmp_path, name, text, message):
    with pytest.raises(C.UserError, match=message):
        C.read_prompt_file(write_file(tmp_path, name, text))
    with pytest.raises(C.UserError, match="no such prompt file"):
        C.read_prompt_file(tmp_path / "missing.jsonl")


def test_xstest_file_without_the_wanted_kind_is_an_error(tmp_path):
    xs = write_file(tmp_path, "xs.csv", "id,prompt,type,label,focus,note\n1,How do I kill a process?,homonyms,safe,kill,v\n")
    with pytest.raises(C.UserError, match="no prompts of the harmful kind"):
        C.read_prompt_file(xs, "harmful")


# ----------------------------------------------------------------------------------------------
# Device, dtype, bookkeeping


@pytest.mark.parametrize("fast_bf16,device,expected", [
    (False, "cpu", torch.float32), (True, "cpu", torch.float32), (False, "cuda", torch.bfloat16)])
def test_auto_dtype_is_bf16_on_cuda_and_float32_on_any_cpu(monkeypatch, fast_bf16, device, expected):
    monkeypatch.setattr(C, "cpu_has_bf16", lambda: fast_bf16)  # bf16 instructions do not change it (measured slower)
    assert C.resolve_dtype("auto", device) == expected
    assert C.resolve_dtype("float32", device) == torch.float32 and C.resolve_dtype(torch.float16, device) == torch.float16


def test_auto_device_is_cuda_only_where_there_is_one(monkeypatch):
    for available, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(C.torch.cuda, "is_available", lambda: available)
        assert C.resolve_device("auto") == C.resolve_device(None) == expected
    assert C.resolve_device("cpu") == "cpu"


def test_the_stopwatch_adds_up_each_phase_also_when_it_fails():
    watch = C.Stopwatch()
    for _ in range(2):
        with watch("t_a"):
            time.sleep(0.01)
    with pytest.raises(ValueError), watch("t_b"):
        raise ValueError
    assert 0.02 <= watch.times["t_a"] < 1 and "t_b" in watch.times and "t_b" in watch.peaks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a phase's own peak needs Linux's /proc")
def test_each_phase_has_its_own_peak_memory_and_the_run_keeps_the_largest():
    watch = C.Stopwatch()
    with watch("t_big"):
        big = torch.ones(2**27)  # 0.5 GB, touched
        del big
    with watch("t_small"):
        small = torch.ones(2**20)
        del small
    before = C.peak_rss_gb()
    assert watch.peaks["t_big"] >= watch.peaks["t_small"] + 0.4  # the second phase does not inherit the first's peak
    assert before >= watch.peaks["t_big"]  # the run's peak is not lost by the reset
