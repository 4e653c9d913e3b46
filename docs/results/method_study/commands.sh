# The commands behind docs/method_study.md (run from the repository root, each in the background on
# a shared 2-core CPU; the backend pinned to the plain PyTorch one, what a fresh clone without
# `make ext` uses). Outputs were copied to docs/results/method_study/<name>/.
export GACD_FAST_BACKEND=torch
METHODS="natural at ard rslad iad adaad gacd gacd_guided gacd_feature"

# digits: a teacher per seed, 5 seeds
nice -n 10 gacd-fast study --dataset digits --seeds 0 1 2 3 4 --methods $METHODS --threads 1 --no-progress \
    --out runs/study_digits

# MNIST-5k: a teacher per seed, 3 seeds
nice -n 10 gacd-fast study --dataset mnist5k --seeds 0 1 2 --methods $METHODS --threads 1 --no-progress \
    --out runs/study_mnist5k_teacher_per_seed

# MNIST-5k: one teacher (seed 0) shared by 3 student seeds, on the teacher's split
nice -n 10 gacd-fast train-teacher --dataset mnist5k --out runs/mnist5k_teacher --threads 1 --no-progress
nice -n 10 gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt \
    --methods $METHODS --threads 1 --no-progress --out runs/study_mnist5k_shared_teacher

# the tables of docs/method_study.md
python docs/results/method_study/tables.py docs/results/method_study/*/study.json
