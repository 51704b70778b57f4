#!/usr/bin/env bash
# The README's AP figures on the synthetic set: float, fake quant (W8A8, W6A6, W4A4), each departure from
# the reference switched back to the reference's behaviour (on the Mask R-CNN; DEPARTURE_MODELS to change),
# and onnxruntime with the parity check at W6A6 and W4A4 (W8 is not exported).
# Usage: benchmarks/synthetic_ap.sh [OUT_DIR] [VAL_SEED] [NUM_IMAGES]   (about 30-40 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/synthetic_ap}; seed=${2:-2}; n=${3:-200}
py=${PYTHON:-python}
mkdir -p "$out"
data="$out/val-seed$seed"
[ -f "$data/annotations/instances_val.json" ] || $py tools/make_synthetic_coco.py --out "$data" --split val --num-images "$n" --seed "$seed"
ann="$data/annotations/instances_val.json"; img="$data/val"
models=${MODELS:-mask_rcnn_swin_synthetic cascade_mask_rcnn_swin_synthetic}
for model in $models; do
  cfg=configs/synthetic/$model.py; ckpt=repq_export/assets/$model.pth
  run() { tag=$1; shift; $py tools/test.py "$cfg" "$ckpt" --ann "$ann" --img-dir "$img" --quiet \
            --json-out "$out/$model-$tag.json" "$@" | tail -1; }
  run float
  run w8a8 --w_bits 8 --a_bits 8
  for b in 6 4; do
    run "w${b}a${b}" --w_bits $b --a_bits $b
    if [ "$b" = 4 ] && [[ " ${DEPARTURE_MODELS:-mask_rcnn_swin_synthetic} " == *" $model "* ]]; then  # the departures, each switched back alone, then all together (the reference)
      run "w${b}a${b}-fractional-zp" --w_bits $b --a_bits $b --fractional-zero-point
      run "w${b}a${b}-zero-padding" --w_bits $b --a_bits $b --zero-padding
      run "w${b}a${b}-float-bias" --w_bits $b --a_bits $b --float-bias
      run "w${b}a${b}-reference" --w_bits $b --a_bits $b --fractional-zero-point --zero-padding --float-bias --float-bn
    fi
    art="$out/$model-w${b}a${b}-artifact"
    $py -m repq_export.cli --ckpt "$ckpt" --config "$cfg" --bits $b --calib-ann "$ann" --calib-img-dir "$img" \
        --out "$art" --force --quiet | tail -1
    $py tools/parity_check.py "$art" --ann "$ann" --img-dir "$img" --quiet \
        --json-out "$out/$model-w${b}a${b}-parity-ort.json" || true
  done
done
