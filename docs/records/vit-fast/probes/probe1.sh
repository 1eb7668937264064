export PYTHONPATH=/work/tree-hyb/src VITLAB_DATA=/work/shared/data/cifar10 OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
common="--model vit --patch_size 4 --num_heads 4 --mlp_ratio 2 --stem conv-group --pool mean --epochs 4 --warmup_epochs 1 --lr 2e-3 --grad_clip 1 --batch_size 256 --seed 0 --progress false"
$PY -m vitlab train $common --hidden_size 256 --num_blocks 2 --out ~/studies/hyb/cg256b2-e4 > ~/studies/hyb/cg256b2-e4.log 2>&1 &
$PY -m vitlab train $common --hidden_size 192 --num_blocks 3 --out ~/studies/hyb/cg192b3-e4 > ~/studies/hyb/cg192b3-e4.log 2>&1 &
wait
