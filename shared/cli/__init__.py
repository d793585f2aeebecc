"""The ``edittuner`` command line (``main``), its client side of the services (``remote``) and the demo (``demo``).

May import: anything in ``shared``. Nothing but entry points imports it.
"""
