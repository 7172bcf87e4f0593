def pytest_addoption(parser):
    # registered only when tests/battery is on the command line: `pytest -m battery --battery-full tests/battery`
    parser.addoption("--battery-full", action="store_true", help="run the full reliability battery (~20 min)")
