"""The hypothesis settings of the file readers' property tests: seeded (``derandomize``), no example
database, no deadline, so every run tries the same examples."""

from hypothesis import HealthCheck, settings

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(FUZZ, max_examples=100)
