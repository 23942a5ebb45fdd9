pytest_plugins = ["attention.bench.perf.plugin"]
