"""The benches' own measuring code (bench/*.py): what each figure claims to include. Each check runs
in its own process: the bench modules define absl flags at import, some under the same names."""
import subprocess
import sys
import textwrap

from tests.helpers import REPO, cli_env


def _python(code: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env=cli_env(1), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_interleaved_cold_time_includes_compilation():
    """A function compiled before its timing (the batched path: compiled to pick the favourite id)
    is compiled again for its cold time, once."""
    out = _python("""
        import jax, jax.numpy as jnp
        from bench import interleaved
        traces = []
        @jax.jit
        def f(x):
            traces.append(1)
            return x + 1
        f(jnp.ones(3))
        interleaved._timed(lambda: f(jnp.ones(3)), 2)
        print(len(traces))
    """)
    assert out.split()[-1] == "2"


def test_decode_no_cache_baseline_compiles_outside_its_timing():
    """The no-cache baseline's warm-up compiles the forward at the timed run's length, and the timed
    decode compiles nothing (a jit per call compiled inside the timing: a 23x 'speedup' at 2 tokens)."""
    out = _python("""
        import jax, numpy as np
        from bench import decode
        traces = []
        def forward_fn(p, t, pos, s):
            traces.append(t.shape)
            return jax.numpy.zeros((*t.shape, 16)) + p
        class Model:
            def apply(self, variables, t, pos, s):
                return forward_fn(variables["params"], t, pos, s)
        forward = decode.no_cache_forward(Model())
        tokens, mask = np.ones((2, 3), np.int32), np.ones((2, 3), np.int32)
        decode.no_cache_decode(forward, 0.0, tokens, mask, 1, jax.random.key(0), 3 + 4)   # the warm-up
        decode.no_cache_decode(forward, 0.0, tokens, mask, 4, jax.random.key(0))          # the timed run
        print(traces)
    """)
    assert out.strip().splitlines()[-1] == "[(2, 7)]"
