"""C kernels built with the system compiler at first use, and the C helpers they share.

The CPU kernels (`lora.cpu_kernel`, `models.cpu_attention`) are small C sources compiled
the way Triton builds its launchers: with ``$CC`` (else ``cc``/``gcc``), ``-O3
-march=native -fopenmp``, into ``$ADAPTERHUB_KERNEL_CACHE`` (default
``~/.cache/adapterhub/kernels``), keyed by the source, the defines, the compiler and the
CPU, in well under a second each. They run their threads on torch's own OpenMP runtime
(GNU libgomp, loaded under the same soname, so the kernels bind to it rather than to a
second copy). Where a kernel cannot be built or loaded (no compiler, not Linux, a torch
without libgomp) `load_function` returns None and the caller's torch path serves.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adapterhub_server.cache_dirs import user_cache_dir

logger = logging.getLogger(__name__)

VECTOR_HELPERS = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats: one AVX-512 register, two AVX2 ones; GCC/Clang lower it to what -march has. */
typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* bfloat16 bits are a float32's top half: widening one is a shift. */
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
#ifdef __AVX512F__
#include <immintrin.h>
/* One vpmovzxwd from memory and a shift: GCC (11 to 13) lowers the generic conversion
   below to two half-width widenings, an extract and an insert, four shuffles where this
   takes one, and the bfloat16 LoRA and attention loops are bound by those shuffles. */
static inline v16 bf16_load16(const uint16_t *p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (v16)_mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#else
static inline v16 bf16_load16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    v16 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
#endif
static inline float bf16_load(const uint16_t *p) {
    const uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rounding to bfloat16: to nearest, ties to even, NaN kept a (quiet) NaN. */
static inline void bf16_store16(uint16_t *p, v16 v) {
    u32x16 bits;
    memcpy(&bits, &v, sizeof bits);
    const u32x16 rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    const u32x16 nan = (u32x16)(v != v); /* all ones where NaN */
    const u16x16 h = __builtin_convertvector((nan & 0x7FC0) | (~nan & rounded), u16x16);
    memcpy(p, &h, sizeof h);
}
static inline void bf16_store(uint16_t *p, float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    *p = f != f ? 0x7FC0 : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* A tree of vector adds, in registers: lane by lane, 16 dependent scalar adds, and a
   vector split through memory stalls on store forwarding; either costs the attention
   kernel more than a key's whole dot product. */
static inline float hsum(v16 v) {
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
#if defined(__clang__) || __GNUC__ >= 12
    const v8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                  + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3)
                  + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else
    v8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    const v8 s8 = a + b;
    v4 c, d;
    memcpy(&c, &s8, sizeof c);
    memcpy(&d, (const char *)&s8 + sizeof c, sizeof d);
    const v4 s4 = c + d;
#endif
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
"""
"""C declarations every kernel source starts with: 16-float vectors, bfloat16 widening
and rounding, a horizontal sum."""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_COMPILE_TIMEOUT_S = 120


def load_function(
    source: str,
    symbol: str,
    argtypes: Sequence[type],
    *,
    defines: Sequence[str] = (),
    switch: str,
) -> Callable[..., int] | None:
    """`symbol` of `source` (which should start with `VECTOR_HELPERS`) compiled with
    `defines`, as a ctypes function returning int; None where it cannot serve here or the
    environment variable `switch` is ``0``.

    The library is named after `symbol` in the kernel cache.
    """
    if os.environ.get(switch, "1") == "0":
        return None
    if sys.platform != "linux" or not torch_uses_gomp():
        # Another OpenMP runtime beside torch's would run a second thread pool on the
        # same cores, each spinning while the other works.
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: %s runs through torch ops", symbol)
        return None
    try:
        path = _build(compiler, source, symbol, tuple(defines))
        fn = getattr(ctypes.CDLL(str(path)), symbol)
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        logger.warning("CPU kernel %s unavailable (%s); using torch ops", symbol, exc)
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def torch_uses_gomp() -> bool:
    """Whether torch's OpenMP runtime (GNU libgomp) is loaded, so the kernels share it."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: a library built on one CPU may not run on
    another that shares the cache (a mounted home directory, a Docker volume)."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    ident += line
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return ident


def _build(compiler: str, source: str, name: str, defines: tuple[str, ...]) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join([source, compiler, version, *_FLAGS, *defines, _cpu_identity()]).encode()
    ).hexdigest()[:24]
    try:
        cache = user_cache_dir("ADAPTERHUB_KERNEL_CACHE", "kernels")
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="adapterhub-kernels-"))
    target = cache / f"{name}_{key}.so"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, *defines, "-o", str(out), str(src), "-lm"],
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        # Several processes may build at once: each renames a whole file into place.
        os.replace(out, target)
    logger.info("built the CPU kernel %s into %s", name, target)
    return target
