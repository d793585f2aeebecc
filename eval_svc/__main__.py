"""``python -m eval_svc``: the eval service (configuration from EDITTUNER_EVAL_* / EDITTUNER_*)."""

import os
import sys

from shared.rpc import eval_pb2, eval_pb2_grpc
from shared.service.main import serve, server_paths


def make(config, store, metrics):
    from eval_svc.service import EvalCore, EvalServicer

    core = EvalCore(store, metrics, float(os.environ.get("EDITTUNER_IDLE_RELEASE_S", "300")), server_paths(config))

    def add(jobs, server):
        servicer = EvalServicer(jobs, core, keepalive_s=config.keepalive_s)
        eval_pb2_grpc.add_EvalServiceServicer_to_server(servicer, server)

    return core, core.execute, eval_pb2.DESCRIPTOR.services_by_name["EvalService"].full_name, add


def main() -> int:
    return serve("eval", 50053, make)


if __name__ == "__main__":
    sys.exit(main())
