"""``python -m trainer_svc``: the trainer service. Besides EDITTUNER_TRAINER_* / EDITTUNER_*, it reads
EDITTUNER_ENCODER_ADDR (or EDITTUNER_ENCODER_ADDRS, several encoder replicas, comma-separated) and
EDITTUNER_EVAL_ADDR (the other two services), EDITTUNER_PEER_WAIT_S (how long a run waits out a busy or
restarting peer, default 1800 s) and EDITTUNER_WORKDIR."""

import os
import sys

from shared.rpc import encoder_pb2_grpc, eval_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from shared.service.main import peer_channel, serve, server_paths, workdir


def make(config, store, metrics):
    from trainer_svc.service import Peers, TrainerCore, TrainerServicer

    env = dict(os.environ)
    # EDITTUNER_ENCODER_ADDRS (comma-separated): encoder replicas that split every encode into disjoint shards
    addrs = [a.strip() for a in env.get("EDITTUNER_ENCODER_ADDRS", "").split(",") if a.strip()]
    addrs = addrs or [a for a in (env.get("EDITTUNER_ENCODER_ADDR", "").strip(),) if a]
    shared_env = {k: v for k, v in env.items() if k.startswith(("EDITTUNER_TLS", "EDITTUNER_PEER_TOKEN"))}
    encoders = [
        peer_channel({"EDITTUNER_ENCODER_ADDR": a, **shared_env}, "encoder", config.token, "trainer") for a in addrs
    ]
    ev = peer_channel(env, "eval", config.token, "trainer")
    stubs = [encoder_pb2_grpc.EncoderServiceStub(c) for c in encoders]
    peers = Peers(
        stubs[0] if stubs else None,
        eval_pb2_grpc.EvalServiceStub(ev) if ev else None,
        more_encoders=tuple(stubs[1:]),
        encoder_addresses=tuple(addrs),
        eval_address=env.get("EDITTUNER_EVAL_ADDR", "").strip(),
        wait_s=peer_wait_s(env),
    )
    core = TrainerCore(
        config.store_url or ".edittuner/store",
        peers,
        metrics,
        workdir(env),
        paths=server_paths(config),
        grace_s=config.grace_s,
    )

    def add(jobs, server):
        servicer = TrainerServicer(jobs, core, keepalive_s=config.keepalive_s)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)

    return core, core.execute, trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name, add


def peer_wait_s(env: dict[str, str]) -> float:
    from shared.errors import ConfigError, Problem
    from trainer_svc.service import PEER_WAIT_S

    raw = env.get("EDITTUNER_PEER_WAIT_S", "").strip()
    try:
        value = float(raw) if raw else PEER_WAIT_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(
            [Problem("$EDITTUNER_PEER_WAIT_S", f"{raw!r} is not a number of seconds (0 or more)")],
            "invalid service configuration",
        )
    return value


def main() -> int:
    return serve("trainer", 50052, make)


if __name__ == "__main__":
    sys.exit(main())
