# The two quick-start commands of the README: `make serve` and `make test` (each sets up .venv first).
VENV := .venv

.PHONY: serve test audit

# the README's install commands; redone when pyproject.toml changes
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[demo,serve,test]"
	touch $@

# the real Gemma 3 270M on CPU, OpenAI-compatible HTTP on :8000 (Ctrl-C stops it)
serve: $(VENV)/.installed
	RAY_SERVE_USE_GRPC_BY_DEFAULT=1 RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000 \
		$(VENV)/bin/serve run serve_config.yaml  # the env: deployments/app.py SERVE_ENV

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# known-vulnerable installed packages, from PyPI's advisory data (needs pypi.org's JSON API; see docs/reliability.md)
audit: $(VENV)/.installed
	$(VENV)/bin/pip install -q pip-audit
	$(VENV)/bin/pip-audit
