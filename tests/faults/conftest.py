"""Fault tests. Unit-level ones use the worker fixtures (a migrated SQLite and PostgreSQL
database); the fault-injection ones (``tests/faults/test_inject_*.py``) start their OWN
PostgreSQL and Redis on spare ports (tests/faults/services.py) so they can kill them."""

from tests.worker.conftest import sessions, settings  # noqa: F401 (fixtures)
