#!/usr/bin/env bash
# The main job, from a fresh clone: install what is missing into .venv, train a small DiT-MoE
# (DiT-T/2, 4 experts, top-2, rectified flow) on the built-in digits through the DeepSpeed
# engine, then write a sample grid, the loss curve, routing heatmaps and the digits quality score.
#
#   bash scripts/quickstart.sh                 # results in results/quickstart/
#   STEPS=2000 OUT=results/longer bash scripts/quickstart.sh
#
# On GPUs it launches one process per GPU (bf16); without one, a single CPU process (fp32).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

OUT="${OUT:-results/quickstart}"
STEPS="${STEPS:-1000}"
RUN="$OUT/run"
mkdir -p "$OUT"

if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_PROCS="$(nvidia-smi --list-gpus | wc -l)"
else
    NUM_PROCS=1
fi

echo "== 1/4 training DiT-T/2 4E2A on digits for $STEPS steps ($NUM_PROCS process(es)) -> $RUN"
NUM_GPUS="$NUM_PROCS" bash scripts/launch.sh --config config/quickstart.yaml \
    --deepspeed_config config/zero2.json --max-steps "$STEPS" --results-dir "$RUN"

CKPT="$RUN/export.safetensors"
echo "== 2/4 sample grid -> $OUT/samples.png"
python sample.py --ckpt "$CKPT" --out "$OUT/samples.png" \
    --class-labels 0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9,0,1,2,3,4,5,6,7,8,9 \
    --nrow 10 --scale 4 --sampler euler --num-sampling-steps 25 --cfg-scale 1.5 --seed 0

echo "== 3/4 routing: record while sampling, then heatmaps and summary -> $OUT"
python analysis/expert_data.py --ckpt "$CKPT" --out "$OUT/routing.npz" \
    --samples-per-class 4 --num-sampling-steps 25 --cfg-scale 1.5
python analysis/heatmap_class.py --routing "$OUT/routing.npz" --out "$OUT/heatmap_class.png"
python analysis/heatmap_patch.py --routing "$OUT/routing.npz" --out "$OUT/heatmap_patch.png"
python analysis/heatmap_step.py --routing "$OUT/routing.npz" --out "$OUT/heatmap_step.png"
python analysis/summary.py --routing "$OUT/routing.npz" --json "$OUT/routing_summary.json"

echo "== 4/4 quality: 500 conditional samples scored by a classifier trained on real digits"
python -m dit_moe.sampling.many --ckpt "$CKPT" --num-samples 500 --out "$OUT/samples_500" \
    --npz "$OUT/samples_500.npz" --sampler euler --num-sampling-steps 25 --cfg-scale 1.5 --batch-size 250
python -m dit_moe.evaluation digits --samples "$OUT/samples_500.npz" --json "$OUT/digits_score.json" \
    --cache-dir "$OUT/.digits_classifier"

echo "== done: $OUT/samples.png, $RUN/loss_curve.png, $OUT/heatmap_{class,patch,step}.png, $OUT/digits_score.json"
