"""Silo data loading and config: errors name file, line and problem; the split is seeded."""
import json

import pytest

from crosslm_client.config import load_silo_config
from crosslm_client.data import load_examples, split
from crosslm_shared.errors import ConfigError, DataError

LABELS = ("neg", "pos")


def test_csv_and_jsonl_load(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"good, film",pos\nbad film,neg\nok,1\nmeh,0\n')
    assert load_examples(csv, labels=LABELS) == (["good, film", "bad film", "ok", "meh"], [1, 0, 1, 0])
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": "pos"}, {"text": "b", "label": 0},
                                                      {"text": "c", "label": "neg"}, {"text": "d", "label": 1}]))
    assert load_examples(jl, labels=LABELS)[1] == [1, 0, 0, 1]


@pytest.mark.parametrize("name, body, fragment", [
    ("d.csv", "text,label\nfine,pos\nbad,maybe\n", r"d.csv:3: label 'maybe' is not one of"),
    ("d.csv", "text,label\n,pos\n", r"d.csv:2: missing or empty 'text'"),
    ("d.jsonl", '{"text": "a", "label": "pos"}\n{oops\n', r"d.jsonl:2: not valid JSON"),
    ("d.jsonl", '[1, 2]\n', r"d.jsonl:1: expected a JSON object"),
    ("d.csv", "text,label\na,pos\n", r"only 1 examples"),
])
def test_bad_rows_name_file_and_line(tmp_path, name, body, fragment):
    (tmp_path / name).write_text(body)
    with pytest.raises(DataError, match=fragment):
        load_examples(tmp_path / name, labels=LABELS)


def test_split_is_seeded_stratified_and_disjoint():
    texts = [f"t{i}" for i in range(40)]
    ys = [i % 2 for i in range(40)]
    (tr, ytr), (he, yhe) = split((texts, ys), heldout_fraction=0.25, seed=3)
    assert split((texts, ys), heldout_fraction=0.25, seed=3) == ((tr, ytr), (he, yhe))
    assert not set(tr) & set(he) and len(he) == 10 and sorted(yhe) == [0] * 5 + [1] * 5


def test_config_errors_name_the_field(tmp_path):
    cfg = tmp_path / "silo.toml"
    cfg.write_text('[silo]\nname = "a"\nlabels = ["neg", "pos"]\narch = "gpt9"\n')
    with pytest.raises(ConfigError, match=r"\[silo\] arch='gpt9' is invalid"):
        load_silo_config(cfg)
    cfg.write_text('[silo]\nname = "a"\nlabels = ["neg", "pos"]\nbogus = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        load_silo_config(cfg)
    cfg.write_text('[silo]\nname = "a"\nlabels = ["neg", "pos"]\ndata = "x.csv"\n[server]\nchunk_size = 1\n')
    with pytest.raises(ConfigError, match="chunk_size=1"):
        load_silo_config(cfg)
