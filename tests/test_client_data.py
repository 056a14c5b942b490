"""Silo data loading and config: errors name file, line and problem; the split is seeded."""
import json

import pytest

from crosslm_client.config import load_silo_config
from crosslm_shared.data import Examples, heldout_split, read_labelled
from crosslm_shared.errors import ConfigError, DataError

LABELS = ("neg", "pos")


def test_csv_and_jsonl_load(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"good, film",pos\nbad film,neg\nok,1\nmeh,0\n')
    assert read_labelled(csv, labels=LABELS).pair() == (["good, film", "bad film", "ok", "meh"], [1, 0, 1, 0])
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": "pos"}, {"text": "b", "label": 0},
                                                      {"text": "c", "label": "neg"}, {"text": "d", "label": 1}]))
    assert read_labelled(jl, labels=LABELS).labels == (1, 0, 0, 1)


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
        read_labelled(tmp_path / name, labels=LABELS)


def test_split_is_seeded_stratified_and_disjoint():
    texts = [f"t{i}" for i in range(40)]
    ys = [i % 2 for i in range(40)]
    examples = Examples(tuple(texts), tuple(ys))
    train, held = heldout_split(examples, fraction=0.25, seed=3)
    assert heldout_split(examples, fraction=0.25, seed=3) == (train, held)
    assert heldout_split(examples, fraction=0.25, seed=4) != (train, held)
    assert not set(train.texts) & set(held.texts) and len(held) == 10 and sorted(held.labels) == [0] * 5 + [1] * 5


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


def test_prepare_demo_writes_one_private_file_per_silo(tmp_path):
    from crosslm_client.cli import main

    pool = tmp_path / "pool.csv"
    pool.write_text("text,category\n" + "".join(f"review number {i},{'fresh' if i % 3 else 'rotten'}\n"
                                               for i in range(200)))
    spec = tmp_path / "task.toml"
    spec.write_text(f'name = "mini"\n[data]\nformat = "csv"\npath = "{pool}"\ntext_field = "text"\n'
                    'label_field = "category"\nlabel_map = { fresh = "pos", rotten = "neg" }\n'
                    '[[labels]]\nname = "neg"\n[[labels]]\nname = "pos"\n'
                    '[generation]\ntemplates = ["x {description}"]\n[classification]\ntemplate = "{text}"\n')
    assert main(["prepare-demo", "--task", str(spec), "--out", str(tmp_path / "demo"), "--silos", "2",
                 "--n-private", "20", "--n-test", "15", "--n-llm-test", "30", "--n-judge", "40"]) == 0
    files = sorted((tmp_path / "demo").glob("silo-*.csv"))
    assert [f.name for f in files] == ["silo-a.csv", "silo-b.csv"]
    a, b = (read_labelled(f, labels=LABELS).pair() for f in files)
    assert len(a[0]) == len(b[0]) == 20 and not set(a[0]) & set(b[0])
    # the public test files: per-silo test sets and the LLM's, disjoint from every private share
    public = tmp_path / "demo" / "public"
    assert sorted(f.name for f in public.iterdir()) == ["llm-test.csv", "silo-a-test.csv", "silo-b-test.csv"]
    tests = [read_labelled(public / name, labels=LABELS).pair()[0] for name in ("silo-a-test.csv", "silo-b-test.csv")]
    llm = read_labelled(public / "llm-test.csv", labels=LABELS).pair()[0]
    assert [len(t) for t in tests] == [15, 15] and len(llm) == 30
    private = set(a[0]) | set(b[0])
    assert not private & (set(tests[0]) | set(tests[1]) | set(llm)) and not set(llm) & set(tests[0])


def test_prepare_demo_cuts_the_pool_like_simulate(tmp_path, toy_task_path):
    """Same split config and seed: the demo's silos hold exactly simulate's silos' private data."""
    from crosslm_shared.demo_data import prepare_demo
    from crosslm_shared.data import SplitConfig, load_examples as pool, split_task
    from crosslm_shared.tasks import load_task

    cfg = SplitConfig(n_silos=3, n_private=24, n_test=10, n_llm_test=12, n_judge=20, min_per_label=1)
    prepare_demo(toy_task_path, tmp_path / "d", split=cfg, seed=5, public_out=tmp_path / "pub")
    task = load_task(toy_task_path)
    split = split_task(pool(task), task.num_labels, cfg, seed=5)
    for letter, silo in zip("abc", split.silos):
        texts, ys = read_labelled(tmp_path / "d" / f"silo-{letter}.csv", labels=task.label_names).pair()
        assert (texts, ys) == (list((silo.train + silo.val).texts), list((silo.train + silo.val).labels))
        assert read_labelled(tmp_path / "pub" / f"silo-{letter}-test.csv", labels=task.label_names).pair()[0] == \
            list(silo.test.texts)
    assert read_labelled(tmp_path / "pub" / "llm-test.csv", labels=task.label_names).pair()[0] == list(split.llm_test.texts)


def test_example_configs_load():
    from pathlib import Path

    from crosslm_server.service.config import load_server_config

    examples = Path(__file__).resolve().parent.parent / "examples"
    for name in "abcd":
        cfg = load_silo_config(examples / f"silo-{name}.toml")
        assert cfg.silo.name == f"silo-{name}" and cfg.silo.arch in ("minilm", "mpnet4")
        assert not cfg.server.plaintext_dev_mode  # mTLS, certificates from `crosslm certs --out runs/certs`
        assert cfg.server.cert == examples.parent / "runs" / "certs" / f"silo-{name}.pem"
        assert cfg.server.ca == examples.parent / "runs" / "certs" / "ca.pem"
    server = load_server_config(examples / "server.toml")
    assert not server.server.plaintext_dev_mode
    assert server.server.tls_ca == examples.parent / "runs" / "certs" / "ca.pem"
    assert (server.server.grpc_port, server.server.http_port, server.engine.name) == (50051, 8080, "crosslm")
    assert Path(server.engine.options["config"]) == examples / "rt-4silo.toml"  # resolved against the file
