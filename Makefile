# One command for the main job, one for the tests; both set up the environment first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: quickstart benchmark-shapes study ddim-study test lint format clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

QUICK := $(or $(LDM_OUTPUT_DIR),outputs)/quickstart

quickstart: $(STAMP)  ## tiny VAE + latent diffusion on the built-in shapes, then DDPM vs DDIM grids
	$(PYTHON) train.py experiment=shapes_vae name=quickstart/vae
	test -f $(QUICK)/latents/val/cache.json || $(PYTHON) -m ldm.data.latents \
		$(QUICK)/vae/checkpoints/last.ckpt $(QUICK)/latents --data shapes --splits train val
	$(PYTHON) train.py experiment=shapes_ldm name=quickstart/ldm data=latents \
		data.dataset.root=$(QUICK)/latents data.dataset.in_memory=true trainer.max_steps=1200
	@echo "samples (rows: prompts; columns: DDPM 100 steps, DDIM 50 steps x 2 seeds):"
	@ls $(QUICK)/ldm/samples/*.png
	@echo "prompt adherence of 500 samples (DDIM 50 steps, guidance 3) for held-out captions:"
	$(PYTHON) evaluate.py checkpoint=$(QUICK)/ldm/checkpoints/last.ckpt extractor=null \
		attributes=true num_samples=500 'grid.steps=[50]' hydra.run.dir=$(QUICK)/eval

BENCH := $(or $(LDM_OUTPUT_DIR),outputs)/benchmark_shapes

benchmark-shapes: $(STAMP)  ## the shapes models trained toward their floors (~75 min; docs/benchmark-shapes.md)
	$(PYTHON) train.py experiment=shapes_vae name=benchmark_shapes/vae \
		model.vae.base_channels=32 data.batch_size=16 trainer.max_steps=6000 \
		trainer.val_check_interval=1000 callbacks.checkpoint.every_n_train_steps=1000
	$(PYTHON) train.py experiment=shapes_ldm name=benchmark_shapes/ldm \
		vae_checkpoint=$(BENCH)/vae/checkpoints/last.ckpt trainer.max_steps=10000 \
		callbacks=with_fid callbacks.fid.every_n_steps=2000 callbacks.fid.num_samples=1000 \
		callbacks.checkpoint.every_n_train_steps=2000 callbacks.samples.every_n_steps=2000 \
		callbacks.fid.cache_dir=$(BENCH)/reference_stats callbacks.samples.cache_dir=$(BENCH)/reference_stats
	$(PYTHON) evaluate.py checkpoint=$(BENCH)/ldm/checkpoints/last.ckpt num_samples=1000 \
		reference_count=1000 'grid.steps=[50]' cache_dir=$(BENCH)/reference_stats \
		hydra.run.dir=$(BENCH)/eval
	$(PYTHON) benchmarks/fid_floors.py $(BENCH)/reference_stats/reference-*.safetensors \
		--vae $(BENCH)/vae/checkpoints/last.ckpt --n 1000
	$(PYTHON) -m ldm.tools.curves $(BENCH)/vae $(BENCH)/ldm --out $(BENCH)/curves.png \
		--keys train/loss train/rec_loss val/rec_loss val/loss val/fid val/attr_shape val/attr_joint

study: $(STAMP)  ## sampler study on analytic data: table + plots under outputs/study/
	$(PYTHON) study.py

OUT := $(or $(LDM_OUTPUT_DIR),outputs)
DDIM := $(OUT)/ddim_study

ddim-study: $(STAMP)  ## the DDIM paper's eta x steps comparison on the shapes model (docs/ddim-study.md)
	test -f $(QUICK)/vae/checkpoints/last.ckpt || \
		$(PYTHON) train.py experiment=shapes_vae name=quickstart/vae
	test -f $(QUICK)/latents/val/cache.json || $(PYTHON) -m ldm.data.latents \
		$(QUICK)/vae/checkpoints/last.ckpt $(QUICK)/latents --data shapes --splits train val
	test -f $(DDIM)/ldm/checkpoints/last.ckpt || $(PYTHON) train.py experiment=shapes_ldm \
		name=ddim_study/ldm data=latents data.dataset.root=$(QUICK)/latents \
		data.dataset.in_memory=true trainer.max_steps=4000
	$(PYTHON) evaluate.py checkpoint=$(DDIM)/ldm/checkpoints/last.ckpt num_samples=500 \
		reference_count=1000 'grid.steps=[10,20,50,100,1000]' 'grid.eta=[0.0,0.5,1.0]' \
		cache_dir=$(DDIM)/reference_stats hydra.run.dir=$(DDIM)/eval
	$(PYTHON) benchmarks/fid_floors.py $(DDIM)/reference_stats/reference-*.safetensors \
		--vae $(QUICK)/vae/checkpoints/last.ckpt

test: $(STAMP) lint  ## lint, then the whole test suite
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache .hypothesis
