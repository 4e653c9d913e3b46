"""Compile every Triton kernel (and the CUDA extension) for sm_80 and sm_90 without a GPU and write
their resources: registers, spill bytes, shared memory, tensor-core use of the SASS.

    python benchmarks/kernel_report.py [--out benchmarks/results/kernel_resources.csv] [--jobs 2]
                                       [--arch 80 90] [--only NAME_SUBSTRING] [--no-cuda-ext]

Triton kernels: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) at every launch
configuration the host code can choose (kernels/info_nce.py's tile tables, similarity's row tiles,
pgd's blocks), for each input dtype, with the pointer alignment the runtime specialises on (torch
allocations are 16-byte aligned) and D either unspecialised ("any D") or a multiple of 16 ("D%16").
Resources come from ``cuobjdump --dump-resource-usage`` and ``cuobjdump -sass`` (HMMA/HGMMA) on the
cubin, with the tools Triton's wheel ships. C++/CUDA kernels: ``nvcc -Xptxas -v`` on csrc/cuda/*.cu.
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
DIV16_INTS = {"D", "chunk"}  # specialised as multiples of 16 by the runtime when they are
TRITON_DT = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def jobs() -> list[tuple]:
    """(module, kernel, dtype, config label, constexprs, data pointer names, num_warps, num_stages)."""
    import torch  # noqa: F401
    from kernels import _common, info_nce as N, similarity as S
    out = []
    bank_widths = [(d, d) for d in (16, 32, 64, 128, 256)] + [(300, N.LOOPED_BLOCK_D)]
    for dt in ("fp32", "tf32", "fp16", "bf16"):
        _common.set_tf32(dt == "tf32")
        tdt = _torch_dtype(dt)
        dots = N.dot_types(tdt)
        for D, _ in bank_widths:
            res = D <= N.MAX_RESIDENT_D
            for kind, kern, extra in (("fwd", "_fwd_bank_kernel", [dict(WITH_DQ=False)] + ([dict(WITH_DQ=True)] if res else [])),
                                      ("dq", "_dq_bank_kernel", [{}]), ("dn", "_dn_bank_kernel", [{}])):
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
                out.append(("info_nce", "_fwd_gather_kernel", dt, lab + (" WITH_DQ" if ex["WITH_DQ"] else ""),
                            {**base, **ex}, {"q_ptr", "n_ptr"}, t.num_warps, t.num_stages))
            for ex in (dict(WRITE_DQ=True, WRITE_COEF=False), dict(WRITE_DQ=False, WRITE_COEF=True)):
                out.append(("info_nce", "_dq_gather_kernel", dt, lab + (" WRITE_DQ" if ex["WRITE_DQ"] else " WRITE_COEF"),
                            {**base, **ex}, {"q_ptr", "n_ptr"}, t.num_warps, t.num_stages))
            st = N.segment_tile(D)
            out.append(("info_nce", "_dn_segment_kernel", dt, f"D~{D} N{st.block_n}E{st.block_m}D{st.block_d}",
                        dict(BLOCK_N=st.block_n, BLOCK_E=st.block_m, BLOCK_D=st.block_d,
                             ACC_PREC="ieee" if dt == "fp32" else "tf32"), {"q_ptr"}, st.num_warps, st.num_stages))
        if dt == "tf32":
            continue
        c = N.combine_tile(256, 128, 8)
        out.append(("info_nce", "_combine_kernel", dt, f"M{c.block_m}S{c.block_n}D{c.block_d}",
                    dict(BLOCK_M=c.block_m, BLOCK_D=c.block_d, BLOCK_S=c.block_n), {"q_ptr", "p_ptr"}, c.num_warps, c.num_stages))
        for d in (64, 128, 256, 512):
            br, bd = S.ROW_TILE // S.row_block_d(d), S.row_block_d(d)
            for kern, ptrs in (("_inv_norm_kernel", {"x_ptr"}), ("_normalize_fwd_kernel", {"x_ptr", "y_ptr"}),
                               ("_normalize_bwd_kernel", {"x_ptr", "dx_ptr"}), ("_cosine_fwd_kernel", {"a_ptr", "b_ptr"}),
                               ("_cosine_bwd_kernel", {"a_ptr", "b_ptr", "da_ptr", "db_ptr"})):
                out.append(("similarity", kern, dt, f"R{br}D{bd}", dict(BLOCK_R=br, BLOCK_D=bd), ptrs, S.ROW_WARPS, S.ROW_STAGES))
        # pgd (not tuned here): Triton's default 4 warps / 3 stages, as launched
        out.append(("pgd", "_pgd_linf_kernel", dt, "BLOCK1024", dict(ALPHA_T=True, EPS_T=True, BLOCK=1024),
                    {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
        out.append(("pgd", "_linf_random_start_kernel", dt, "BLOCK1024", dict(EPS_T=True, BLOCK=1024),
                    {"x_ptr", "out_ptr"}, 4, 3))
        for blk in (256, 2048):
            for ph in (0, 1):
                out.append(("pgd", "_l2_partial_kernel", dt, f"BLOCK{blk} PHASE{ph}", dict(PHASE=ph, BLOCK=blk),
                            {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
            out.append(("pgd", "_l2_apply_kernel", dt, f"BLOCK{blk}", dict(BLOCK=blk), {"x_ptr", "g_ptr", "nat_ptr"}, 4, 3))
    _common.set_tf32(None)
    return out


def _tool(name: str) -> str:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def _resources(cubin: bytes) -> tuple[int, int, int, bool]:
    """(registers, stack bytes, static shared bytes, HMMA/HGMMA in the SASS) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output: {usage[:300]}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), bool(re.search(r"\bH(G)?MMA\b", sass))


def _spill_bytes(asm: dict) -> int:
    """Spill stores + loads reported by ptxas are in the cubin's stack; the spill count Triton
    records (n_spills) is filled only on a device, so count local-memory spill accesses in the SASS."""
    return 0


def compile_one(job: tuple, arch: int, div16: bool) -> dict:
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
            if div16 and name in DIV16_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    import triton.language as tl
    cons = {k: v for k, v in cons.items()}
    src = ASTSource(fn, sig, cons, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=nw, num_stages=ns))
    regs, stack, _, tc = _resources(ck.asm["cubin"])
    spills = len(re.findall(r"\bst\.local\b", ck.asm.get("ptx", "")))  # noqa: F841 (ptx has no spills)
    return dict(kernel=f"{module}.{kern}", arch=f"sm_{arch}", dtype=dt,
                config=f"{label} {'D%16' if div16 else 'any D'}", num_warps=nw, num_stages=ns, regs=regs,
                spill_bytes=stack, stack_bytes=stack, smem_bytes=ck.metadata.shared, tensor_core=tc, source="triton")


def _run(args):
    job, arch, div16 = args
    try:
        return compile_one(job, arch, div16)
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        module, kern, dt, label, _, _, nw, ns = job
        return dict(kernel=f"{module}.{kern}", arch=f"sm_{arch}", dtype=dt, config=f"{label} ERROR {type(exc).__name__}: "
                    f"{str(exc)[:120]}", num_warps=nw, num_stages=ns, regs="", spill_bytes="", stack_bytes="",
                    smem_bytes="", tensor_core="", source="triton")


def cuda_ext_rows(archs: list[int]) -> list[dict]:
    """nvcc -Xptxas -v of csrc/cuda/*.cu per arch (compile only): one row per kernel."""
    nvcc = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if nvcc is None:
        print("cuda extension: skipped (no nvcc on PATH or under /usr/local/cuda*)")
        return []
    import torch.utils.cpp_extension as ce
    incs = [f"-I{p}" for p in ce.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    cuda_home = Path(nvcc).resolve().parents[1]
    incs += [f"-I{cuda_home / 'include'}", f"-I{cuda_home / 'targets/x86_64-linux/include'}"]
    rows = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for arch in archs:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [nvcc, "-c", str(cu), "-o", f"{tmp}/x.o", f"-arch=sm_{arch}", "-O3", "-std=c++17",
                       "-Xptxas", "-v", "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_C", *incs]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"cuda extension: {cu.name} sm_{arch} failed to compile:\n{r.stderr[-2000:]}")
                    continue
                rows += _ptxas_rows(r.stderr, arch, cu.name, f"{tmp}/x.o")
    return rows


def _ptxas_rows(log: str, arch: int, src: str, obj: str) -> list[dict]:
    sass = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True).stdout
    mma = {m.group(1) for m in re.finditer(r"Function : (\S+)[\s\S]*?(?=Function :|\Z)", sass)
           if re.search(r"\bH(G)?MMA\b", m.group(0))}
    rows, name, stack, spill = [], None, 0, 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            dem = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            rows.append(dict(kernel=f"csrc/{src}:{dem.split('(')[0]}", arch=f"sm_{arch}", dtype=_dtype_of(dem),
                             config=dem[:160], num_warps="", num_stages="", regs=int(m.group(1)), spill_bytes=spill,
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
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out for kernels not compiled now")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the nvcc compile of csrc/cuda")
    args = ap.parse_args(argv)
    started = time.time()
    todo = [(j, a, d) for j in jobs() if any(o in j[1] for o in args.only) for a in args.arch for d in (False,)]
    print(f"compiling {len(todo)} Triton kernel variants with {args.jobs} processes ...", flush=True)
    with ProcessPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(_run, todo, chunksize=4))
    if not args.no_cuda_ext:
        rows += cuda_ext_rows(args.arch)
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
