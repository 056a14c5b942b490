import json

import pytest

from crosslm_shared.data import SplitConfig, iter_records, load_examples, split_task
from crosslm_shared.errors import ConfigError, DataError
from crosslm_shared.tasks import DataSource, builtin_tasks, load_task, parse_task


def test_builtin_tasks_parse():
    assert {"rotten_tomatoes", "sms_spam", "trec"} <= set(builtin_tasks())
    for name in builtin_tasks():
        task = load_task(name)
        assert task.num_labels >= 2
        assert all(task.generation_prompts(i) for i in range(task.num_labels))


def test_unknown_task_names_builtins():
    with pytest.raises(ConfigError, match="built-ins"):
        load_task("no_such_task")


def test_multiclass_task_loads_and_splits(toy_task_path):
    task = load_task(toy_task_path)
    assert task.label_names == ["negative", "positive", "neutral"]
    ex = load_examples(task)
    assert len(ex) == 240
    split = split_task(ex, 3, SplitConfig(n_silos=3, n_private=24, n_test=10, n_llm_test=20, n_judge=20,
                                          partition="dirichlet", alpha=0.3, min_per_label=1), seed=1)
    seen: set[str] = set()
    parts = [split.llm_test, split.judge_train] + [p for s in split.silos for p in (s.train, s.val, s.test)]
    for part in parts:
        assert not seen & set(part.texts), "parts must be disjoint"
        seen |= set(part.texts)
    for silo in split.silos:
        assert len(silo.train) + len(silo.val) == 24
        assert min((silo.train + silo.val).label_counts(3)) >= 1


def test_split_is_deterministic_by_seed(toy_task_path):
    ex = load_examples(load_task(toy_task_path))
    cfg = SplitConfig(n_silos=2, n_private=20, n_test=10, n_llm_test=10, n_judge=10)
    a, b, c = (split_task(ex, 3, cfg, seed=s) for s in (3, 3, 4))
    assert a.silos[0].train == b.silos[0].train
    assert a.silos[0].train != c.silos[0].train


def test_split_too_large_is_a_clear_error(toy_task_path):
    ex = load_examples(load_task(toy_task_path))
    with pytest.raises(ConfigError, match="lower"):
        split_task(ex, 3, SplitConfig(n_silos=2, n_private=200, n_test=10, n_llm_test=10, n_judge=10,
                                      partition="iid"), seed=0)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 2"):
        list(iter_records(DataSource(format="jsonl", path=str(f))))


def test_csv_missing_column_is_named(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("body,label\nhello,a\n")
    with pytest.raises(DataError, match="text"):
        list(iter_records(DataSource(format="csv", path=str(f))))


def test_spec_validation_names_the_problem():
    raw = {"name": "t", "labels": [{"name": "a"}, {"name": "a"}], "data": {"format": "csv", "path": "x"},
           "generation": {"templates": ["{description}"]}, "classification": {"template": "{text}"}}
    with pytest.raises(ConfigError, match="repeats a label"):
        parse_task(raw)
    raw["labels"] = [{"name": "a"}, {"name": "b"}]
    raw["generation"]["templates"] = ["no placeholder"]
    with pytest.raises(ConfigError, match="description"):
        parse_task(raw)
    raw["generation"]["templates"] = ["{description}"]
    raw["data"]["format"] = "xml"
    with pytest.raises(ConfigError, match="xml"):
        parse_task(raw)


def test_every_silo_test_split_follows_the_global_label_mix(tmp_path):
    """Label-skewed private draws must not drain a label from later silos' test splits."""
    from conftest import write_task

    ex = load_examples(load_task(write_task(tmp_path, n_per_label=200)))
    cfg = SplitConfig(n_silos=4, n_private=40, n_test=20, n_llm_test=10, n_judge=10, alpha=0.1, min_per_label=0)
    for seed in range(5):
        for silo in split_task(ex, 3, cfg, seed=seed).silos:
            assert min(silo.test.label_counts(3)) >= 2, (seed, silo.name, silo.test.label_counts(3))


def test_a_rare_label_gives_what_it_has_and_the_silo_keeps_its_size(tmp_path):
    """TREC's ABBR (86 of 5,452) ran out under a skewed draw and the split refused; now the silo
    takes what is left of it and draws the rest over the other labels."""
    from conftest import write_task

    full = load_examples(load_task(write_task(tmp_path, n_per_label=200)))
    keep = [i for i, y in enumerate(full.labels) if y != 0] + [i for i, y in enumerate(full.labels) if y == 0][:30]
    ex = full.subset(keep)
    cfg = SplitConfig(n_silos=4, n_private=40, n_test=5, n_llm_test=5, n_judge=5, alpha=0.1, min_per_label=0)
    for seed in range(10):
        silos = split_task(ex, 3, cfg, seed=seed).silos
        assert all(len(s.train) + len(s.val) == 40 for s in silos)
        assert sum(s.train.label_counts(3)[0] + s.val.label_counts(3)[0] for s in silos) <= 30
    with pytest.raises(ConfigError, match="lower split.n_private"):
        split_task(ex, 3, SplitConfig(n_silos=4, n_private=120, n_test=5, n_llm_test=5, n_judge=5, alpha=0.1,
                                      min_per_label=0), seed=0)
