import os

# Subprocesses the tests start (`python -m pks_emu.cli`, `python -c ...`) must
# import the installed package, not the checkout: with a non-editable install
# the source tree has no compiled core, and Python would put the working
# directory first on sys.path (PYTHONSAFEPATH, Python 3.11+, stops that).
os.environ.setdefault("PYTHONSAFEPATH", "1")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
