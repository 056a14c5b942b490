"""The real CrossLM round behind the real server, on tiny models: upload → round → download."""

import pytest

from conftest import write_task
from crosslm_client.transport import CrossLMClient
from crosslm_server.engines.api import create_engine
from crosslm_shared.bundle import make_manifest
from crosslm_shared.slm import load_slm, new_slm
from crosslm_shared.tasks import load_task
from service_helpers import address, server_config, start_server


@pytest.fixture()
def crosslm_server(tmp_path, tiny_sim_config, toy_task_path):
    (tmp_path / "task").mkdir()
    task_path = write_task(tmp_path / "task", labels=("negative", "positive"))  # binary, like the tiny bundle
    tiny_sim_config.write_text(tiny_sim_config.read_text().replace(str(toy_task_path), str(task_path)))
    # the filter off: a tiny random LLM's texts can all fail it, and a round that keeps none
    # publishes no adapter version (the submission id seeds the round, so that varies run to run)
    options = {"config": str(tiny_sim_config), "tasks": [str(task_path)], "adapters_dir": str(tmp_path / "adapters"),
               "set": ["round.filter.enabled=false"]}
    server = start_server(server_config(tmp_path / "server"), engine_factory=lambda: create_engine("crosslm", options))
    yield server, load_task(task_path)
    server.stop(grace=2)


def test_real_round_over_the_wire(crosslm_server, tmp_path, tiny_slm_dir):
    server, task = crosslm_server
    folder = new_slm(str(tiny_slm_dir), task.label_names).save(tmp_path / "silo" / "slm")
    manifest = make_manifest(folder, task=task.name, silo="a", arch="bert", labels=tuple(task.label_names),
                             temperature=1.0, heldout_accuracy=0.5)
    with CrossLMClient(address(server), "a") as client:
        client.upload(folder, manifest, "a-real-0001")
        sub = client.submit("a-real-0001")
        kinds = [e.kind for e in client.watch(sub.submission_id)]
        assert kinds[-1] == "ready", kinds
        assert {"generating", "scoring", "training_llm", "training_slm"} <= set(kinds)
        done = client.get_submission(sub.submission_id)
        back = client.download(sub.submission_id, done.result, tmp_path / "back")
    assert load_slm(back).labels == task.label_names
    from crosslm_shared.bundle import SYNTHETIC_FILE

    assert (back / SYNTHETIC_FILE).exists()  # the synthetic set travels back, in the result manifest only
    assert (tmp_path / "adapters" / "v00001" / "adapter_model.safetensors").exists()
