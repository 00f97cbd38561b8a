# The gate's options and fixtures; pytester for the tests that run the gate on a copy of itself.
pytest_plugins = ["lavender_checks.run.pytest_plugin", "pytester"]
