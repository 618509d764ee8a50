# Two commands do all set-up and work (see README):
#   make toy    - run the whole method on the embedded Shapes world (toy preset) into runs/toy/
#   make test   - the whole test suite: notebooks clean, export in sync, nbdev_test (smoke), pytest
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlv-installed

.PHONY: toy test install clean-venv

$(STAMP): settings.ini setup.py scripts/install.sh
	bash scripts/install.sh $(VENV)

install: $(STAMP)

toy: $(STAMP)
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/vlv run --preset toy --name toy

test: $(STAMP)
	bash scripts/test.sh $(VENV)

clean-venv:
	rm -rf $(VENV)
