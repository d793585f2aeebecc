"""``python -m trainer_svc``: the trainer service. Besides EDITTUNER_TRAINER_* / EDITTUNER_*, it reads
EDITTUNER_ENCODER_ADDR and EDITTUNER_EVAL_ADDR (the other two services) and EDITTUNER_WORKDIR."""

import os
import sys

from shared.rpc import encoder_pb2_grpc, eval_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from shared.service.main import peer_channel, serve, server_paths, workdir


def make(config, store, metrics):
    from trainer_svc.service import Peers, TrainerCore, TrainerServicer

    env = dict(os.environ)
    enc, ev = peer_channel(env, "encoder", config.token), peer_channel(env, "eval", config.token)
    peers = Peers(encoder_pb2_grpc.EncoderServiceStub(enc) if enc else None,
                  eval_pb2_grpc.EvalServiceStub(ev) if ev else None)
    core = TrainerCore(config.store_url or ".edittuner/store", peers, metrics, workdir(env),
                       paths=server_paths(config), grace_s=config.grace_s)

    def add(jobs, server):
        servicer = TrainerServicer(jobs, core, keepalive_s=config.keepalive_s)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)

    return core, core.execute, trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name, add


def main() -> int:
    return serve("trainer", 50052, make)


if __name__ == "__main__":
    sys.exit(main())
