"""The fit planner, split by what it answers: GPUs and sizes (``gpus``), exact parameter counts (``counts``),
tokens per sample (``tokens``), bytes (``memory``), FLOPs and time (``flops``), the prediction per service
(``predict``), which services share a GPU (``placement``), overrides that fit (``recommend``), the report
(``report``), the tool that measures its activation constants (``measure``), and what checks it on a device:
one block per precision against bf16 (``probe``) and one real-size step of the planner's run (``step``).

May import: ``shared.model``, ``shared.data``, ``shared.config``, ``shared.errors``.
"""
