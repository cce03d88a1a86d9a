"""Root conftest: runs before any test module imports jax.

- Every test process sees 8 fake CPU devices, so sharding is tested without accelerators.
- One persistent XLA compilation cache for the whole session, shared through the environment
  with every subprocess the tests start (CLI runs, multi-process training) and with pytest-xdist
  workers: the suite compiles the same tiny train steps, decoders and VQ models many times over,
  and on a 2-core machine compilation is most of its time. Identical HLO gives the identical
  executable, so no test's meaning changes. The directory is removed when the session ends.
- XLA's CPU backend compiles without LLVM's optimisation passes (level 0, no expensive passes):
  the tiny models run for milliseconds, so compiling them is what costs (~23% less wall time on
  test_lora + test_train_vq, 2 cores). HLO-level optimisation (fusion, simplification) still runs,
  so the programs tested are the ones users run, only less tuned machine code (the same two
  options JAX's own test utilities set for their "disable most optimizations" mode). An XLA_FLAGS
  that already sets the level keeps it.
"""
import atexit
import os
import shutil
import tempfile

_xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _xla_flags:
    _xla_flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _xla_flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="cm3leon_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
