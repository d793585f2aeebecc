"""A job's typed results: ``Job.encode``, ``Job.train`` and ``Job.render`` (the ``result`` oneof of
protos/edittuner/common/v1/common.proto), as the services produce, store and convert them.

An executor returns one of these dataclasses; a train job also hands its validations over while it runs
(``JobContext.set_result``). The job record keeps it as JSON under its kind, ``{"train": {...}}``
(``JobRecord.result``), beside the same results as strings in ``JobRecord.outputs`` (``flat()``: lists
comma-joined), which fill the deprecated ``Job.outputs`` map for one more version, and which a service of the
previous version reads when it loads the record. ``job_to_proto`` sets the typed field from the record
(``result_of``); a record stored before the typed fields existed has only the strings, and they are parsed back
(``from_flat``). Clients read the typed fields (``outputs_of``); ``flat()`` is also how ``edittuner jobs`` prints
them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeAlias

from shared.rpc import common_pb2
from shared.service.records import JobRecord

log = logging.getLogger(__name__)

# "step 2: eval_svc unavailable (...); step 4: ..." → (2, "eval_svc unavailable (...)"), ...
_MISSED = re.compile(r"step (\d+): (.*?)(?=; step \d+: |\Z)", re.DOTALL)


def _split(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


def _float_or_none(value: Any) -> float | None:
    """A float from JSON (None stays None) or from its string ("None", "" → None)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass
class EncodeOutputs:
    """What an encode job wrote into the store's cache (``common.v1.EncodeOutputs``)."""

    kind: ClassVar[str] = "encode"
    encoded: int = 0
    cached: int = 0
    failed: int = 0
    index_keys: list[str] = field(default_factory=list)  # cache/index/<dataset>/<hash>.json; none for a shard

    def to_json(self) -> dict[str, Any]:
        return {self.kind: asdict(self)}

    def flat(self, complete: bool = True) -> dict[str, str]:
        """The results as strings: the deprecated ``Job.outputs`` map (``complete`` does not matter here)."""
        return {
            "encoded": str(self.encoded),
            "cached": str(self.cached),
            "failed": str(self.failed),
            "index": ",".join(self.index_keys),
        }

    def to_proto(self) -> common_pb2.EncodeOutputs:
        return common_pb2.EncodeOutputs(
            encoded=self.encoded, cached=self.cached, failed=self.failed, index_keys=self.index_keys
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EncodeOutputs:
        return cls(
            encoded=int(doc.get("encoded", 0)),
            cached=int(doc.get("cached", 0)),
            failed=int(doc.get("failed", 0)),
            index_keys=[str(k) for k in doc.get("index_keys", [])],
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.EncodeOutputs) -> EncodeOutputs:
        return cls(msg.encoded, msg.cached, msg.failed, list(msg.index_keys))

    @classmethod
    def from_flat(cls, flat: Mapping[str, str], params: Mapping[str, Any]) -> EncodeOutputs:
        return cls(
            encoded=int(flat.get("encoded") or 0),
            cached=int(flat.get("cached") or 0),
            failed=int(flat.get("failed") or 0),
            index_keys=_split(flat.get("index", "")),
        )


@dataclass
class Validation:
    """A validation the trainer handed to eval_svc: the Render job ``job_id`` renders the LoRA of ``step``."""

    step: int
    job_id: str


@dataclass
class MissedValidation:
    """A validation eval_svc did not take, and why ("eval_svc unavailable (UNAVAILABLE: ...)")."""

    step: int
    reason: str


@dataclass
class TrainOutputs:
    """What a run produced (``common.v1.TrainOutputs``); while it trains, only ``run_id`` and the validations."""

    kind: ClassVar[str] = "train"
    run_id: str = ""
    steps: int = 0
    final_loss: float | None = None  # None: this attempt ran no step
    lora_keys: list[str] = field(default_factory=list)
    checkpoint_steps: list[int] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    missed_validations: list[MissedValidation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {self.kind: asdict(self)}

    def flat(self, complete: bool = True) -> dict[str, str]:
        """The results as strings: the deprecated ``Job.outputs`` map. Before the run has succeeded (``complete``
        false) it held only ``validations``, once one was handed over or missed, and ``missed_validations``."""
        out: dict[str, str] = {}
        if complete:
            out = {
                "run_id": self.run_id,
                "lora": ",".join(self.lora_keys),
                "steps": str(self.steps),
                "final_loss": str(self.final_loss),
                "checkpoints": ",".join(map(str, self.checkpoint_steps)),
            }
        if complete or self.validations or self.missed_validations:
            out["validations"] = ",".join(f"{v.step}:{v.job_id}" for v in self.validations)
        if self.missed_validations:
            out["missed_validations"] = "; ".join(f"step {m.step}: {m.reason}" for m in self.missed_validations)
        return out

    def to_proto(self) -> common_pb2.TrainOutputs:
        return common_pb2.TrainOutputs(
            run_id=self.run_id,
            steps=self.steps,
            final_loss=self.final_loss,
            lora_keys=self.lora_keys,
            checkpoint_steps=self.checkpoint_steps,
            validations=[common_pb2.TrainOutputs.Validation(step=v.step, job_id=v.job_id) for v in self.validations],
            missed_validations=[
                common_pb2.TrainOutputs.MissedValidation(step=m.step, reason=m.reason) for m in self.missed_validations
            ],
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TrainOutputs:
        return cls(
            run_id=str(doc.get("run_id", "")),
            steps=int(doc.get("steps", 0)),
            final_loss=_float_or_none(doc.get("final_loss")),
            lora_keys=[str(k) for k in doc.get("lora_keys", [])],
            checkpoint_steps=[int(s) for s in doc.get("checkpoint_steps", [])],
            validations=[Validation(int(v["step"]), str(v["job_id"])) for v in doc.get("validations", [])],
            missed_validations=[
                MissedValidation(int(m["step"]), str(m["reason"])) for m in doc.get("missed_validations", [])
            ],
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.TrainOutputs) -> TrainOutputs:
        return cls(
            run_id=msg.run_id,
            steps=msg.steps,
            final_loss=msg.final_loss if msg.HasField("final_loss") else None,
            lora_keys=list(msg.lora_keys),
            checkpoint_steps=list(msg.checkpoint_steps),
            validations=[Validation(v.step, v.job_id) for v in msg.validations],
            missed_validations=[MissedValidation(m.step, m.reason) for m in msg.missed_validations],
        )

    @classmethod
    def from_flat(cls, flat: Mapping[str, str], params: Mapping[str, Any]) -> TrainOutputs:
        pairs = [v.split(":", 1) for v in _split(flat.get("validations", "")) if ":" in v]
        return cls(
            run_id=flat.get("run_id") or str(params.get("run_id", "")),
            steps=int(flat.get("steps") or 0),
            final_loss=_float_or_none(flat.get("final_loss")),
            lora_keys=_split(flat.get("lora", "")),
            checkpoint_steps=[int(s) for s in _split(flat.get("checkpoints", ""))],
            validations=[Validation(int(step), job_id) for step, job_id in pairs],
            missed_validations=[
                MissedValidation(int(m.group(1)), m.group(2))
                for m in _MISSED.finditer(flat.get("missed_validations", ""))
            ],
        )


@dataclass
class RenderOutputs:
    """What a render (one validation of a run's LoRA) wrote into the store (``common.v1.RenderOutputs``)."""

    kind: ClassVar[str] = "render"
    run_id: str = ""
    step: int = 0
    psnr_lora: float | None = None  # dB, mean over the eval samples; None without samples
    psnr_base: float | None = None
    metrics_key: str = ""
    grid_keys: list[str] = field(default_factory=list)
    report_key: str = ""  # "": not written
    tensorboard_key: str = ""  # "": report_to has no tensorboard, or the file was not written

    def to_json(self) -> dict[str, Any]:
        return {self.kind: asdict(self)}

    def flat(self, complete: bool = True) -> dict[str, str]:
        """The results as strings: the deprecated ``Job.outputs`` map (``complete`` does not matter here)."""
        out = {
            "metrics": self.metrics_key,
            "grids": ",".join(self.grid_keys),
            "psnr_lora": f"{self.psnr_lora}",
            "psnr_base": f"{self.psnr_base}",
        }
        if self.report_key:
            out["report"] = self.report_key
        if self.tensorboard_key:
            out["tensorboard"] = self.tensorboard_key
        return out

    def to_proto(self) -> common_pb2.RenderOutputs:
        return common_pb2.RenderOutputs(
            run_id=self.run_id,
            step=self.step,
            psnr_lora=self.psnr_lora,
            psnr_base=self.psnr_base,
            metrics_key=self.metrics_key,
            grid_keys=self.grid_keys,
            report_key=self.report_key,
            tensorboard_key=self.tensorboard_key,
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RenderOutputs:
        return cls(
            run_id=str(doc.get("run_id", "")),
            step=int(doc.get("step", 0)),
            psnr_lora=_float_or_none(doc.get("psnr_lora")),
            psnr_base=_float_or_none(doc.get("psnr_base")),
            metrics_key=str(doc.get("metrics_key", "")),
            grid_keys=[str(k) for k in doc.get("grid_keys", [])],
            report_key=str(doc.get("report_key", "")),
            tensorboard_key=str(doc.get("tensorboard_key", "")),
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.RenderOutputs) -> RenderOutputs:
        return cls(
            run_id=msg.run_id,
            step=msg.step,
            psnr_lora=msg.psnr_lora if msg.HasField("psnr_lora") else None,
            psnr_base=msg.psnr_base if msg.HasField("psnr_base") else None,
            metrics_key=msg.metrics_key,
            grid_keys=list(msg.grid_keys),
            report_key=msg.report_key,
            tensorboard_key=msg.tensorboard_key,
        )

    @classmethod
    def from_flat(cls, flat: Mapping[str, str], params: Mapping[str, Any]) -> RenderOutputs:
        return cls(
            run_id=str(params.get("run_id", "")),
            step=int(params.get("step", 0) or 0),
            psnr_lora=_float_or_none(flat.get("psnr_lora")),
            psnr_base=_float_or_none(flat.get("psnr_base")),
            metrics_key=flat.get("metrics", ""),
            grid_keys=_split(flat.get("grids", "")),
            report_key=flat.get("report", ""),
            tensorboard_key=flat.get("tensorboard", ""),
        )


Outputs: TypeAlias = EncodeOutputs | TrainOutputs | RenderOutputs
KINDS: dict[str, type[Outputs]] = {c.kind: c for c in (EncodeOutputs, TrainOutputs, RenderOutputs)}


def result_of(record: JobRecord) -> Outputs | None:
    """The typed results of a stored record: its ``result``, or for a record stored before there was one, its
    ``outputs`` strings parsed. None when it has none, or when they cannot be read (logged: the job itself is
    still served, with its ``outputs`` map)."""
    try:
        for kind, doc in record.result.items():
            if kind in KINDS:
                return KINDS[kind].from_json(doc)
        if not record.result and record.outputs and record.kind in KINDS:
            return KINDS[record.kind].from_flat(record.outputs, record.params)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        log.warning("job %s: its results are unreadable (%r); served without them", record.job_id, err)
    return None


def set_result(job: common_pb2.Job, outputs: Outputs | None) -> common_pb2.Job:
    """Set ``job``'s ``result`` oneof to ``outputs`` (nothing for None); returns ``job``."""
    if isinstance(outputs, EncodeOutputs):
        job.encode.CopyFrom(outputs.to_proto())
    elif isinstance(outputs, TrainOutputs):
        job.train.CopyFrom(outputs.to_proto())
    elif isinstance(outputs, RenderOutputs):
        job.render.CopyFrom(outputs.to_proto())
    return job


def outputs_of(job: common_pb2.Job) -> Outputs | None:
    """The typed results a client got in ``job`` (its ``result`` oneof); None before there are any."""
    which = job.WhichOneof("result")
    if which == "encode":
        return EncodeOutputs.from_proto(job.encode)
    if which == "train":
        return TrainOutputs.from_proto(job.train)
    if which == "render":
        return RenderOutputs.from_proto(job.render)
    return None


def flat_outputs(job: common_pb2.Job) -> dict[str, str]:
    """``job``'s typed results as the strings of the deprecated ``outputs`` map (how the CLI prints them)."""
    outputs = outputs_of(job)
    return {} if outputs is None else outputs.flat(complete=job.state == common_pb2.JOB_STATE_SUCCEEDED)
