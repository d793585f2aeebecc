"""A process parses a run's config once: ``load_run_config_text`` answers the same files from what it parsed, the
client's submit path (read, validate, decide uploads) parses once, and a config that fails is parsed each time.
The services' side, in real processes, is held by tests/service/test_services.py (one parse per service and worker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.cli.transfer import datasets_for_server
from shared.config import loading
from shared.config.loading import config_parses, load_run_config_text, read_run_files
from shared.data.synthetic import write_configs, write_dataset
from shared.errors import ConfigError
from shared.rpc import data_pb2
from shared.store.files import sha256_file


class ServerReadsTheClientsFiles:
    """A DataService whose server sees the client's folders (a shared mount): nothing to upload."""

    def call(self, method: str, request: data_pb2.StatFilesRequest) -> data_pb2.StatFilesResponse:
        assert method == "StatFiles"
        return data_pb2.StatFilesResponse(
            files=[
                data_pb2.ServerFile(path=p, readable=True, size=Path(p).stat().st_size, sha256=sha256_file(Path(p)))
                for p in request.paths
            ]
        )


@pytest.fixture
def files(tmp_path: Path, tiny_models) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "data", n=4, references=2)
    return write_configs(tmp_path / "cfg", data, tiny_models("edit-v2"), "edit-v2", 2, output_dir=str(tmp_path / "o"))


def test_the_clients_submit_path_parses_once(files, capsys):
    before = config_parses()
    sent, run = read_run_files(*files, ["learning_rate=1e-3"])
    out = datasets_for_server(ServerReadsTheClientsFiles(), sent, Path.cwd(), report=print)  # type: ignore[arg-type]
    assert out == sent and "nothing to upload" in capsys.readouterr().out
    again = load_run_config_text(
        sent.config_text, sent.data_text, sent.overrides, config_name=sent.config_name, data_name=sent.data_name
    )
    assert again is run and run.train.learning_rate == 1e-3
    assert config_parses() - before == 1


def test_other_overrides_or_text_are_parsed_and_a_bad_config_every_time(files):
    sent, run = read_run_files(*files)
    before = config_parses()
    other = load_run_config_text(sent.config_text, sent.data_text, ["lora_rank=8"], config_name=sent.config_name)
    assert other is not run and other.train.lora_rank == 8 and config_parses() - before == 1
    bad = json.dumps(json.loads(sent.config_text) | {"learning_rate": "fast"})
    for _ in range(2):
        with pytest.raises(ConfigError, match="learning_rate"):
            load_run_config_text(bad, sent.data_text, config_name=sent.config_name)
    assert config_parses() - before == 3  # the failing one twice: its problems are never remembered


def test_what_is_remembered_is_bounded(files):
    sent, _ = read_run_files(*files)
    for rank in range(loading.REMEMBERED + 4):
        load_run_config_text(sent.config_text, sent.data_text, [f"lora_rank={rank + 1}"])
    assert len(loading._parsed) == loading.REMEMBERED
