# The commands behind docs/mixed_precision.md (run from the repository root on the shared 2-core AVX2
# CPU of this round, where bf16 runs emulated; one thread each, beside other jobs).
export GACD_FAST_BACKEND=torch

# students trained in bf16 against fp32 ones, digits, one fp32 teacher shared by 3 seeds
gacd-fast train-teacher --dataset digits --epochs 12 --threads 1 --no-progress --out runs/i20/digits_teacher
gacd-fast study --dataset digits --seeds 0 1 2 --teacher runs/i20/digits_teacher/teacher.pt \
    --methods gacd gacd_feature --precision fp32 --threads 1 --no-progress --out runs/i20/study_digits_fp32
# (started with --methods gacd gacd_feature; finished with gacd only for time, --resume keeping the students)
gacd-fast study --dataset digits --seeds 0 1 2 --teacher runs/i20/digits_teacher/teacher.pt \
    --methods gacd --precision bf16 --threads 1 --no-progress --resume --out runs/i20/study_digits_bf16
python docs/results/mixed_precision/compare_studies.py runs/i20/study_digits_fp32 runs/i20/study_digits_bf16 \
    --name digits_bf16

# attack strength: PGD-20 in fp32 and in bf16 on the same models from the same starts
python docs/results/mixed_precision/attack_strength.py --threads 1 --out docs/results/mixed_precision/attack_strength_digits.json \
    runs/i20/digits_teacher/teacher.pt runs/i20/study_digits_fp32/seed0/gacd.pt
python docs/results/mixed_precision/attack_strength.py --threads 1 --limit 250 \
    --out docs/results/mixed_precision/attack_strength_mnist5k.json runs/mnist5k_teacher/teacher.pt   # the method study's teacher

# the op-level cost of a bf16 bank
python docs/results/mixed_precision/bank_dtype_error.py

# --compile against eager (compile_digits.json: the epoch times of each run's log)
for c in '' --compile '' --compile; do
  gacd-fast distill --dataset digits --teacher runs/i20/digits_teacher/teacher.pt --method gacd --epochs 3 \
      --threads 1 --no-progress $c --out runs/compile/pair$RANDOM
done

# Round of 2026-12-03 (a quiet 2-core AVX2 CPU, one thread each, two jobs side by side)
# digits, 5 seeds, GACD in fp32 and in bf16, one fp32 teacher
gacd-fast train-teacher --dataset digits --epochs 12 --threads 1 --no-progress --out runs/digits_teacher
for p in fp32 bf16; do
  gacd-fast study --dataset digits --seeds 0 1 2 3 4 --teacher runs/digits_teacher/teacher.pt --methods gacd \
      --precision $p --autoattack 200 --threads 1 --no-progress --out runs/study_digits_$p
done
python docs/results/mixed_precision/compare_studies.py runs/study_digits_fp32 runs/study_digits_bf16 --name digits_bf16_5seeds
# MNIST-5k, 3 seeds, AT and GACD in bf16; the fp32 arm is the method study's shared-teacher run
# (docs/results/method_study/commands.sh: runs/mnist5k_teacher, runs/study_mnist5k)
gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt --methods at gacd \
    --banks memory --precision bf16 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/study_mnist5k_bf16
python docs/results/mixed_precision/compare_studies.py runs/study_mnist5k runs/study_mnist5k_bf16 --name mnist5k_bf16
# attack strength on the whole MNIST-5k test set
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 1 \
    --out docs/results/mixed_precision/attack_strength_mnist5k_full.json runs/mnist5k_teacher/teacher.pt runs/study_mnist5k/seed0/gacd.pt

# Round of 2026-12-03, later (the same quiet 2-core AVX2 CPU; one thread a job, two jobs side by side).
# The ops and GACDLoss's heads now ignore an enclosing autocast (commit dd5d728); the bf16 arms below ran
# on that code, from a worktree of it (PYTHONPATH=<worktree>).
# digits GACD, 10 seeds: bf16 anew; fp32 seeds 5-9 added to the 5 of the previous run (--resume keeps 0-4)
gacd-fast study --dataset digits --seeds 0 1 2 3 4 5 6 7 8 9 --teacher runs/digits_teacher/teacher.pt --methods gacd \
    --precision bf16 --autoattack 200 --threads 1 --no-progress --out runs/study_digits_bf16_fix
cp -r runs/study_digits_fp32 runs/study_digits_fp32_10
gacd-fast study --dataset digits --seeds 0 1 2 3 4 5 6 7 8 9 --teacher runs/digits_teacher/teacher.pt --methods gacd \
    --precision fp32 --autoattack 200 --threads 1 --no-progress --resume --out runs/study_digits_fp32_10
python docs/results/mixed_precision/compare_studies.py runs/study_digits_fp32_10 runs/study_digits_bf16_fix --name digits_bf16_fix_10seeds
# MNIST-5k GACD, 3 seeds, bf16 anew against the method study's fp32 arm
gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
    --banks memory --precision bf16 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/study_mnist5k_bf16_fix
# ResNet-18 teachers (adversarially trained) and the bf16 attack's strength on them
gacd-fast train-teacher --dataset digits --model resnet18 --epochs 12 --threads 1 --no-progress --out runs/r18/digits_resnet18_teacher
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 1 \
    --out docs/results/mixed_precision/attack_strength_digits_resnet18.json runs/r18/digits_resnet18_teacher/teacher.pt
gacd-fast train-teacher --dataset mnist5k --model resnet18 --epochs 4 --threads 1 --no-progress --out runs/r18/mnist5k_resnet18_teacher
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 2 --limit 256 \
    --out docs/results/mixed_precision/attack_strength_mnist5k_resnet18.json runs/r18/mnist5k_resnet18_teacher/teacher.pt
# controls: the fp32 GACD alone with the new code equals the method study's GACD to the last digit (3 seeds), and
# the old code's bf16 GACD alone (worktree at e4f4282) equals the old bf16 run's (seed 0): the runs are deterministic
gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
    --banks memory --precision fp32 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/ctl_mnist5k_fp32_new
(cd <worktree at e4f4282> && gacd-fast study --dataset mnist5k --seeds 0 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
    --banks memory --precision bf16 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/ctl_mnist5k_bf16_old)
# how far a numerically equivalent change moves a run: fp32 GACD with the C++ backend instead of the torch one
GACD_FAST_BACKEND=cext gacd-fast study --dataset mnist5k --seeds 0 1 2 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
    --banks memory --precision fp32 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/ctl_mnist5k_fp32_cext
python docs/results/mixed_precision/compare_studies.py runs/study_mnist5k runs/ctl_mnist5k_fp32_cext --name mnist5k_fp32_cext_backend
# MNIST-5k, seeds 3-5 added to both arms (--resume keeps 0-2); the fp32 arm starts from ctl_mnist5k_fp32_new
cp -r runs/ctl_mnist5k_fp32_new runs/study_mnist5k_fp32_6seeds; cp -r runs/study_mnist5k_bf16_fix runs/study_mnist5k_bf16_6seeds
for p in fp32 bf16; do
  gacd-fast study --dataset mnist5k --seeds 0 1 2 3 4 5 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
      --banks memory --precision $p --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --resume --out runs/study_mnist5k_${p}_6seeds
done
python docs/results/mixed_precision/compare_studies.py runs/study_mnist5k_fp32_6seeds runs/study_mnist5k_bf16_6seeds --name mnist5k_bf16_fix_6seeds
# the old code's bf16 GACD (loss in bf16) on seeds 3-5 too (worktree at e4f4282; ran as two processes, seeds 3 4 and seed 5)
(cd <worktree at e4f4282> && gacd-fast study --dataset mnist5k --seeds 3 4 5 --teacher runs/mnist5k_teacher/teacher.pt --methods gacd \
    --banks memory --precision bf16 --autoattack 200 --eps-sweep 0 --threads 1 --no-progress --out runs/old_mnist5k_bf16_s345)

# Round of 2026-12-03, third session (the same quiet 2-core AVX2 CPU). Whole-step benchmarks, each
# side by side in one run (CSV and log under benchmarks/results/, named by the run's start):
python benchmarks/bench_train_step.py --quick                                      # ..._20261203T070316 (with bf16)
V="plain fp32,plain_cl fp32,torchattacks fp32,gacd fp32,gacd_cl fp32"              # fp32, NCHW and channels_last
python benchmarks/bench_pgd.py --quick --no-steps --variants "$V"                    # bench_pgd_cpu_20261203T073803
python benchmarks/bench_train_step.py --quick --variants "$V"                        # ..._20261203T074307 (3 rounds)
python benchmarks/bench_train_step.py --quick --workloads resnet18 --reps 5 --no-memory \
    --variants "plain fp32,plain_cl fp32,gacd fp32,gacd_cl fp32"                     # ..._20261203T080250 (5 rounds)
python benchmarks/plot.py benchmarks/results/bench_pgd_cpu_20261203T073803.csv benchmarks/results/bench_train_step_cpu_20261203T0{70316,74307,80250}.csv
# the attack's verdicts in channels_last against NCHW (fp32), on the ResNet-18 teachers above
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 1 --precisions fp32 --layouts nchw channels_last \
    --out docs/results/mixed_precision/attack_strength_digits_resnet18_channels_last.json runs/r18/digits_resnet18_teacher/teacher.pt
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 1 --limit 256 --precisions fp32 --layouts nchw channels_last \
    --out docs/results/mixed_precision/attack_strength_mnist5k_resnet18_channels_last.json runs/r18/mnist5k_resnet18_teacher/teacher.pt
# digits GACD students trained with --channels-last (fp32), 5 seeds, against the 10-seed fp32 study
gacd-fast study --dataset digits --seeds 0 1 2 3 4 --teacher runs/digits_teacher/teacher.pt --methods gacd \
    --precision fp32 --channels-last --autoattack 200 --threads 1 --no-progress --out runs/study_digits_fp32_cl
python docs/results/mixed_precision/compare_studies.py runs/study_digits_fp32_10 runs/study_digits_fp32_cl --name digits_channels_last_5seeds
# the attack's parameter freeze, re-measured (paired rounds, ResNet-18 B=32)
PYTHONPATH=. python docs/results/mixed_precision/param_grad_probe.py --threads 1 2 --batch 32 --rounds 15
# ResNet-18 teachers trained in NCHW and in channels_last, 3 seeds (one split, seed 0's; seed 0 ran with the defaults,
# the same), one thread a run,
# two runs side by side; then PGD-20 (fp32) of all six on the whole test set
for s in 0 1 2; do
  gacd-fast train-teacher --dataset digits --model resnet18 --epochs 12 --threads 1 --no-progress --seed $s --split-seed 0 \
      --out runs/cl/t_nchw_s$s
  gacd-fast train-teacher --dataset digits --model resnet18 --epochs 12 --threads 1 --no-progress --seed $s --split-seed 0 \
      --channels-last --out runs/cl/t_cl_s$s
done
PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py --threads 2 --precisions fp32 \
    --out docs/results/mixed_precision/attack_strength_digits_resnet18_trained_channels_last.json runs/cl/t_{nchw,cl}_s{0,1,2}/teacher.pt
