#!/usr/bin/env bash
# Seed 002 on the CPU: exact MAML through long inner loops of ResNet-18 at 224x224 (the memory-efficient MAML
# notebook's setting: one task, a batch of 16 random images for the support set and 16 for the query set, inner SGD
# at lr 0.01), one meta-step per case in a fresh subprocess: time, peak RSS above the subprocess's start, and the
# cosine of each path's meta-gradient against unrolled MAML at the same k (1.0 = the same gradient).
#
#   bash benchmarks/resnet18_seed002.sh            # k = 1, 5 both paths; 10 unrolled; 100 checkpointed
#   K_LONG="100 300" bash benchmarks/resnet18_seed002.sh
#   HVP=forward bash benchmarks/resnet18_seed002.sh   # checkpointed with forward-over-reverse HVPs
set -euo pipefail
out=${OUT:-runs/resnet18_seed002}
mkdir -p "$out"
common=(--model resnet18 --image-size 224 --ways 16 --shots 1 --query 1 --meta-batch 1 --inner-lr 0.01
        --repeats 1 --warmup 0 --memory rss --quiet --hvp "${HVP:-reverse}")
metafunc bench "${common[@]}" --paths exact,checkpointed --inner-steps 1,5 --json "$out/short.json" --markdown
metafunc bench "${common[@]}" --paths exact --inner-steps 10 --json "$out/unrolled10.json" --markdown
for k in ${K_LONG:-100}; do
  metafunc bench "${common[@]}" --paths checkpointed --inner-steps "$k" --json "$out/checkpointed$k.json" --markdown
done
