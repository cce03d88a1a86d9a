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
