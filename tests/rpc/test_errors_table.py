"""One table from error class to status (``shared.errors.STATUS_CODES``), and every layer held to it: a call's
status (the servers' interceptor), a job's ``error_code`` (the job manager), the error a client raises for a
status or a failed job (the CLI), and a training worker's error as its supervisor re-raises it."""

from __future__ import annotations

import grpc
import pytest

from shared import errors
from shared.rpc import common_pb2
from shared.rpc.client import domain_error
from shared.rpc.interceptors import status_for
from shared.service import supervisor
from shared.service.common import error_of
from shared.service.records import error_code
from shared.train.events import WorkerError
from shared.train.trainer import TrainingDiverged


def instance(cls: type[errors.EditTunerError]) -> errors.EditTunerError:
    if issubclass(cls, errors.ProblemsError):
        return cls([errors.Problem("config.json: $.rank", "must be positive")])
    return cls("what went wrong, and what to do")


ROWS = [(instance(cls), code) for cls, code in errors.STATUS_CODES] + [
    (errors.ConfigError([errors.Problem("config.json: $.rank", "must be positive")]), "INVALID_ARGUMENT"),
    (errors.DatasetError([errors.Problem("multidatabackend.json: $[0]", "no images")]), "INVALID_ARGUMENT"),
    (TrainingDiverged("loss is nan at step 3"), "UNKNOWN"),
    (ZeroDivisionError("secret"), "INTERNAL"),
]


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_the_table_lists_subclasses_before_their_bases():
    classes = [cls for cls, _ in errors.STATUS_CODES]
    for i, cls in enumerate(classes):
        assert not [base for base in classes[:i] if issubclass(cls, base)], cls  # a row no error could reach


@pytest.mark.parametrize("err, code", ROWS, ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v)
def test_every_layer_maps_an_error_as_the_table_says(err, code):
    assert errors.status_name(err) == code
    # the server's status for a call that raised it
    assert status_for(err) == (None if code == "INTERNAL" else grpc.StatusCode[code])
    # a job that failed (or was cancelled) with it
    assert error_code(err) == code
    # a training worker that reported it
    assert WorkerError.of(err).code == code


@pytest.mark.parametrize("cls, code", errors.STATUS_CODES, ids=lambda v: getattr(v, "__name__", v))
def test_clients_raise_the_class_the_table_gives_for_a_status(cls, code):
    """The CLI's view: a refused call and a failed job each come back as the row's class with the server's text."""
    wanted = errors.error_class(code)
    assert wanted is next(c for c, name in errors.STATUS_CODES if name == code)
    from_call = domain_error(FakeRpcError(grpc.StatusCode[code], "the server's message"))
    from_job = error_of(common_pb2.Job(error_code=code, error="the server's message"))
    assert type(from_job) is wanted and str(from_job) == "the server's message"
    if wanted is errors.EditTunerError:  # UNKNOWN: the status name stays in the text
        assert type(from_call) is errors.EditTunerError and str(from_call) == f"{code}: the server's message"
    else:
        assert type(from_call) is wanted and str(from_call) == "the server's message"


@pytest.mark.parametrize("err, code", [r for r in ROWS if r[1] not in ("UNKNOWN", "INTERNAL", "CANCELLED")])
def test_the_supervisor_reraises_a_workers_domain_error_as_its_class(err, code):
    with pytest.raises(errors.EditTunerError) as info:
        supervisor._outcome(1, WorkerError.of(err), "", None)
    assert type(info.value) is errors.error_class(code) and str(info.value) == str(err)


def test_a_workers_unknown_and_internal_errors_are_worker_failures():
    for err in (TrainingDiverged("loss is nan at step 3"), ZeroDivisionError("x")):
        with pytest.raises(supervisor.WorkerFailed) as info:
            supervisor._outcome(1, WorkerError.of(err, "the worker's message"), "last line\n", None)
        assert info.value.kind == type(err).__name__ and str(info.value).startswith("the worker's message")
