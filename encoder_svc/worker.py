"""The encoding worker: ``python -m encoder_svc.worker --config C [--data D] [--store S] [key=value ...]``.

encoder_svc runs encoding in this process so that an out-of-memory or a crash fails the job, not the service.
It is an adapter only: parse arguments, call ``shared.encode.encoder``, print one JSON line of counts.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.config.loading import load_run_config
from shared.encode.encoder import encode_run
from shared.errors import EditTunerError
from shared.store.url import open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="encoder_svc.worker")
    ap.add_argument("--config", required=True)
    ap.add_argument("--data")
    ap.add_argument("--store", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    try:
        run = load_run_config(args.config, args.data, args.overrides)
        stats = encode_run(run, open_store(args.store))
    except EditTunerError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(
        json.dumps(
            {"encoded": stats.encoded, "cached": stats.cached, "failed": stats.failed, "failures": stats.failures}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
