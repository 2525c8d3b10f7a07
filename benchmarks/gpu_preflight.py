"""Preflight of a GPU run: can this machine compile and launch the Triton kernels? A verdict in seconds.

    python -m benchmarks.gpu_preflight                  # on the GPU machine (benchmarks/gpu_run.sh starts with it)
    python -m benchmarks.gpu_preflight --cpu            # the same steps on CPU tensors under the Triton interpreter
    python -m benchmarks.gpu_preflight --json out.json  # also write the findings as JSON

Steps, one line each (``ok`` / ``warn`` / ``FAIL`` and what was found):

1. versions: python, torch (its CUDA), triton, numpy. triton < 3.7 with numpy >= 2.4 is refused under the
   interpreter only (compiled kernels do not care), so it is a ``warn`` on a GPU and a ``FAIL`` with ``--cpu``.
2. C compiler: Triton builds its CUDA driver module, and triton < 3.7 also one launcher per kernel
   specialisation, with a C compiler at run time (``$CC``, else ``gcc``, else ``clang``, as Triton picks it)
   against ``Python.h`` from ``sysconfig.get_paths()['include']``. A tiny C file that includes Python.h is
   compiled (``-fsyntax-only``): a missing compiler or missing headers are found here, not at the first
   kernel launch ("Failed to find C compiler").
3. the Triton cache (``TRITON_CACHE_DIR``, else ``~/.triton/cache``): writable, on a local file system
   (a network one makes every cold compile slower and can break the file locks), free space.
4. CUDA: a device torch can see (exit 2 if none), its name and capability, ``libcuda.so.1`` where Triton looks.
5. one tiny compiled CE forward + backward (bf16, ragged shapes) against the reference in fp32: loss and
   both gradients; the time of the first call is the cold compile of its kernels (the ``compile_s`` that
   ``gpu_run.sh`` multiplies by the specialisation count of the CUDA tests).

The last line is the verdict: ``PREFLIGHT: PASS (… s)`` or ``PREFLIGHT: FAIL <what> (exit N)``. Exit status:
0 pass, 2 no CUDA device (torch without CUDA, no driver, no GPU), 3 the toolchain (compiler, Python.h, cache
directory, libcuda), 4 the tiny kernel failed or disagreed with the reference, 5 unsupported versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

EXIT_NO_CUDA, EXIT_TOOLCHAIN, EXIT_KERNEL, EXIT_VERSIONS = 2, 3, 4, 5
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "lustre", "gpfs", "ceph", "glusterfs", "9p", "beegfs",
              "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone")
MIN_CACHE_FREE_GB = 1.0


class Report:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.lines, self.fails, self.data = [], [], {}

    def add(self, status: str, check: str, detail: str, code: int = 0) -> None:
        line = f"preflight: {status:<4} {check}: {detail}"
        print(line, flush=True)
        self.lines.append(line)
        if status == "FAIL":
            self.fails.append((code, check, detail))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _version(mod: str) -> str:
    try:
        import importlib.metadata as md

        return md.version(mod)
    except Exception:
        return "missing"


def _vtuple(v: str):
    out = []
    for p in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_versions(rep: Report, cpu: bool) -> None:
    torch_v, triton_v, numpy_v = _version("torch"), _version("triton"), _version("numpy")
    cuda_v = None
    try:
        import torch

        cuda_v = torch.version.cuda
    except Exception as e:  # torch missing or broken: nothing else can run
        rep.add("FAIL", "versions", f"import torch failed: {type(e).__name__}: {e}", EXIT_VERSIONS)
        return
    rep.data.update(python=sys.version.split()[0], torch=torch_v, torch_cuda=cuda_v, triton=triton_v, numpy=numpy_v)
    detail = f"python {sys.version.split()[0]}, torch {torch_v} (cuda {cuda_v}), triton {triton_v}, numpy {numpy_v}"
    if triton_v == "missing":
        rep.add("FAIL", "versions", detail + "; triton is not installed", EXIT_VERSIONS)
        return
    old_pair = _vtuple(triton_v) < (3, 7) and numpy_v != "missing" and _vtuple(numpy_v) >= (2, 4)
    if old_pair and cpu:
        rep.add("FAIL", "versions", detail + "; the Triton < 3.7 interpreter needs numpy < 2.4", EXIT_VERSIONS)
    elif old_pair:
        rep.add("warn", "versions", detail + "; fine for compiled kernels, the interpreter would need numpy < 2.4")
    else:
        rep.add("ok", "versions", detail)


def find_c_compiler():
    """The C compiler Triton's build step picks: $CC, else gcc, else clang (triton/runtime/build.py)."""
    cc = os.environ.get("CC")
    if cc:
        return cc, "$CC"
    for name in ("gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path, name
    return None, None


def python_include_dir() -> str:
    """Where Triton looks for Python.h (the posix_local scheme of Debian's python maps to posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def check_compiler(rep: Report) -> None:
    cc, how = find_c_compiler()
    inc = python_include_dir()
    rep.data.update(cc=cc, python_include=inc)
    has_header = Path(inc, "Python.h").is_file()
    if not cc:
        rep.add("FAIL", "compiler", "no C compiler ($CC unset, no gcc, no clang on PATH): Triton builds its driver "
                "module and launchers at run time and every kernel launch would fail with 'Failed to find C "
                "compiler'", EXIT_TOOLCHAIN)
        return
    if not has_header:
        rep.add("FAIL", "compiler", f"{cc} found but {inc}/Python.h is missing (install the python"
                f"{sys.version_info.major}.{sys.version_info.minor} development headers)", EXIT_TOOLCHAIN)
        return
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "probe.c")
        src.write_text("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        try:
            p = subprocess.run([cc, "-fsyntax-only", f"-I{inc}", str(src)], capture_output=True, text=True, timeout=20)
            ok, msg = p.returncode == 0, (p.stderr or p.stdout).strip().splitlines()[-1:] if p.returncode else []
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, msg = False, [f"{type(e).__name__}: {e}"]
    if ok:
        rep.add("ok", "compiler", f"{cc} ({how}) compiles against {inc}/Python.h")
    else:
        rep.add("FAIL", "compiler", f"{cc} ({how}) cannot compile a file including {inc}/Python.h: "
                f"{' '.join(msg)[:200]}", EXIT_TOOLCHAIN)


def _mount_of(path: Path):
    """(mount point, fs type) of the longest /proc/mounts entry containing ``path``."""
    best = ("/", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, parts[2])
    except OSError:
        pass
    return best


def triton_cache_dir() -> Path:
    env = os.environ.get("TRITON_CACHE_DIR")
    if env:
        return Path(env)
    home = os.environ.get("TRITON_HOME", os.path.expanduser("~"))
    return Path(home, ".triton", "cache")


def check_cache(rep: Report) -> None:
    d = triton_cache_dir().resolve()
    rep.data["triton_cache_dir"] = str(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".preflight_"):
            pass
    except OSError as e:
        rep.add("FAIL", "cache", f"TRITON_CACHE_DIR={d} is not writable ({e.strerror or e}); point it at a local "
                "directory", EXIT_TOOLCHAIN)
        return
    mnt, fs = _mount_of(d)
    free_gb = shutil.disk_usage(d).free / 2**30
    rep.data.update(triton_cache_fs=fs, triton_cache_free_gb=round(free_gb, 1))
    detail = f"{d} on {fs} ({mnt}), {free_gb:.1f} GB free"
    if fs in NETWORK_FS or fs.startswith("fuse."):
        rep.add("warn", "cache", detail + "; a network file system: set TRITON_CACHE_DIR to a local directory")
    elif free_gb < MIN_CACHE_FREE_GB:
        rep.add("FAIL", "cache", detail + f"; under {MIN_CACHE_FREE_GB:g} GB free", EXIT_TOOLCHAIN)
    else:
        rep.add("ok", "cache", detail)


def _libcuda_found() -> bool:
    try:
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        if "libcuda.so.1" in out:
            return True
    except (OSError, subprocess.TimeoutExpired):
        pass
    return any(Path(p, "libcuda.so.1").exists() for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p)


def check_cuda(rep: Report) -> bool:
    import torch

    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no driver or no visible GPU"
        rep.add("FAIL", "cuda", f"no CUDA device ({why}; torch {torch.__version__})", EXIT_NO_CUDA)
        return False
    cap = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    free, total = torch.cuda.mem_get_info(0)
    rep.data.update(gpu=name, capability=f"{cap[0]}.{cap[1]}", gpu_free_gb=round(free / 2**30, 1))
    if not _libcuda_found():
        rep.add("FAIL", "cuda", f"{name} visible to torch but libcuda.so.1 is not in `ldconfig -p` nor "
                "LD_LIBRARY_PATH, where Triton looks for it", EXIT_TOOLCHAIN)
        return False
    rep.add("ok", "cuda", f"{name}, sm_{cap[0]}{cap[1]}, {free / 2**30:.1f} of {total / 2**30:.1f} GB free")
    return True


def check_tiny_ce(rep: Report, device: str) -> None:
    """Compiled (or, on CPU, interpreted) CE forward + backward at ragged shapes against the fp32 reference."""
    import torch

    import lsa_kernels as L

    N, H, V = 67, 64, 1000
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(N, H, generator=g)
    w0 = torch.randn(V, H, generator=g) / H**0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[5] = -100
    dtype = torch.bfloat16

    def run(backend, dt):
        x = x0.to(device, dtype).to(dt).requires_grad_()
        w = w0.to(device, dtype).to(dt).requires_grad_()
        loss = L.linear_cross_entropy(x, w, y.to(device), backend=backend)
        loss.backward()
        return [t.detach().float().cpu() for t in (loss, x.grad, w.grad)]

    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ours = run("triton", dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run("triton", dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        ref = run("reference", torch.float32)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        rep.add("FAIL", "tiny-ce", f"CE forward+backward raised {msg}", EXIT_KERNEL)
        return
    bad = []
    for name, o, r in zip(("loss", "dx", "dw"), ours, ref):
        err = float((o - r).norm() / r.norm().clamp(min=1e-30))
        if not (err <= 2e-2):  # bf16 inputs already rounded the same way: the error is the bf16 output rounding
            bad.append(f"{name} rel. error {err:.2e}")
    # the first call compiles the forward and backward kernels (2 specialisations); launches are in warm
    compile_s = max(first - warm, 0.0) / 2 if device == "cuda" else None
    rep.data.update(tiny_first_call_s=round(first, 3), tiny_warm_call_s=round(warm, 4),
                    compile_s_per_specialisation=None if compile_s is None else round(compile_s, 3))
    what = "compiled" if device == "cuda" else "interpreted"
    if bad:
        rep.add("FAIL", "tiny-ce", f"{what} CE fwd+bwd [{N}x{H}]x[{V}] bf16 disagrees with the reference: "
                + ", ".join(bad), EXIT_KERNEL)
    elif device == "cuda":
        rep.add("ok", "tiny-ce", f"{what} CE fwd+bwd [{N}x{H}]x[{V}] bf16 matches the reference; first call "
                f"{first:.2f} s (about {compile_s:.2f} s per kernel specialisation), then {warm * 1e3:.1f} ms")
    else:
        rep.add("ok", "tiny-ce", f"{what} CE fwd+bwd [{N}x{H}]x[{V}] bf16 matches the reference "
                f"({first:.2f} s, no compilation under the interpreter)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_preflight", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the kernel step on CPU tensors under the Triton interpreter")
    ap.add_argument("--json", default=None, help="write the findings to this JSON file")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds the preflight should take (warn above)")
    a = ap.parse_args(argv)
    if a.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    rep = Report()
    check_versions(rep, a.cpu)
    check_compiler(rep)
    check_cache(rep)
    if not rep.fails or all(code != EXIT_VERSIONS for code, _, _ in rep.fails):
        if a.cpu:
            check_tiny_ce(rep, "cpu")
        elif check_cuda(rep):
            if not rep.fails:
                check_tiny_ce(rep, "cuda")
    took = rep.elapsed()
    rep.data["seconds"] = round(took, 2)
    if took > a.budget:
        rep.add("warn", "time", f"the preflight took {took:.1f} s, over its {a.budget:g} s budget")
    code = 0
    if rep.fails:
        # the most basic failure names the exit code: no CUDA, then versions, toolchain, kernel
        order = [EXIT_NO_CUDA, EXIT_VERSIONS, EXIT_TOOLCHAIN, EXIT_KERNEL]
        code = min((c for c, _, _ in rep.fails), key=order.index)
        what = "; ".join(f"{check}: {detail}" for _, check, detail in rep.fails)
        verdict = f"PREFLIGHT: FAIL {what} (exit {code})"
    else:
        verdict = f"PREFLIGHT: PASS ({took:.1f} s{', cpu interpreter' if a.cpu else ''})"
    rep.data.update(verdict=verdict, exit=code, lines=rep.lines)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rep.data, indent=2))
    print(verdict, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
