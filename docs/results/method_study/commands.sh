# The commands behind docs/method_study.md, run from the repository root on a shared 2-core CPU
# (each in the background, beside other jobs), the backend pinned to the plain PyTorch one (what a
# fresh clone without `make ext` uses). Outputs were copied to docs/results/method_study/<name>/
# (study.json/csv/png, comparisons.csv, the per-seed results and logs; not the checkpoints).
export GACD_FAST_BACKEND=torch
ALL="natural at ard rslad iad adaad gacd gacd_guided gacd_feature"

# digits: a teacher per seed, 3 seeds, every method, AutoAttack on 200 test images per seed (the default)
nice -n 8 gacd-fast study --dataset digits --seeds 0 1 2 --methods $ALL --banks memory --eps-sweep 0 \
    --threads 1 --no-progress --out runs/study_digits_methods

# MNIST-5k (round of 2026-12-03, a quiet 2-core CPU, the two studies side by side, one thread each):
# one teacher shared by 3 student seeds (on the teacher's split), AutoAttack on 200 images per seed
gacd-fast train-teacher --dataset mnist5k --out runs/mnist5k_teacher --threads 2 --no-progress
nice -n 5 gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt \
    --methods $ALL --banks memory --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/study_mnist5k
# a teacher per seed
nice -n 5 gacd-fast study --dataset mnist5k --seeds 0 1 2 \
    --methods $ALL --banks memory --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/study_mnist5k_tps
# the soft-label baselines and GACD with a 10-step training attack, the shared teacher
nice -n 5 gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt \
    --methods ard rslad iad adaad gacd --banks memory --attack-steps 10 --autoattack 200 --eps-sweep 0 \
    --threads 1 --no-progress --out runs/study_mnist5k_pgd10
# (copied to mnist5k/, mnist5k_teacher_per_seed/ and mnist5k_pgd10/)

# the tables of docs/method_study.md
python docs/results/method_study/tables.py docs/results/method_study/digits/study.json
python docs/results/method_study/tables.py docs/results/method_study/mnist5k/study.json
python docs/results/method_study/tables.py docs/results/method_study/mnist5k_teacher_per_seed/study.json
python docs/results/method_study/tables.py docs/results/method_study/mnist5k_pgd10/study.json

# MNIST-5k, one seed: RSLAD with a 10-step training attack instead of the recipe's 3 (the check
# docs/method_study.md asks for), evaluated like the study's models (no AutoAttack)
gacd-fast distill --dataset mnist5k --teacher runs/mnist5k_teacher/teacher.pt --method rslad --attack-steps 10 \
    --seed 0 --split-seed 0 --epochs 8 --threads 2 --no-progress --out runs/rslad_pgd10
gacd-fast evaluate --dataset mnist5k --split-seed 0 --teacher runs/mnist5k_teacher/teacher.pt \
    --checkpoints runs/rslad_pgd10/rslad.pt --autoattack 0 --eps-sweep 0 --threads 2 --no-progress --out runs/rslad_pgd10_eval
