"""The ``edittuner`` command line (``main``), its client side of the services (``remote``), the demo (``demo``)
and the first check on a new host (``doctor``).

May import: anything in ``shared``. Nothing but entry points imports it.
"""
