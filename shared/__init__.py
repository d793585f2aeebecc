"""EditTuner's core, one package per component. Imports point one way (``tests/test_layout.py`` holds it)::

    cli                                  the command line, the client side of the services, the demo
     └─▶ service, rpc                    jobs, supervisor, servicers' common code / gRPC stubs, server, client
          └─▶ train, evaluate, encode, plan   training loop / previews / caches / the fit planner
               └─▶ model, data, store, config  loading, quantization, LoRA / datasets / object store / configuration
                    └─▶ errors            the error hierarchy

A package may import packages below it, and a package beside it as long as no two packages import each other.
``shared`` never imports a service (``encoder_svc``, ``trainer_svc``, ``eval_svc``); only entry points import ``cli``.
"""
