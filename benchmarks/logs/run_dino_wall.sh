#!/bin/bash
# DINO-WM learning check on Wall-v0 (small preset): random-init DINOv2, pixel patches, random actions.
export OMP_NUM_THREADS=1 MUJOCO_GL=egl
PY=/work/venv/bin/python
$PY ../algos/dino_wm.py --env-id Wall-v0 --exp-name dino_wm_dino > logs/dino_wm_wall_dino.log 2>&1
$PY ../algos/dino_wm.py --env-id Wall-v0 --exp-name dino_wm_pixels --encoder pixels > logs/dino_wm_wall_pixels.log 2>&1
$PY ../algos/dino_wm.py --env-id Wall-v0 --exp-name dino_wm_random --planner random --train-steps 0 > logs/dino_wm_wall_random.log 2>&1
