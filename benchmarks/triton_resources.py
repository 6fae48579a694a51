"""Compile the Triton selection kernels for a GPU that is not here, and report their resources.

Usage (no GPU needed; Triton's bundled ptxas and cuobjdump do the work)::

    python benchmarks/triton_resources.py                 # sm_90 (H100/H200), float32, n <= 128
    python benchmarks/triton_resources.py --arch 80 --rows 16,128,256 --f64

For each kernel, row padding (``M_PAD``), tile width and warp count it prints the registers per
thread and the spill stack in bytes (``STACK``; 0 means no spills) from ``cuobjdump
--dump-resource-usage``. A kernel that compiles here also compiles on that GPU with the same
Triton version; how fast it runs still needs the GPU (``benchmarks/gpu_reads.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aggregators import order_stats_kernels as kernels  # noqa: E402

_COMMON = {"m": "i32", "d": "i32", "stride": "i32", "col_stride": "i32", "tiles": "i32", "programs": "i32"}


def signature(kernel: str, f64: bool) -> dict:
    value = "*fp64" if f64 else "*fp32"
    pointers = {"x_ptr": value, "rows_ptr": "*i64", "vector_ptr": value, "outside_ptr": "*i32"}
    if kernel == "kept_mean":
        return pointers | {"sq_ptr": "*fp64", "bad_ptr": "*i32"} | _COMMON | {"k_low": "i32", "k_high": "i32"}
    return pointers | {"bad_ptr": "*i32"} | _COMMON | {"keep": "i32"}


def resources(kernel: str, arch: int, f64: bool, m_pad: int, block: int, warps: int, variant: bool = True) -> str:
    """Compile one kernel; ``variant`` is ``WITH_SQ`` (median) for kept_mean and ``HAS_ROWS``
    (Bulyan's row subset) for closest_mean."""
    fn = kernels.kept_mean_kernel if kernel == "kept_mean" else kernels.closest_mean_kernel
    constants = {"IS_F64": f64, "BITS": 64 if f64 else 32, "M_PAD": m_pad, "BLOCK": block}
    if kernel == "kept_mean":
        constants |= {"HAS_ROWS": False, "WITH_SQ": variant}
    else:
        constants["HAS_ROWS"] = variant
    # Keep the kernel's argument order: ASTSource maps the signature by name.
    sig = {name: signature(kernel, f64).get(name, "constexpr") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants), target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report)
    return "?" if found is None else f"registers {found.group(1):>3}, spill stack {found.group(2):>5} B, shared {found.group(3)} B"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--rows", default="16,128", help="comma list of M_PAD (rows padded to a power of two)")
    parser.add_argument("--configs", default="32x1,64x2,128x4,128x8,256x8", help="comma list of BLOCKxWARPS")
    parser.add_argument("--f64", action="store_true", help="float64 stacks (default float32)")
    parser.add_argument(
        "--all-variants", action="store_true",
        help="compile every variant the rules launch (float32 and float64, with and without the median's "
        "distances and Bulyan's row subset); exit 1 if any fails",
    )
    args = parser.parse_args(argv)
    dtypes = (False, True) if args.all_variants else (args.f64,)
    print(f"Triton {triton.__version__}, sm_{args.arch}")
    failed = 0
    for f64 in dtypes:
        for kernel in ("kept_mean", "closest_mean"):
            for variant in (True, False) if args.all_variants else (True,):
                for m_pad in (int(v) for v in args.rows.split(",")):
                    for config in args.configs.split(","):
                        block, warps = (int(v) for v in config.split("x"))
                        try:
                            line = resources(kernel, args.arch, f64, m_pad, block, warps, variant)
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            failed += 1
                            line = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
                        name = f"{kernel}({'WITH_SQ' if kernel == 'kept_mean' else 'HAS_ROWS'}={variant})"
                        print(f"{'float64' if f64 else 'float32'} {name:30s} M_PAD={m_pad:<4d} BLOCK={block:<4d} "
                              f"warps={warps}: {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
