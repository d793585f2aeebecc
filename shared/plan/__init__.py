"""The fit planner, split by what it answers: GPUs and sizes (``gpus``), exact parameter counts (``counts``), tokens
per sample (``tokens``), bytes (``memory``), FLOPs and time (``flops``), the prediction per service (``predict``),
Qwen-Image-2.1's bytes (``qwen21``), a transformer file's bytes (``single_file``), which services share a GPU
(``placement``), overrides that fit (``recommend``), the report (``report``), the tools that measure its activation
constants (``measure``; v2.1's ``measure_qwen21``), and what checks it on a device: one block per precision against
bf16 (``probe``) and one real-size step of the planner's run (``step``, the edit flavours).

May import: ``shared.model``, ``shared.data``, ``shared.config``, ``shared.errors``.
"""
