#!/usr/bin/env bash
# The README's AP figures on the synthetic set: float, fake quant (W8A8, W6A6, W4A4), each departure from
# the reference switched back to the reference's behaviour (on the Mask R-CNN; DEPARTURE_MODELS to change),
# and onnxruntime with the parity check at W6A6 and W4A4 (W8 is not exported).
# Usage: benchmarks/synthetic_ap.sh [OUT_DIR] [VAL_SEED] [NUM_IMAGES]   (about 30-40 min on 2 cores)
# Runs whose JSON is already in OUT_DIR are not repeated, so an interrupted run can be resumed;
# STEPS picks what runs: any of float w8 w6 w4 departures calib parity (default: all; STEPS=none prints
# the tables of what OUT_DIR holds). NOISE_SAMPLES / NOISE_ULPS: samples and
# step of the parity noise floor (default 3, auto: the backend's measured float difference).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/synthetic_ap}; seed=${2:-2}; n=${3:-200}
py=${PYTHON:-python}
mkdir -p "$out"
data="$out/val-seed$seed"
[ -f "$data/annotations/instances_val.json" ] || $py tools/make_synthetic_coco.py --out "$data" --split val --num-images "$n" --seed "$seed"
ann="$data/annotations/instances_val.json"; img="$data/val"
models=${MODELS:-mask_rcnn_swin_synthetic cascade_mask_rcnn_swin_synthetic}
want() { [[ " ${STEPS:-float w8 w6 w4 departures calib parity} " == *" $1 "* ]]; }
for model in $models; do
  cfg=configs/synthetic/$model.py; ckpt=repq_export/assets/$model.pth
  run() { tag=$1; shift; [ -f "$out/$model-$tag.json" ] && return 0  # done in an earlier, interrupted run
          $py tools/test.py "$cfg" "$ckpt" --ann "$ann" --img-dir "$img" --quiet \
            --json-out "$out/$model-$tag.json" "$@" | tail -1; }
  if want float; then run float; fi
  if want w8; then run w8a8 --w_bits 8 --a_bits 8; fi
  for b in 6 4; do
    if want "w$b"; then run "w${b}a${b}" --w_bits $b --a_bits $b; fi
    if [ "$b" = 4 ] && want departures && [[ " ${DEPARTURE_MODELS:-mask_rcnn_swin_synthetic} " == *" $model "* ]]; then  # the departures, each switched back alone, then all together (the reference)
      run "w${b}a${b}-fractional-zp" --w_bits $b --a_bits $b --fractional-zero-point
      run "w${b}a${b}-zero-padding" --w_bits $b --a_bits $b --zero-padding
      run "w${b}a${b}-float-bias" --w_bits $b --a_bits $b --float-bias
      run "w${b}a${b}-reference" --w_bits $b --a_bits $b --fractional-zero-point --zero-padding --float-bias --float-bn
    fi
    if [ "$b" = 4 ] && want calib; then run "w${b}a${b}-calib4" --w_bits $b --a_bits $b --calib-images 4; fi
    art="$out/$model-w${b}a${b}-artifact"
    { want parity && [ ! -f "$out/$model-w${b}a${b}-parity-ort.json" ]; } || continue
    $py -m repq_export.cli --ckpt "$ckpt" --config "$cfg" --bits $b --calib-ann "$ann" --calib-img-dir "$img" \
        --out "$art" --force --quiet | tail -1
    $py tools/parity_check.py "$art" --ann "$ann" --img-dir "$img" --quiet --noise-floor "${NOISE_SAMPLES:-3}" \
        --noise-ulps "${NOISE_ULPS:-auto}" \
        --json-out "$out/$model-w${b}a${b}-parity-ort.json" || true
  done
done
# The table the README quotes: AP x 100 of every run, and the three parity tiers of each export.
$py - "$out" $models <<'PY'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
print("| model | run | box AP | mask AP | box / mask vs float |")
print("|---|---|---|---|---|")
for model in models:
    runs = {p.stem[len(model) + 1:]: json.loads(p.read_text()) for p in sorted(out.glob(f"{model}-*.json"))
            if "parity" not in p.name}
    base = runs.get("float")
    for tag in sorted(runs, key=lambda t: (t != "float", "w8" not in t, "w6" not in t, len(t))):
        r = runs[tag]
        delta = "-" if base is None or tag == "float" else \
            f"{100 * (r['bbox_mAP'] - base['bbox_mAP']):+.1f} / {100 * (r['segm_mAP'] - base['segm_mAP']):+.1f}"
        print(f"| {model} | {tag} | {100 * r['bbox_mAP']:.1f} | {100 * r['segm_mAP']:.1f} | {delta} |")
print("\n| model | precision | tier 1: codes differing | tier 2: matched | tier 3: box / mask AP delta (points) "
      "| verdict | float parts differ by (ulp) | noise floor: samples x step, matched, box / mask AP delta "
      "| within the floor |")
print("|---|---|---|---|---|---|---|---|---|")
span = lambda values, fmt: fmt.format(min(values)) if min(values) == max(values) else \
    f"{fmt.format(min(values))}..{fmt.format(max(values))}"
for model in models:
    for p in sorted(out.glob(f"{model}-w*-parity-ort.json")):
        r = json.loads(p.read_text())
        t1, t2, t3 = r["tier1_codes"], r["tier2_detections"], r["tier3_ap"]
        d = [100 * (t3[f"{m}_mAP_backend"] - t3[f"{m}_mAP_fake_quant"]) for m in ("bbox", "segm")]
        precision = p.name[len(model) + 1:].split("-")[0].upper()
        nf, floor, within = r.get("noise_floor"), "-", "-"
        fd = t1.get("float_difference")
        ulps = "-" if not fd else f"{fd['equivalent_ulps']:.2f}"
        if nf is not None:
            s = nf["samples"]
            floor = (f"{len(s)} x {s[0].get('ulps', 1):.2f} ulp, "
                     f"{span([100 * x['match_rate'] for x in s], '{:.1f}%')}, "
                     f"{span([100 * x['bbox_mAP_delta'] for x in s], '{:+.2f}')} / "
                     f"{span([100 * x['segm_mAP_delta'] for x in s], '{:+.2f}')}")
            within = "yes" if nf["backend_within"] else "no"
        print(f"| {model} | {precision} | {t1['mismatches']} of {t1['elements']} | {100 * t2['match_rate']:.1f}% "
              f"| {d[0]:+.2f} / {d[1]:+.2f} | {'PASS' if r['pass'] else 'FAIL'} | {ulps} | {floor} | {within} |")
PY
