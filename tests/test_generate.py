"""Generations that end: the stop criteria, how each text ended, the truncated ones (hit the cap)
counted, repaired or dropped before scoring, and the cap and sentence stop derived from the
task's real texts. A scripted model writes known token sequences through the same stopping
criteria as the real one, so every case is decided, not sampled."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import crosslm_server.method.generate as G
from crosslm_server.method.config import load_config
from crosslm_server.method.generate import (EndOfExample, Generation, GenerateConfig, Sample, ends_sentence, finish, generate,
                                     limits, repair)
from crosslm_shared.errors import ConfigError
from crosslm_shared.tasks import load_task

from conftest import build_word_tokenizer, write_task

ROOT = Path(__file__).resolve().parent.parent


class Scripted:
    """A stand-in for the LLM's ``generate``: row k of the j-th call writes ``scripts[...]`` token
    by token (then EOS), stops rows as HF does (EOS or the stopping criteria; padding after)."""

    def __init__(self, tok, scripts: list[str]):
        self.tok = tok
        self.rows = [tok(s, add_special_tokens=False)["input_ids"] for s in scripts]
        self.used = 0

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, pad_token_id, **_):
        n, eos = len(input_ids), self.tok.eos_token_id
        rows, self.used = self.rows[self.used:self.used + n], self.used + n
        ids, done = input_ids, torch.zeros(n, dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = torch.tensor([pad_token_id if done[r] else rows[r][step] if step < len(rows[r]) else eos
                                for r in range(n)])
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= (nxt == eos) | stopping_criteria(ids, None)
            if done.all():
                break
        return ids


@pytest.fixture()
def task(tmp_path):
    return load_task(write_task(tmp_path, labels=("negative", "positive")))


def run(task, scripts, **cfg):
    tok = build_word_tokenizer()
    llm = SimpleNamespace(tokenizer=tok, model=Scripted(tok, scripts), device="cpu")
    return generate(llm, task, GenerateConfig(per_label=len(scripts) // 2, batch_size=3, **cfg), seed=0)


SCRIPTS = [
    'good " and more',             # the closing mark: ends there
    "good film",                   # EOS after two tokens
    "good film . great plot story movie",  # a sentence end from token 3 on (with the sentence stop)
    "bad plot , dull story , awful movie",  # never ends: hit the cap, no sentence end to cut back to
    "bad plot . dull story , awful movie",  # hit the cap; cut back to "bad plot."
    "great story ! superb scene , fine",   # hit the cap; cut back to "great story!"
]


def words(text: str) -> str:
    return " ".join(text.replace(".", " .").replace("!", " !").split())


def test_kept_as_cut_every_text_that_hit_the_cap_is_counted(task):
    gen = run(task, SCRIPTS, max_new_tokens=6)
    assert [s.end for s in gen.samples] == ["close", "eos", "cap", "cap", "cap", "cap"]
    assert [s.truncated for s in gen.samples] == [False, False, True, True, True, True]
    assert gen.samples[0].text == "good"
    st = gen.stats()
    assert st["truncated"] == 4 and st["truncated_rate"] == pytest.approx(4 / 6) and st["dropped_truncated"] == 0
    assert st["end_close"] == 1 and st["end_eos"] == 1 and st["end_cap"] == 4
    assert st["max_new_tokens"] == 6 and st["sentence_stop"] == 0


def test_the_sentence_stop_ends_a_long_text_at_its_next_sentence_end(task):
    gen = run(task, SCRIPTS, max_new_tokens=6, sentence_stop=3)
    assert [s.end for s in gen.samples] == ["close", "eos", "sentence", "cap", "sentence", "sentence"]
    assert words(gen.samples[2].text) == "good film ."
    assert words(gen.samples[5].text) == "great story !"
    assert gen.stats()["truncated"] == 1
    # a sentence end before the stop starts does not end the text
    late = run(task, SCRIPTS, max_new_tokens=6, sentence_stop=4)
    assert late.samples[2].end == "cap" and late.samples[4].end == "cap"


def test_truncated_texts_are_repaired_or_dropped_before_they_are_scored(task):
    rep = run(task, SCRIPTS, max_new_tokens=6, truncated="repair")
    assert len(rep.samples) == 5 and rep.dropped == 1 and rep.generated == 6  # "bad plot , dull ..." has no sentence end
    fixed = [s for s in rep.samples if s.repaired]
    assert [words(s.text) for s in fixed] == ["good film .", "bad plot .", "great story !"]
    assert all(s.truncated and s.end == "cap" for s in fixed)
    assert rep.stats()["truncated"] == 4 and rep.stats()["repaired"] == 3 and rep.stats()["end_cap"] == 4
    drop = run(task, SCRIPTS, max_new_tokens=6, truncated="drop")
    assert [s.end for s in drop.samples] == ["close", "eos"] and drop.dropped == 4
    assert drop.stats()["truncated_rate"] == pytest.approx(4 / 6)


def test_a_checkpoint_round_trips_and_old_ones_still_load(task):
    gen = run(task, SCRIPTS, max_new_tokens=6, truncated="drop")
    again = Generation.from_json(json.loads(json.dumps(gen.to_json())))
    assert again == gen and again.stats() == gen.stats()
    old = {"samples": [{"text": "a b c", "label": 0, "prompt": "p", "truncated": True}], "new_tokens": 3, "seconds": 1.0}
    assert Generation.from_json(old).stats()["truncated"] == 1


def test_finish_and_repair():
    cut = dict(cap=10, newline=True, sentence_after=0)
    assert finish('a film." then', 3, SimpleNamespace(closing_mark='"'), **cut) == ("a film.", "close")
    assert finish("Dear you,\n\nWe are", 10, SimpleNamespace(closing_mark='"'), **cut) == ("Dear you,", "newline")
    assert finish("Dear you,\n\nWe are", 10, SimpleNamespace(closing_mark='"'), **{**cut, "newline": False})[1] == "cap"
    assert finish("Short one", 4, SimpleNamespace(closing_mark='"'), **cut) == ("Short one", "eos")
    assert repair("One. Two is cut") == "One." and repair("Wow! Great") == "Wow!" and repair("no end at all") == ""
    assert repair("Price 3.5 dollars and") == ""  # a point inside a number ends no sentence
    assert ends_sentence("Love you \U0001F308") and not ends_sentence("half \ufffd") and not ends_sentence("end. ")


def test_the_criterion_stops_only_what_has_ended():
    tok = build_word_tokenizer()
    prompt = tok("write one review", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in ('good film "', "good film .", "good film fine")]
    ids = torch.tensor(rows)
    assert EndOfExample(tok, len(prompt), '"')(ids, None).tolist() == [True, False, False]
    assert EndOfExample(tok, len(prompt), '"', sentence_after=2)(ids, None).tolist() == [True, True, False]
    assert EndOfExample(tok, len(prompt), '"', sentence_after=4)(ids, None).tolist() == [True, False, False]


def test_auto_limits_come_from_the_real_texts(task, monkeypatch):
    tok = build_word_tokenizer()
    # the toy texts are 5 tokens each ("w w w noun n"): the sentence stop at 5, the cap at its floor
    assert limits(GenerateConfig(max_new_tokens="auto", sentence_stop="auto"), task, tok) == (16, 5)
    monkeypatch.setattr(G, "AUTO_MIN_TOKENS", 1)
    assert limits(GenerateConfig(max_new_tokens="auto"), task, tok) == (8, 0)  # ceil(1.5 × 5)
    assert limits(GenerateConfig(max_new_tokens=40, sentence_stop=12), task, tok) == (40, 12)


def test_auto_without_the_tasks_texts_says_what_to_set(tmp_path):
    spec = write_task(tmp_path)
    (tmp_path / "toy.csv").unlink()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        limits(GenerateConfig(max_new_tokens="auto"), load_task(spec), build_word_tokenizer())


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": "long"}, {"sentence_stop": -1},
                                 {"sentence_stop": True}, {"truncated": "fix"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        GenerateConfig(**bad)


def test_the_example_configs_end_their_generations():
    for name in ("rt-4silo", "sms-4silo", "demo", "demo-quick"):
        g = load_config(ROOT / "examples" / f"{name}.toml").round.generate
        assert (g.sentence_stop, g.stop_at_newline, g.truncated) == ("auto", True, "repair"), name
        assert g.max_new_tokens == (24 if name == "demo-quick" else "auto"), name  # the quick demo's cap is a count


def test_the_defaults_are_the_method_as_first_written():
    g = GenerateConfig()
    assert (g.max_new_tokens, g.sentence_stop, g.stop_at_newline, g.truncated) == (64, 0, False, "keep")
    assert Sample("t", 0, "p", True).end == ""
