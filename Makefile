# pcpp-runtime: `make demo` and `make test` create .venv on first use, then run.
#
# TORCH_SPEC picks the torch build installed first: the CPU build 2.13.0 by default (it lies on
# this kind of machine's disk). On a GPU machine use e.g. `make test TORCH_SPEC=torch` to keep
# pip's CUDA build, or install your own torch into .venv first.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
OUT ?= out

BIN := $(VENV)/bin
STAMP := $(VENV)/.pcpp-installed

.PHONY: demo test train-demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Two local worker processes over ZeroMQ on the default model (demo, the trained shapes model
# committed in models/demo), compared with one worker; then every policy on four workers side by
# side in one picture (docs/demo-grid.png is one).
demo: $(STAMP)
	$(BIN)/pcpp generate --nproc 2 --transport zmq --compare \
		--output $(OUT)/demo.png --report $(OUT)/demo.json
	$(BIN)/pcpp generate --grid --nproc 4 --prompt "a blue square in the center and a red circle at the bottom right" \
		--output $(OUT)/demo-grid.png --report $(OUT)/demo-grid.json

# Train the built-in `demo` model from scratch into models/demo: the recipe of the committed
# weights (docs/MODELS.md), four runs, about 2 hours on 2 cores (24 + 34 + 34 + 30
# min as measured; run 3 now loads the pool of encoded scenes run 2 saves, about 5 min less).
# 1: the VAE, 2000 steps under bfloat16 autocast. 2: the UNet and text encoder on that VAE for
# 3000 steps. 3: that UNet continued for the first 3000 steps of a 4000-step schedule. 4: that
# continued for 2500 steps at half the learning rate, with more layout timesteps and
# single-shape scenes. The logs, loss curves and samples go to $(OUT)/train-demo.
TRAIN_DEMO = $(BIN)/python -m pcpp_runtime.models.demo_training.train
TRAIN_DEMO_VAE = --vae $(OUT)/train-demo/1/vae
train-demo: $(STAMP)
	$(TRAIN_DEMO) --work $(OUT)/train-demo/1 --vae-only --vae-steps 2000 --vae-precision bf16
	$(TRAIN_DEMO) --out $(OUT)/train-demo/2/model --work $(OUT)/train-demo/2 $(TRAIN_DEMO_VAE) \
		--pool-cache $(OUT)/train-demo/pools \
		--unet-steps 3000 --layout-share 0.3 --one-shape-share 0.5 --eval-every 500
	$(TRAIN_DEMO) --out $(OUT)/train-demo/3/model --work $(OUT)/train-demo/3 $(TRAIN_DEMO_VAE) \
		--pool-cache $(OUT)/train-demo/pools --unet-init $(OUT)/train-demo/2/model \
		--unet-steps 4000 --unet-stop-after 3000 --layout-share 0.3 --one-shape-share 0.5 --eval-every 500
	$(TRAIN_DEMO) --out models/demo --work $(OUT)/train-demo/4 $(TRAIN_DEMO_VAE) \
		--unet-init $(OUT)/train-demo/3/model \
		--unet-steps 2500 --lr 5e-4 --layout-share 0.5 --one-shape-share 0.7 --eval-every 500

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
