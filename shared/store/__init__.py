"""The object store: the interface and key rules (``base``), atomic file writes (``files``), the local directory
store (``local``), the MinIO/S3 store (``s3``), opening one from a URL (``url``), and checkpoints as committed
multi-object artifacts (``checkpoint``).

May import: ``shared.errors``.
"""
