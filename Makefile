# One command for the main job, one for the tests; both set up the environment first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: quickstart benchmark-shapes study ddim-study ddim-grid ddim-tables backbones test lint format clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	$(PYTHON) -m pip install --quiet --no-deps k-diffusion==0.1.1.post1  # a test oracle (pyproject)
	touch $(STAMP)

QUICK := $(or $(LDM_OUTPUT_DIR),outputs)/quickstart

quickstart: $(STAMP)  ## tiny VAE + latent diffusion on the built-in shapes, then DDPM vs DDIM grids
	$(PYTHON) train.py experiment=shapes_vae name=quickstart/vae
	test -f $(QUICK)/latents/val/cache.json || $(PYTHON) -m ldm.data.latents \
		vae=$(QUICK)/vae/checkpoints/last.ckpt out=$(QUICK)/latents data=shapes 'splits=[train,val]'
	$(PYTHON) train.py experiment=shapes_ldm name=quickstart/ldm data=latents \
		data.dataset.root=$(QUICK)/latents data.dataset.in_memory=true trainer.max_steps=1200
	@echo "samples (rows: prompts; columns: DDPM 100 steps, DDIM 50 steps x 2 seeds):"
	@ls $(QUICK)/ldm/samples/*.png
	@echo "prompt adherence of 500 samples (DDIM 50 steps, guidance 3) for held-out captions:"
	$(PYTHON) evaluate.py checkpoint=$(QUICK)/ldm/checkpoints/last.ckpt extractor=null \
		attributes=true num_samples=500 'grid.steps=[50]' hydra.run.dir=$(QUICK)/eval

BENCH := $(or $(LDM_OUTPUT_DIR),outputs)/benchmark_shapes

benchmark-shapes: $(STAMP)  ## the shapes models trained toward their floors (67 min-3 h on 2 cores; docs/benchmark-shapes.md)
	$(PYTHON) train.py experiment=shapes_vae name=benchmark_shapes/vae \
		model.vae.base_channels=32 data.batch_size=16 trainer.max_steps=12000 \
		trainer.val_check_interval=2000 callbacks.checkpoint.every_n_train_steps=2000 \
		callbacks.checkpoint.save_top_k=-1  # every 2000 steps kept: the rFID curve below
	$(PYTHON) train.py experiment=shapes_ldm name=benchmark_shapes/ldm \
		vae_checkpoint=$(BENCH)/vae/checkpoints/last.ckpt trainer.max_steps=10000 \
		callbacks=with_fid callbacks.fid.every_n_steps=2000 callbacks.fid.num_samples=1000 \
		callbacks.checkpoint.every_n_train_steps=2000 callbacks.checkpoint.save_top_k=-1 \
		callbacks.samples.every_n_steps=2000 \
		callbacks.fid.cache_dir=$(BENCH)/reference_stats callbacks.samples.cache_dir=$(BENCH)/reference_stats
	$(PYTHON) evaluate.py checkpoint=$(BENCH)/ldm/checkpoints/last.ckpt num_samples=1000 \
		reference_count=1000 'grid.samplers=[{name:ddim,spacing:trailing,eta:1.0}]' \
		'grid.steps=[20]' 'grid.guidance=[1.25]' repeats=3 cache_dir=$(BENCH)/reference_stats \
		hydra.run.dir=$(BENCH)/eval  # the sampling setting chosen in docs/benchmark-shapes.md
	$(PYTHON) benchmarks/fid_floors.py $(BENCH)/reference_stats --data shapes \
		--vae $(BENCH)/vae/checkpoints/step_*.ckpt --n 1000  # the callback's and evaluate's: same images
	$(PYTHON) -m ldm.tools.curves runs=[$(BENCH)/vae] out=$(BENCH)/vae_curves.png \
		'keys=[train/rec_loss,val/rec_loss,val/kl]'
	$(PYTHON) -m ldm.tools.curves runs=[$(BENCH)/ldm] out=$(BENCH)/ldm_curves.png \
		'keys=[train/loss,val/loss,val/fid,val/attr_shape,val/attr_joint]'

study: $(STAMP)  ## sampler study on analytic data: table + plots under outputs/study/
	$(PYTHON) study.py

DDIM := $(or $(LDM_OUTPUT_DIR),outputs)/ddim_study
DDIM_GRID := num_samples=1000 reference_count=1000 \
	'grid.samplers=[{name:ddim,spacing:trailing,eta:[0.0,0.5,1.0]}]' \
	cache_dir=$(BENCH)/reference_stats
DDIM_QUALITY := num_samples=1000 reference_count=1000 cache_dir=$(BENCH)/reference_stats \
	'grid.samplers=[{name:ddim,spacing:trailing,eta:[0.0,1.0]}]' 'grid.steps=[10]' \
	'grid.guidance=[1.0]' repeats=2

# The DDIM paper's eta x steps table on the model of benchmark-shapes, with its network and
# with the exact denoiser of its training latents, unguided and at guidance 3: n = 1000,
# 3 seeds at 10-100 steps (part few, the paper's), 1 seed at 1000 steps (many); each network
# table followed by its exact-denoiser twin. The model is DDIM_CKPT: by default the published
# weights of benchmark-shapes' model (trained by that command; pruned to what sampling
# reads), so no training is needed and every machine studies the same weights; give
# DDIM_CKPT=$(BENCH)/ldm/checkpoints/last.ckpt to study your own training (trained first
# when missing). The runs behind docs/ddim-study.md on the published weights are in
# docs/data/ddim_study_published/: copy them into $(DDIM) to extend them (evaluate.py resumes
# them only for bit-identical weights). Then the network error's dose: eta 0 against eta 1
# at 10 steps for the checkpoints benchmark-shapes saved every 2000 training steps, when
# there are any (unguided, 2 seeds); the same tables at 3 and 5 steps (fewest: where
# discretisation error dominates); and the same eta x steps on the 2-D Gaussian mixture of
# study.py, whose exact denoiser is that of a continuous distribution (3 seeds, seconds).
# Runs already in a part's results.json are kept (evaluate.py resume=true), so the hours it
# takes on a CPU can be spread over several invocations.
DDIM_CKPT ?= docs/data/benchmark_shapes/ldm.safetensors

ddim-study: $(STAMP)  ## the DDIM eta x steps comparison, network vs exact denoiser (docs/ddim-study.md)
	test -f $(DDIM_CKPT) || $(MAKE) benchmark-shapes
	test -f $(DDIM)/latents/train/cache.json || $(PYTHON) -m ldm.data.latents \
		vae=$(DDIM_CKPT) out=$(DDIM)/latents data=shapes 'splits=[train]'
	$(MAKE) ddim-grid PARTS="few many"
	for ckpt in $(BENCH)/ldm/checkpoints/step_*.ckpt; do \
		[ -f "$$ckpt" ] || { echo "no training checkpoints in $(BENCH): no eta gap along training"; break; }; \
		$(PYTHON) evaluate.py checkpoint=$$ckpt $(DDIM_QUALITY) \
			hydra.run.dir=$(DDIM)/quality/$$(basename $$ckpt .ckpt) || exit 1; \
	done
	$(MAKE) ddim-grid PARTS=fewest
	$(PYTHON) study.py -m '+sampler_options.ddim.eta=0.0,0.5,1.0' seed=0,1,2 'samplers=[ddim]' \
		'steps=[3,5,10,20,50,100,1000]' num_samples=20000 diffusion=sd guidance=null,1.0,3.0 \
		hydra.sweep.dir=$(DDIM)/analytic \
		'hydra.sweep.subdir=g$${guidance}-eta$${sampler_options.ddim.eta}-seed$${seed}'
	$(PYTHON) benchmarks/fid_floors.py $(BENCH)/reference_stats --data shapes \
		--vae $(DDIM_CKPT) --n 1000
	$(MAKE) ddim-tables

PARTS := few many fewest
ddim-grid: $(STAMP)  ## the eta x steps tables of ddim-study only (PARTS="few many fewest")
	for part in $(PARTS); do for g in 1.0 3.0; do for model in network exact; do \
		compile=false; case $$part in few) steps='[10,20,50,100]'; repeats=3;; \
			fewest) steps='[3,5]'; repeats=3;; many) steps='[1000]'; repeats=1; compile=true;; \
			*) echo "unknown part $$part: few, many or fewest"; exit 2;; esac; \
		exact=null; [ $$model = exact ] && exact=$(DDIM)/latents && compile=false; \
		$(PYTHON) evaluate.py checkpoint=$(DDIM_CKPT) $(DDIM_GRID) \
			"grid.steps=$$steps" repeats=$$repeats "grid.guidance=[$$g]" compile=$$compile \
			exact_denoiser=$$exact hydra.run.dir=$(DDIM)/$$model-g$$g-$$part || exit 1; \
	done; done; done

ddim-tables:  ## the tables and plots of the DDIM study so far (mean ± sd over seeds)
	for g in 1.0 3.0; do for model in network exact; do \
		runs=$$(ls -d $(DDIM)/$$model-g$$g-* 2>/dev/null | paste -sd,); [ -n "$$runs" ] || continue; \
		$(PYTHON) -m ldm.tools.tables "runs=[$$runs]" 'metrics=[fid,attr_joint,attr_shape]' \
			'paired=[0,1]' out=$(DDIM)/$$model-g$$g.png; \
	done; done
	for g in None 1.0 3.0; do \
		runs=$$(ls -d $(DDIM)/analytic/g$$g-* 2>/dev/null | paste -sd,); [ -n "$$runs" ] || continue; \
		echo; echo "analytic control, guidance $$g (None: unconditional)"; \
		$(PYTHON) -m ldm.tools.tables "runs=[$$runs]" 'metrics=[frechet,sliced_w1,spread]' \
			'paired=[0,1]' 'scale={frechet: 1000, sliced_w1: 100}' digits=2; \
	done
	if [ -d $(DDIM)/quality ]; then \
		$(PYTHON) -m ldm.tools.tables "runs=[$$(ls -d $(DDIM)/quality/step_* | paste -sd,)]" \
			'metrics=[fid,attr_shape]' 'paired=[0,1]' by=checkpoint; fi

BACKBONES := $(or $(LDM_OUTPUT_DIR),outputs)/backbones
BACKBONE_RUN := experiment=shapes_ldm data=latents data.dataset.root=$(BENCH)/latents \
	data.dataset.in_memory=true diffusion=flow diffusion.prediction=flow

backbones: $(STAMP)  ## UNet vs DiT vs MMDiT at equal training FLOPs on shapes (~1 h; docs/models.md)
	test -f $(BENCH)/ldm/checkpoints/last.ckpt || $(MAKE) benchmark-shapes
	test -f $(BENCH)/latents/train/cache.json || $(PYTHON) -m ldm.data.latents \
		vae=$(BENCH)/vae/checkpoints/last.ckpt out=$(BENCH)/latents data=shapes 'splits=[train]'
	$(PYTHON) benchmarks/backbone_flops.py --budget-steps 2000 --json $(BACKBONES)/flops.json
	for bb in unet_shapes dit_shapes mmdit_shapes; do \
		steps=$$($(PYTHON) -c "import json; print(next(r['equal_compute_steps'] for r in \
			json.load(open('$(BACKBONES)/flops.json')) if r['backbone'] == '$$bb'))"); \
		test -f $(BACKBONES)/$$bb/checkpoints/last.ckpt || $(PYTHON) train.py $(BACKBONE_RUN) \
			model/backbone=$$bb trainer.max_steps=$$steps callbacks.samples.every_n_steps=$$steps \
			name=backbones/$$bb || exit 1; \
		$(PYTHON) evaluate.py checkpoint=$(BACKBONES)/$$bb/checkpoints/last.ckpt num_samples=1000 \
			reference_count=1000 cache_dir=$(BENCH)/reference_stats 'grid.steps=[10,50]' bootstrap=200 \
			'grid.samplers=[{name:flow_euler,spacing:linspace}]' hydra.run.dir=$(BACKBONES)/eval-$$bb || exit 1; \
	done

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
