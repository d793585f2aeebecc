"""What the three services share: job records (``records``) and the job manager (``jobs``), the worker
supervisor (``supervisor``), the servicers' common code (``common``), a service's main (``main``), the three
services as local processes (``local_stack``) and the Prometheus metrics (``metrics``).

May import: ``shared.rpc`` and everything below it; never a service package.
"""
