"""Root conftest: runs before any test module imports jax.

- Every test process sees 8 fake CPU devices, so sharding is tested without accelerators.
- One persistent XLA compilation cache for the whole session, shared through the environment
  with every subprocess the tests start (CLI runs, multi-process training) and with pytest-xdist
  workers: the suite compiles the same tiny train steps, decoders and VQ models many times over,
  and on a 2-core machine compilation is most of its time. Identical HLO gives the identical
  executable, so no test's meaning changes. The directory is removed when the session ends.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="cm3leon_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
