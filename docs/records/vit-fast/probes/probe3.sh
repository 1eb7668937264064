export PYTHONPATH=/work/tree-hyb2/src VITLAB_DATA=/work/shared/data/cifar10 OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
common="--model vit --patch_size 4 --num_heads 4 --mlp_ratio 2 --stem conv-group --pool mean --epochs 4 --grad_clip 1 --seed 0 --progress false --optimizer muon-adamw --muon_momentum 0.95 --batch_size 256 --warmup_epochs 0.5"
$PY -m vitlab train $common --hidden_size 192 --num_blocks 3 --lr 2e-3 --out ~/studies/hyb/cg192b3-muon > ~/studies/hyb/cg192b3-muon.log 2>&1 &
$PY -m vitlab train $common --hidden_size 256 --num_blocks 2 --lr 2e-3 --out ~/studies/hyb/cg256b2-muon > ~/studies/hyb/cg256b2-muon.log 2>&1 &
wait
