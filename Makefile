# The quick-start commands of the README: `make serve`, `make test` and `make test-all` (each sets up .venv first).
VENV := .venv

.PHONY: serve test test-all audit

# the README's install commands; redone when pyproject.toml changes
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[demo,serve,test]"
	touch $@

# the real Gemma 3 270M on CPU, OpenAI-compatible HTTP on :8000 (Ctrl-C stops it); Ray starts with the
# environment of deployments/serve.env
serve: $(VENV)/.installed
	set -a && . ./deployments/serve.env && set +a && $(VENV)/bin/serve run serve_config.yaml

# the fast tier: everything but the tests marked slow (soak, chaos, drain, full-size fuzzing, autoscaling)
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow"

# every test: what CI (.ci/run) runs
test-all: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# known-vulnerable installed packages, from PyPI's advisory data (needs pypi.org's JSON API; see docs/reliability.md)
audit: $(VENV)/.installed
	$(VENV)/bin/pip install -q pip-audit
	$(VENV)/bin/pip-audit
