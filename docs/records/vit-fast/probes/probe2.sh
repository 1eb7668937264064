export PYTHONPATH=/work/tree-hyb/src VITLAB_DATA=/work/shared/data/cifar10 OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
common="--model vit --patch_size 4 --num_heads 4 --mlp_ratio 2 --stem conv-group --pool mean --epochs 4 --grad_clip 1 --seed 0 --progress false --hidden_size 192 --num_blocks 3"
$PY -m vitlab train $common --lr 4e-3 --warmup_epochs 0.5 --batch_size 256 --out ~/studies/hyb/cg192b3-lr4 > ~/studies/hyb/cg192b3-lr4.log 2>&1 &
$PY -m vitlab train $common --lr 4e-3 --warmup_epochs 0.5 --batch_size 512 --label_smoothing 0.2 --out ~/studies/hyb/cg192b3-lr4-b512 > ~/studies/hyb/cg192b3-lr4-b512.log 2>&1 &
wait
