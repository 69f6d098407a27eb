# One-command entry points. Everything runs inside .venv, created by `make install`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned: on this CPU machine pip takes the CPU build from
# local disk in seconds; an unpinned torch would pull a multi-GB CUDA build. On a GPU
# machine the same pin takes PyPI's CUDA build. Override with `make install TORCH=...`.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench bench-smoke clean

# Where `make demo` writes (git-ignored) and N, its posts.
DEMO       ?= runs/demo
N          ?= 2000
# The offline CLIP is pretrained contrastively on PRETRAIN_N posts generated apart from the
# demo's (another seed: they never overlap its val and test posts), stopping after 3 epochs
# without better held-out retrieval; 10 epochs bound its schedule. PRETRAIN_N=0 pretrains
# on the demo's train split instead (preprocess.py's records, no label read): 1.5 minutes
# faster, a weaker CLIP (docs/design-notes.md, "The offline CLIP").
PRETRAIN_N    ?= 2000
PRETRAIN_ARGS ?= --max-epochs 10
ifeq ($(PRETRAIN_N),0)
PRETRAIN_FROM = --data $(DEMO)/data
PRETRAIN_ON   = the train split's images and captions
else
PRETRAIN_FROM = --input $(DEMO)/pretrain_posts/posts.csv
PRETRAIN_ON   = $(PRETRAIN_N) separately generated posts
endif
PORT       ?= 8000
# The tiny offline CLIP is far less trained than openai/clip-vit-base-patch32, so it
# fine-tunes at 3e-5 (1e-4 overshoots at the warmup peak, 1e-5 barely moves it: docs/design-notes.md);
# train_torch.py's default (1e-5) is the one for a pretrained CLIP.
DEMO_CLIP_LR ?= 3e-5
# How the demo export is read, as make_demo_data.py records it in posts/meta.json
# ("preprocess_flags"; tests/test_make_demo_data.py checks the two agree): the account's
# columns, the timestamp in the audience's zone, a time split (test = the newest posts) and
# the maturity filter (posts under 7 days old at the export time still gain likes).
DEMO_PREPROCESS ?= --numeric-cols followers:0: --categorical-cols platform --datetime-cols posted_at \
  --timezone America/New_York --split time:posted_at --as-of 2025-06-30T12:00:00+00:00 --min-label-age-days 7

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: install
	$(PY) -m pytest -q

# The whole pipeline offline, steps 1-9 of the README.
demo: install
	@echo "== 1/9 demo posts"
	$(PY) data_preprocessing/make_demo_data.py --out $(DEMO)/posts --n $(N) --seed 0 --overwrite
	@echo "== 2/9 preprocess"
	$(PY) data_preprocessing/preprocess.py --input $(DEMO)/posts/posts.csv --out $(DEMO)/data $(DEMO_PREPROCESS)
	@echo "== 3/9 validate the records"
	$(PY) test_preprocessing.py --data $(DEMO)/data
	@echo "== 4/9 offline CLIP, pretrained contrastively on $(PRETRAIN_ON) (never val or test)"
	$(if $(filter-out 0,$(PRETRAIN_N)),$(PY) data_preprocessing/make_demo_data.py --out $(DEMO)/pretrain_posts \
	  --n $(PRETRAIN_N) --seed 1 --overwrite)
	$(PY) training/pretrain_clip.py --out $(DEMO)/tiny_clip $(PRETRAIN_FROM) $(PRETRAIN_ARGS)
	@echo "== 5/9 train: linear probe, 5 frozen + 5 fine-tuning epochs, WiSE-FT"
	rm -rf $(DEMO)/run  # a demo is a fresh run; train_torch.py refuses to overwrite one (see --resume)
	$(PY) training/train_torch.py --data $(DEMO)/data --out $(DEMO)/run --clip-model $(DEMO)/tiny_clip --clip-lr $(DEMO_CLIP_LR)
	@echo "== 6-8/9 start uvicorn, curl a prediction (with the feature fields), stop it"
	PY=$(PY) bash serving/demo.sh $(DEMO)/run/model $(DEMO)/posts/images/000000.jpg "Sunset at the beach! #travel" $(PORT) \
	  followers=12000 platform=instagram posted_at=2025-03-05T23:30:00+0000
	@echo "== 9/9 score the test posts with serving/predict.py: metrics, interval coverage, top and bottom 3"
	$(PY) serving/predict.py --model $(DEMO)/run/model --input $(DEMO)/posts/posts.csv --rows-of $(DEMO)/data:test \
	  --out $(DEMO)/run/predictions_scored.csv
	@echo "== done. Metrics: $(DEMO)/run/metrics.json  Plots: $(DEMO)/run/*.png  Model: $(DEMO)/run/model  Scores: $(DEMO)/run/predictions_scored.csv"

clean:
	rm -rf runs data bench/out

# Benchmarks (bench/README.md): every CPU table of BENCHMARKS.md, then the report.
# hey is the serving benchmark's load generator (a Debian package): installed here if
# missing and possible (root); bench/run_all.py stops at once without it.
# `make bench RUN=runs/x` reports that finished training run's quality instead of training one.
bench: install
	@command -v hey >/dev/null 2>&1 || { echo "installing hey (load generator for bench/serve_bench.py)"; \
	  (apt-get install -y -qq hey || (apt-get update -qq && apt-get install -y -qq hey)) >/dev/null 2>&1 \
	  || echo "could not install hey: apt-get install hey, then make bench again"; }
	$(PY) bench/run_all.py $(if $(RUN),--quality-run-dir $(RUN))

# Every benchmark script at toy sizes (a few minutes); results in bench/out/smoke, BENCHMARKS.md untouched.
bench-smoke: install
	$(PY) bench/run_all.py --smoke
