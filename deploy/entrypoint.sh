#!/bin/sh
# The image's entrypoint: the first argument names the service (encoder, trainer or eval); anything else runs
# as given, e.g. `docker run --rm edittuner:latest edittuner check --config ...` or `... sh`.
set -eu
case "${1:-}" in
    encoder | trainer | eval)
        service="$1"
        shift
        exec python -m "${service}_svc" "$@"
        ;;
    "")
        echo "usage: encoder | trainer | eval [args...] | COMMAND [args...]" >&2
        exit 64
        ;;
esac
exec "$@"
