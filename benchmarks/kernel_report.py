"""Compile every Triton kernel (and the CUDA extension) for sm_80 and sm_90 without a GPU and write
their resources: registers, spill bytes, shared memory, tensor-core use of the SASS.

    python benchmarks/kernel_report.py [--out benchmarks/results/kernel_resources.csv] [--jobs 2]
                                       [--arch 80 90] [--only NAME_SUBSTRING ...] [--dtype fp16 ...]
                                       [--merge] [--no-cuda-ext]

Triton kernels: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) at every launch
configuration the host code can choose (kernels/info_nce.py's tile tables, _common's row tiles,
pgd_step's and pgd_random_start's blocks), for each input dtype, with the pointer alignment the runtime specialises on (torch
allocations are 16-byte aligned) and integer sizes unspecialised ("any D": the worst case).
Resources come from ``cuobjdump --dump-resource-usage`` on the cubin, with the tools Triton's wheel
ships, tensor cores from the PTX (mma / wgmma). C++/CUDA kernels: ``nvcc -Xptxas -v`` on
csrc/cuda/*.cu (compile only, run alongside the Triton compiles). One compile per (kernel, dtype,
width bucket, arch) the host code can choose: ~1 s each, in a process pool of --jobs.
TRITON_INTERPRET must be unset in this process (the script unsets it before importing triton).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["kernel", "arch", "dtype", "config", "num_warps", "num_stages", "regs", "spill_bytes", "stack_bytes",
           "smem_bytes", "tensor_core", "source"]
FLOAT_ARGS = {"scale2", "scale", "alpha_f", "eps_f", "lo", "hi"}
INT64_PTRS = {"idx_ptr", "rows_ptr", "qi_ptr", "bounds_ptr"}
TRITON_DT = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def jobs() -> list[tuple]:
    """(module, kernel, dtype, config label, constexprs, data pointer names, num_warps, num_stages)."""
    import torch  # noqa: F401
    from kernels import _common, info_nce as N
    out = []
    bank_widths = [(d, d) for d in (16, 32, 64, 128, 256)] + [(300, N.LOOPED_BLOCK_D)]
    for dt in ("fp32", "tf32", "fp16", "bf16"):
        _common.set_tf32(dt == "tf32")
        tdt = _torch_dtype(dt)
        dots = N.dot_types(tdt)
        for D, _ in bank_widths:
            res = D <= N.MAX_RESIDENT_D
            for kind, kern, extra in (("fwd", "_info_nce_fwd_bank_kernel", [dict(WITH_DQ=False)] + ([dict(WITH_DQ=True)] if res else [])),
                                      ("dq", "_info_nce_bwd_dq_bank_kernel", [{}]), ("dn", "_info_nce_bwd_dn_bank_kernel", [{}])):
                t = N.gpu_tile(kind, tdt, D)
                for ex in extra:
                    cons = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=res, **dots, **ex)
                    label = f"D={'<=' if res else '>'}{t.block_d if res else N.MAX_RESIDENT_D} M{t.block_m}N{t.block_n}D{t.block_d}" + \
                        "".join(f" {k}" for k, v in ex.items() if v)
                    out.append(("info_nce", kern, dt, label, cons, {"q_ptr", "n_ptr"}, t.num_warps, t.num_stages))
            if dt == "tf32":
                continue  # the remaining kernels have no fp32 dot whose precision TF32 changes
            t = N.gpu_tile("gather", tdt, D)
            base = dict(BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=res)
            lab = f"D={'<=' if res else '>'}{t.block_d if res else N.MAX_RESIDENT_D} N{t.block_n}D{t.block_d}"
            for ex in [dict(WITH_DQ=False)] + ([dict(WITH_DQ=True)] if res else []):
                out.append(("info_nce", "_info_nce_fwd_gather_kernel", dt, lab + (" WITH_DQ" if ex["WITH_DQ"] else ""),
                            {**base, **ex}, {"q_ptr", "n_ptr"}, t.num_warps, t.num_stages))
            for ex in (dict(WRITE_DQ=True, WRITE_COEF=False), dict(WRITE_DQ=False, WRITE_COEF=True)):
                out.append(("info_nce", "_info_nce_bwd_dq_gather_kernel", dt, lab + (" WRITE_DQ" if ex["WRITE_DQ"] else " WRITE_COEF"),
                            {**base, **ex}, {"q_ptr", "n_ptr"}, t.num_warps, t.num_stages))
            st = N.segment_tile(D)
            out.append(("info_nce", "_info_nce_bwd_dn_segment_kernel", dt, f"D~{D} N{st.block_n}E{st.block_m}D{st.block_d}",
                        dict(BLOCK_N=st.block_n, BLOCK_E=st.block_m, BLOCK_D=st.block_d,
                             ACC_PREC="ieee" if dt == "fp32" else "tf32"), {"q_ptr"}, st.num_warps, st.num_stages))
        if dt == "tf32":
            continue
        c = N.combine_tile(256, 8)
        out.append(("info_nce", "_info_nce_fwd_combine_kernel", dt, f"M{c.block_m}S{c.block_n}",
                    dict(BLOCK_M=c.block_m, BLOCK_S=c.block_n), set(), c.num_warps, c.num_stages))
        for d in (64, 128, 256, 512):
            br, bd = _common.row_tile(d)
            for module, kern, ptrs in (
                    ("_common", "_row_inv_norm_kernel", {"x_ptr"}),
                    ("l2_normalize", "_l2_normalize_fwd_kernel", {"x_ptr", "y_ptr"}),
                    ("l2_normalize", "_l2_normalize_bwd_kernel", {"x_ptr", "dx_ptr"}),
                    ("cosine_similarity", "_cosine_similarity_fwd_kernel", {"a_ptr", "b_ptr"}),
                    ("cosine_similarity", "_cosine_similarity_bwd_kernel", {"a_ptr", "b_ptr", "da_ptr", "db_ptr"})):
                out.append((module, kern, dt, f"R{br}D{bd}", dict(BLOCK_R=br, BLOCK_D=bd), ptrs, _common.ROW_WARPS,
                            _common.ROW_STAGES))
        # pgd_step, pgd_random_start (not tuned here): Triton's default 4 warps / 3 stages, as launched
        out.append(("pgd_step", "_pgd_step_linf_kernel", dt, "BLOCK1024", dict(ALPHA_T=True, EPS_T=True, BLOCK=1024),
                    {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
        out.append(("pgd_random_start", "_pgd_random_start_linf_kernel", dt, "BLOCK1024", dict(EPS_T=True, BLOCK=1024),
                    {"x_ptr", "out_ptr"}, 4, 3))
        for blk in (256, 2048):
            for ph in (0, 1, 2):
                out.append(("pgd_step", "_pgd_step_l2_partial_kernel", dt, f"BLOCK{blk} PHASE{ph}", dict(PHASE=ph, BLOCK=blk),
                            {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
            out.append(("pgd_step", "_pgd_step_l2_apply_kernel", dt, f"BLOCK{blk}", dict(BLOCK=blk), {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
    _common.set_tf32(None)
    return out


def _tool(name: str) -> str:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a one-kernel cubin. The stack frame is where ptxas spills (Triton
    records n_spills only when it loads the kernel on a device)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output: {usage[:300]}")
    return int(m.group(1)), int(m.group(2))


def _uses_tensor_cores(ptx: str) -> bool:
    """mma.sync / wgmma.mma_async in the PTX: ptxas lowers exactly these to HMMA / HGMMA (reading the
    PTX saves a SASS dump a kernel, a third of the report's time)."""
    return bool(re.search(r"\b(wgmma\.mma_async|mma\.sync)\b", ptx))


def compile_one(job: tuple, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import importlib
    module, kern, dt, label, cons, data_ptrs, nw, ns = job
    fn = getattr(importlib.import_module(f"kernels.{module}"), kern)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        p = fn.params[i]
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (TRITON_DT[dt] if name in data_ptrs else ("i64" if name in INT64_PTRS else "fp32"))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn, sig, dict(cons), attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=nw, num_stages=ns))
    regs, stack = _resources(ck.asm["cubin"])
    tc = _uses_tensor_cores(ck.asm["ptx"])
    return dict(kernel=f"{module}.{kern}", arch=f"sm_{arch}", dtype=dt,
                config=f"{label} any D", num_warps=nw, num_stages=ns, regs=regs,
                spill_bytes=stack, stack_bytes=stack, smem_bytes=ck.metadata.shared, tensor_core=tc, source="triton")


def _run(args):
    job, arch = args
    try:
        return compile_one(job, arch)
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        module, kern, dt, label, _, _, nw, ns = job
        return dict(kernel=f"{module}.{kern}", arch=f"sm_{arch}", dtype=dt, config=f"{label} ERROR {type(exc).__name__}: "
                    f"{str(exc)[:120]}", num_warps=nw, num_stages=ns, regs="", spill_bytes="", stack_bytes="",
                    smem_bytes="", tensor_core="", source="triton")


def _nvcc() -> str | None:
    """nvcc on PATH, else under the CUDA home the extension builds with (as tests/test_cext_nvcc.py)."""
    from gacd_fast.ops import cext_build
    home = cext_build.find_cuda_home()
    found = shutil.which("nvcc") or (str(Path(home, "bin", "nvcc")) if home else None)
    return found if found and Path(found).exists() else None


def start_cuda_ext(archs: list[int], tmp: str) -> list[tuple[Path, subprocess.Popen]]:
    """Start ``nvcc -fatbin -Xptxas -v`` of every csrc/cuda/*.cu in the background: device code only
    (no host compile: a third less time), all archs in one call. Flags as tests/test_cext_nvcc.py:
    -O0 is the host code's level (device code gets ptxas' default -O3), and the CPU torch wheel
    lacks the generated cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for."""
    nvcc = _nvcc()
    if nvcc is None:
        print("cuda extension: skipped (no nvcc on PATH or under the CUDA home)")
        return []
    from torch.utils import cpp_extension
    includes = cpp_extension.include_paths()
    flags = ["-fatbin", "-std=c++20", "-O0", *cpp_extension.COMMON_NVCC_FLAGS, "-Xptxas", "-v"]
    if not any(Path(i, "c10", "cuda", "impl", "cuda_cmake_macros.h").exists() for i in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags += [f"-I{i}" for i in includes]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    procs = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        obj = Path(tmp, cu.stem + ".fatbin")
        procs.append((cu, subprocess.Popen([nvcc, *flags, str(cu), "-o", str(obj)], stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
    return procs


def cuda_ext_rows(procs: list[tuple[Path, subprocess.Popen]], tmp: str) -> list[dict]:
    """Rows of the nvcc runs ``start_cuda_ext`` started: one per (kernel, arch)."""
    rows = []
    for cu, proc in procs:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"cuda extension: {cu.name} failed to compile:\n{log[-2000:]}")
        rows += _ptxas_rows(log, cu.name, str(Path(tmp, cu.stem + ".fatbin")))
    return rows


def _ptxas_rows(log: str, src: str, obj: str) -> list[dict]:
    sass = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True).stdout
    mma = {m.group(1) for m in re.finditer(r"Function : (\S+)[\s\S]*?(?=Function :|\Z)", sass)
           if re.search(r"\bH(G)?MMA\b", m.group(0))}
    rows, name, arch, stack, spill = [], None, None, 0, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            name, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            dem = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            qual = re.sub(r"^void ", "", dem.replace("(anonymous namespace)::", ""))
            kname = re.split(r"[<(]", qual, maxsplit=1)[0]
            rows.append(dict(kernel=f"csrc/{src}:{kname}", arch=f"sm_{arch}", dtype=_dtype_of(dem),
                             config=qual[len(kname):].split("(")[0] or "-", num_warps="", num_stages="", regs=int(m.group(1)), spill_bytes=spill,
                             stack_bytes=stack, smem_bytes=int(smem.group(1)) if smem else 0,
                             tensor_core=name in mma, source="nvcc"))
            name = None
    return rows


def _dtype_of(demangled: str) -> str:
    for key, dt in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("double", "fp64"), ("float", "fp32")):
        if key in demangled:
            return dt
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_resources.csv"))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--only", nargs="*", default=[""], help="compile only kernels whose name contains one of these")
    ap.add_argument("--dtype", nargs="+", default=list(TRITON_DT), choices=list(TRITON_DT),
                    help="compile only these input dtypes")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out for kernels not compiled now")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the nvcc compile of csrc/cuda")
    args = ap.parse_args(argv)
    started = time.time()
    todo = [(j, a) for j in jobs() if any(o in j[1] for o in args.only) and j[2] in args.dtype for a in args.arch]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [] if args.no_cuda_ext else start_cuda_ext(args.arch, tmp)
        print(f"compiling {len(todo)} Triton kernel variants with {args.jobs} processes"
              f"{' and the CUDA extension with nvcc' if procs else ''} ...", flush=True)
        with ProcessPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(_run, todo))
        rows += cuda_ext_rows(procs, tmp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        done = {r["kernel"] for r in rows}
        rows = [r for r in csv.DictReader(out.open()) if r["kernel"] not in done] + rows
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if r["arch"] == "sm_90" and (r["regs"] == "" or int(r["spill_bytes"] or 0) > 0)]
    print(f"{len(rows)} rows -> {out} in {time.time() - started:.0f} s; sm_90 rows spilling or failing: {len(bad)}")
    for r in bad[:40]:
        print(f"  {r['kernel']} {r['dtype']} {r['config']}: regs {r['regs']} spill {r['spill_bytes']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
