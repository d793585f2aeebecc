"""gRPC for EditTuner: generated stubs, the shared server and the client helpers.

- ``common_pb2``, ``encoder_pb2``/``_grpc``, ``trainer_pb2``/``_grpc``, ``eval_pb2``/``_grpc`` (+ ``.pyi``):
  generated from ``protos/`` by ``make protos`` (``generate.py``); never edit them by hand.
- ``server``: ``ServiceConfig``, ``build_server``, ``install_sigterm``, ``status_for``.
- ``interceptors``: error mapping, bearer auth, Prometheus metrics.
- ``client``: ``make_channel``, ``call`` (deadline + domain errors), ``wait_for_serving``.

Importing this package imports nothing else, so ``from shared.rpc import encoder_pb2`` stays cheap.

May import: ``shared.errors``.
"""
