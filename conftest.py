pytest_plugins = ["lavender_checks.run.pytest_plugin"]  # the gate's options and fixtures
