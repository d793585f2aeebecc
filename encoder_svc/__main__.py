"""``python -m encoder_svc``: the encoder service (configuration from EDITTUNER_ENCODER_* / EDITTUNER_*)."""

import os
import sys

from shared.rpc import encoder_pb2, encoder_pb2_grpc
from shared.service.main import serve, server_paths


def make(config, store, metrics):
    from encoder_svc.service import EncoderCore, EncoderServicer

    core = EncoderCore(store, metrics, float(os.environ.get("EDITTUNER_IDLE_RELEASE_S", "300")), server_paths(config))

    def add(jobs, server):
        servicer = EncoderServicer(jobs, core, keepalive_s=config.keepalive_s)
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)

    return core, core.execute, encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name, add


def main() -> int:
    return serve("encoder", 50051, make)


if __name__ == "__main__":
    sys.exit(main())
